"""Benchmark: causal tracing on the engine (lib.studies.tracing) vs causal-tracer's algorithm.

    python benchmarks/bench_tracing.py                     # smollm2-135m, 3 kinds, 10 samples
    python benchmarks/bench_tracing.py --layers 0,10,20    # fewer centre layers (faster)

Both sides trace the same restorations with the same common-random-number noise (Meng et al.
2022, ROME causal tracing):

* ``causal-tracer``: the algorithm of chanind/causal-tracer 1.1.0 (and ROME): every
  (restoration, noise sample) row is a full forward pass of the whole prompt with the logits of
  every position, 32 rows per batch, the clean states patched in by hooks;
* ``engine``: :class:`lib.studies.tracing.CausalTracer`, rows on :mod:`lib.core.engine` (each noise sample a
  context run once; each row from its restored token on, on its sample's corrupted key/value
  prefix, from its lowest patched layer where exact; only the last position's logits).

Prints both times, the ratio and the largest difference between the two score grids, and the
ceiling that no exact algorithm can pass on these rows (:func:`exact_work_ceiling`, counted in
multiply-adds), and writes them to ``benchmarks/results/tracing.json`` (``--out`` for another
name). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import write_result
from lib.studies import tracing
from lib.core.interventions import Intervention
from lib.core.hooks import patch, run_with_cache
from lib.core.models import load_model
from lib.core.sites import site_name


@torch.no_grad()
def causal_tracer_algorithm(lm, ids, subject_range, noise: np.ndarray, answer_id: int, jobs,
                            batch_size: int = 32) -> np.ndarray:
    """Mean restored p(answer) per job: full forwards (logits at every position), batches of
    ``batch_size`` (job, sample) rows. ``noise`` is (samples, n_subject, d), already scaled."""
    samples = noise.shape[0]
    s0, s1 = subject_range
    sites = sorted({site_name(k, l) for job in jobs for k, l, _ in job.restore + job.freeze})
    _, clean = run_with_cache(lm, ids, sites)
    noise_t = torch.from_numpy(noise).to(lm.device, lm.dtype)
    pairs = [(j, s) for j in range(len(jobs)) for s in range(samples)]
    out = np.zeros(len(jobs))
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        n = len(chunk)
        ivs = [Intervention("embed", positions=tuple(range(s0, s1)), kind="add",
                            value=noise_t[[s for _, s in chunk]])]
        for r, (j, _) in enumerate(chunk):
            for kind, layer, tok in jobs[j].restore:
                site = site_name(kind, layer)
                ivs.append(Intervention(site, positions=(tok,), rows=(r,),
                                        value=clean[site][:, [tok]]))
        with patch(lm, ivs):
            logits = lm.model(input_ids=ids.expand(n, -1)).logits  # every position
        probs = logits[:, -1].float().softmax(-1)[:, answer_id]
        for (j, _), p in zip(chunk, probs.tolist()):
            out[j] += p
    return out / samples


def exact_work_ceiling(lm, n_tokens: int, jobs) -> dict:
    """How far *any* exact algorithm could beat causal-tracer's, counted in multiply-adds.

    A restoration at position ``p`` first changes the stream in some block ``f``; from there on
    every position ``>= p`` of every later block changes (causal attention carries it), so an
    exact algorithm must recompute those (block, position) cells and nothing else. Counted
    generously for the fastest side: the first patched block costs nothing (its other
    positions are unchanged when the patched site comes after attention), the last block only
    its last position plus the key/value projections of the others, the LM head one position.
    causal-tracer's rows cost every block at every position and the LM head at every position.
    Equal throughput per multiply-add is assumed, so the ratio is a ceiling on the speed-up.
    """
    blocks = lm.spec.blocks(lm.model)
    per_block = sum(w.numel() for w in blocks[0].parameters() if w.dim() == 2)
    # GPT-2 fuses queries, keys and values in c_attn: two thirds of it are keys and values
    kv = sum(m.weight.numel() * 2 // 3 if n.endswith("c_attn") else m.weight.numel()
             for n, m in blocks[0].named_modules()
             if n.split(".")[-1] in ("k_proj", "v_proj", "c_attn"))
    head = lm.model.get_output_embeddings().weight.numel()
    L, T = lm.n_layers, n_tokens
    full = len(jobs) * T * (L * per_block + head)
    exact = 0
    for job in jobs:
        p = min(t for _, _, t in job.restore)
        first = min(l for _, l, _ in job.restore)
        # resid_post at l changes block l+1 on; a sub-layer output at l changes block l
        # (only at p, counted free) and everything from block l+1 on
        for b in range(first + 1, L):
            exact += per_block + kv * (T - p - 1) if b == L - 1 else per_block * (T - p)
        exact += head
    return {"multiply_adds_causal_tracer": full, "multiply_adds_exact_minimum": exact,
            "ceiling": full / exact, "per_block_per_token": per_block, "head_per_token": head}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--kinds", default="hidden,mlp,attention")
    parser.add_argument("--layers", default="all", help="centre layers: 'all' or '0,5,10'")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="tracing", help="result name under benchmarks/results/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.device, args.dtype)
    nu = tracing.noise_level(lm, "auto")
    tracer = tracing.CausalTracer(lm, args.prompt, args.subject, noise=nu, samples=args.samples,
                                  seed=args.seed)
    layers = (list(range(lm.n_layers)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    tokens = list(range(tracer.subject_range[0], tracer.n_tokens))  # the notebook's rows
    kinds = [k.strip() for k in args.kinds.split(",")]
    jobs = []
    for kind in kinds:
        window = 1 if kind == "hidden" else args.window
        jobs += tracing.grid_restorations(kind, lm.n_layers, tokens, layers, window)
    rows = len(jobs) * args.samples
    print(f"{lm.name} on {lm.device.type} ({torch.get_num_threads()} threads): "
          f"{tracer.n_tokens} tokens, subject {tracer.subject_range}, {len(layers)} layers, "
          f"kinds {kinds}, {args.samples} samples, nu={nu:.6g}")
    print(f"p_clean={tracer.p_clean:.6f} p_corrupt={tracer.p_corrupt:.6f}; "
          f"{len(jobs)} restorations x {args.samples} samples = {rows} rows")
    s0, s1 = tracer.subject_range
    noise = tracing.make_noise(args.samples, s1 - s0, lm.d_model, args.seed) * nu

    tic = time.perf_counter()
    fresh = tracing.CausalTracer(lm, args.prompt, args.subject, noise=nu, samples=args.samples,
                                 seed=args.seed)  # nothing cached: its own clean and noisy runs
    engine = fresh.scores(jobs, batch_size=args.batch_size, progress=True)
    t_engine = time.perf_counter() - tic

    tic = time.perf_counter()
    reference = causal_tracer_algorithm(lm, tracer.ids, tracer.subject_range, noise,
                                        tracer.answer_id, jobs)
    t_ref = time.perf_counter() - tic

    diff = float(np.abs(engine - reference).max())
    ceiling = exact_work_ceiling(lm, tracer.n_tokens, jobs)
    print(f"engine:        {t_engine:8.2f} s  ({rows / t_engine:7.1f} rows/s, batch "
          f"{args.batch_size})")
    print(f"causal-tracer: {t_ref:8.2f} s  ({rows / t_ref:7.1f} rows/s, full forwards, "
          "batches of 32)")
    print(f"speed-up: {t_ref / t_engine:.2f}x   largest |engine - causal-tracer| in p = {diff:.3g}")
    print(f"ceiling of any exact algorithm (multiply-adds it cannot skip): "
          f"{ceiling['ceiling']:.2f}x")
    write_result(Path(args.out).name.removesuffix(".json"), {
        "model": lm.name, "prompt": args.prompt, "subject": args.subject, "samples": args.samples,
        "kinds": kinds, "layers": layers, "rows": rows, "device": lm.device.type,
        "dtype": str(lm.dtype).removeprefix("torch."), "batch_size": args.batch_size,
        "seconds": {"engine": t_engine, "causal_tracer_algorithm": t_ref},
        "speedup": t_ref / t_engine, "max_abs_diff_prob": diff, "exact_work": ceiling})
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
