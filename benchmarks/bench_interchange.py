"""Benchmark: notebook 05's full interchange grid on the engine vs pyvene's algorithm.

    python benchmarks/bench_interchange.py                  # smollm2-135m, mlp_out + attn_in
    python benchmarks/bench_interchange.py --threads 1

Both sides run in this process on the same model and cells (every component x layer x
position of "The capital of Spain is" <- "The capital of Italy is"):

* ``pyvene's algorithm``: one full forward pass of the base per intervention, the logits of
  every position computed (as pyvene's IntervenableModel does), the source activations cached
  once beforehand (pyvene recomputes them per call, so this side is, if anything, faster than
  pyvene itself);
* ``engine``: :func:`lib.studies.interchange.sweep_interchange` on :mod:`lib.core.engine`.

Prints both times, the ratio and the largest differences of logits and probabilities, and
writes them to ``benchmarks/results/interchange.json``. Not a test.
"""

from __future__ import annotations

import argparse

import torch

from _common import timed, write_result
from lib.studies import interchange
from lib.core.interventions import Intervention
from lib.core.hooks import patch, run_with_cache
from lib.core.models import load_model
from lib.core.parsers import parse_sites


@torch.no_grad()
def pyvene_algorithm(lm, base_ids, source_ids, cells) -> torch.Tensor:
    sites = list(dict.fromkeys(interchange._site(k, l) for k, l, _ in cells))
    _, cache = run_with_cache(lm, source_ids, sites)
    out = []
    for kind, layer, pos in cells:
        site = interchange._site(kind, layer)
        with patch(lm, [Intervention(site, positions=(pos,), value=cache[site][:, [pos]])]):
            out.append(lm.model(input_ids=base_ids).logits[0, -1].float())
    return torch.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--components", default="mlp_out,attn_in")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the engine; the fastest counts (the reference runs once)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.device, args.dtype)
    base_ids, source_ids = interchange.align_prompts(lm, interchange.DEFAULT_BASE,
                                                     interchange.DEFAULT_SOURCE)
    components = parse_sites(args.components)
    cells = interchange.grid_cells(components, list(range(lm.n_layers)),
                                   list(range(base_ids.shape[1])))
    dev = lm.device.type
    print(f"{lm.name}: {len(cells)} interventions ({len(components)} components x "
          f"{lm.n_layers} layers x {base_ids.shape[1]} positions), batch size {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s), {dev} {str(lm.dtype).removeprefix('torch.')}")
    interchange.sweep_interchange(lm, base_ids, source_ids, cells[:4])  # warm-up
    reference, t_ref = timed(lambda: pyvene_algorithm(lm, base_ids, source_ids, cells), dev)
    times = []
    for _ in range(max(1, args.repeats)):
        (got, _), t = timed(lambda: interchange.sweep_interchange(
            lm, base_ids, source_ids, cells, batch_size=args.batch_size), dev)
        times.append(t)
    t_engine = min(times)
    dlogit = float((got.cpu() - reference.cpu()).abs().max())
    dprob = float((got.cpu().softmax(-1) - reference.cpu().softmax(-1)).abs().max())
    print(f"pyvene's algorithm: {t_ref:8.2f} s   engine: {t_engine:8.2f} s (best of "
          f"{len(times)})   speed-up {t_ref / t_engine:.1f}x")
    print(f"largest |engine - reference|: logits {dlogit:.2e}, probabilities {dprob:.2e}")
    write_result("interchange", {
        "model": lm.name, "device": dev, "dtype": str(lm.dtype).removeprefix("torch."),
        "cells": len(cells), "batch_size": args.batch_size,
        "seconds": {"pyvene_algorithm": t_ref, "engine": t_engine, "engine_runs": times},
        "speedup": t_ref / t_engine, "max_abs_diff_logit": dlogit, "max_abs_diff_prob": dprob})
    return 0 if dprob <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
