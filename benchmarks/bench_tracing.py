"""Benchmark: batched causal tracing (lib.tracing) vs one forward per (noise sample, restoration).

    python benchmarks/bench_tracing.py                     # smollm2-135m, 3 kinds, 10 samples
    python benchmarks/bench_tracing.py --layers 0,10,20    # fewer centre layers (faster)

Both paths trace the same restorations with the same common-random-number noise (Meng et al.
2022, ROME causal tracing): the batched path runs many (restoration, sample) rows per forward
pass, each from its restored token on, on top of its sample's corrupted key/value prefix, and
computes only the last position's logits; the naive loop runs one full forward per row. The
script prints both times, the ratio and the largest difference between the two score grids.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from lib import tracing
from lib.models import load_model


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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    lm = load_model(args.model, args.device, args.dtype)
    nu = tracing.noise_level(lm, "auto")
    tracer = tracing.CausalTracer(lm, args.prompt, args.subject, noise=nu, samples=args.samples,
                                  seed=args.seed)
    layers = (list(range(lm.n_layers)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    tokens = list(range(tracer.n_tokens))  # every row, also any before the subject
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

    def sync():
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    tracer.scores(jobs[:2], batch_size=args.batch_size)  # warm-up (and prefix caches)
    tracer._prefix.clear()
    sync()
    tic = time.perf_counter()
    batched = tracer.scores(jobs, batch_size=args.batch_size, progress=True)
    sync()
    t_batched = time.perf_counter() - tic

    tic = time.perf_counter()
    naive = tracer.scores_naive(jobs, progress=True)
    sync()
    t_naive = time.perf_counter() - tic

    diff = float(np.abs(batched - naive).max())
    print(f"batched: {t_batched:8.2f} s  ({rows / t_batched:7.1f} rows/s, batch {args.batch_size})")
    print(f"naive:   {t_naive:8.2f} s  ({rows / t_naive:7.1f} rows/s, one forward per row)")
    print(f"speed-up: {t_naive / t_batched:.1f}x   largest |batched - naive| = {diff:.3g}")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
