"""Benchmark: the full interchange-intervention grid of notebook 05 against a naive loop.

    python benchmarks/bench_interchange.py                      # smollm2-135m, defaults
    python benchmarks/bench_interchange.py --batch-size 16 --threads 2

The grid is every layer x position x component (mlp_out and attn_in) of the tutorial's
prompts, one source activation patched into the base per intervention. In one process it times

* ``naive``: one full, unbatched forward pass per intervention (lib.patching.sweep_logits_naive);
* ``sweep_logits``: lib.patching.sweep_logits once per position group (batched, shared
  key/value prefix);
* ``layer_skip (generic)``: lib.interchange's engine (position groups continue from the base's
  key/value cache, batches start at their lowest patched layer from the clean residual stream,
  only the last position goes through the LM head), without the no-op shortcut;
* ``layer_skip``: the same plus the no-op shortcut (the default of notebook 05: patches that
  leave the base's activations bit-identical take the clean run's result);

and prints each time (the fastest of ``--repeats`` runs for the batched engines), its speed-up over the naive loop and the largest difference from it in
last-position logits and in next-token probabilities (full vocabulary). Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from lib import interchange
from lib.models import load_model
from lib.params import parse_sites


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: half the cores, see lib.interchange)")
    parser.add_argument("--components", default="mlp_out,attn_in")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each batched engine; the fastest counts (naive runs once)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    threads = interchange.set_threads(args.threads)
    lm = load_model(args.model, args.device, args.dtype)
    base_ids, source_ids = interchange.align_prompts(lm, interchange.DEFAULT_BASE,
                                                     interchange.DEFAULT_SOURCE)
    components = parse_sites(args.components)
    cells = interchange.grid_cells(components, list(range(lm.n_layers)),
                                   list(range(base_ids.shape[1])))
    rows = interchange.interchange_rows(lm, source_ids, cells)
    print(f"{lm.name}: {len(rows)} interventions ({len(components)} components x "
          f"{lm.n_layers} layers x {base_ids.shape[1]} positions), batch size {args.batch_size}, "
          f"{threads} torch thread(s), {lm.device.type} {str(lm.dtype).removeprefix('torch.')}")

    runs = [("naive", dict(engine="naive")),
            ("sweep_logits", dict(engine="sweep_logits", skip_noops=False)),
            ("layer_skip (generic)", dict(engine="layer_skip", skip_noops=False)),
            ("layer_skip", dict(engine="layer_skip", skip_noops=True))]
    results = {}
    for name, kwargs in runs:
        times = []
        for _ in range(1 if name == "naive" else max(1, args.repeats)):
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            logits = interchange.sweep_interchange(lm, base_ids, rows,
                                                   batch_size=args.batch_size, **kwargs)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        results[name] = (min(times), logits.float().cpu())

    naive_s, naive = results["naive"]
    naive_p = naive.softmax(-1)
    print(f"{'engine':<22}{'seconds':>9}{'speed-up':>10}{'max |dlogit|':>14}{'max |dprob|':>13}")
    for name, (secs, logits) in results.items():
        dlogit = (logits - naive).abs().max().item()
        dprob = (logits.softmax(-1) - naive_p).abs().max().item()
        print(f"{name:<22}{secs:>9.2f}{naive_s / secs:>9.1f}x{dlogit:>14.2e}{dprob:>13.2e}")
    best_s = results["layer_skip"][0]
    worst = (results["layer_skip"][1].softmax(-1) - naive_p).abs().max().item()
    ok = naive_s / best_s >= 10 and worst <= 1e-5
    print(f"goal (>= 10x faster, probabilities <= 1e-5 apart): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
