"""Speed of notebook 02's swap computation against the seed's algorithm (a script, not a test).

    python benchmarks/bench_domain_swap.py                       # smollm2-135m, cpp_python, 10 prompts
    python benchmarks/bench_domain_swap.py --n-prompts 20 --threads 1 --full

Both run in this process on the same model and the same prompt pairs: every layer, both
components (attention and MLP output), both directions (B's last-token activation into A's run
and A's into B's), token-set masses and KL per prompt.

* batched (``lib.domain_swap.run_pair``): per prompt, the key/value cache of all tokens but the
  last is computed once; one single-token forward gives the clean logits and every layer's
  activations; all (layer x component) swaps run as rows of single-token forwards.
* naive (``lib.domain_swap.run_pair_naive``, the seed's ``cross_swap_verbose``): for every
  (prompt, component, layer) one unbatched full forward to capture A, one to capture B, one
  baseline each and one swapped run each.

Prints both times (total and per prompt pair), the ratio, and the largest absolute difference of
the per-prompt KL and token-set masses. ``--full`` also times the batched path on every prompt
of the file and extrapolates the naive time from its per-prompt time (labelled as such).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from lib import domain_swap as ds
from lib.models import load_model
from lib.prompts import load_pairs


def token_ids(lm, pairs):
    """The model's token sets from notebook 01 when present, else two fixed id ranges."""
    try:
        sets = ds.load_token_sets(lm.name)
        a, b = pairs.domains
        return ((ds.token_set_ids(sets, pairs.name, a), ds.token_set_ids(sets, pairs.name, b)),
                "token_sets/ (notebook 01)")
    except (FileNotFoundError, ValueError):
        return (list(range(100, 150)), list(range(150, 200))), "ids 100-149 / 150-199 (no token set file)"


def max_diff(fast, slow):
    out = {}
    for key in ("kl", "mass_a", "mass_b"):
        out[key] = max(float(np.abs(fast.swap[s][key] - slow.swap[s][key]).max()) for s in ds.SIDES)
    out["base mass"] = max(float(np.abs(fast.base[s][k] - slow.base[s][k]).max())
                           for s in ds.SIDES for k in ("mass_a", "mass_b"))
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", default="cpp_python.json", help="prompt file in prompt_set/")
    parser.add_argument("--n-prompts", type=int, default=10, help="pairs timed with both paths")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--full", action="store_true",
                        help="also time the batched path on all pairs of the file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    pairs_all = load_pairs(args.pairs)
    pairs = pairs_all.head(args.n_prompts)
    layers = list(range(lm.n_layers))
    ids, ids_source = token_ids(lm, pairs)
    n = len(pairs)
    print(f"model {lm.name} ({lm.n_layers} layers, {lm.dtype}, {lm.device}); torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print(f"pair file {pairs.name}: {n} of {len(pairs_all)} prompt pairs; {len(layers)} layers x 2 "
          f"components x 2 directions = {len(layers) * 4} swaps per prompt pair; token sets: {ids_source}")

    # warm-up (first-call allocations) on one pair, both paths
    ds.run_pair(lm, pairs.head(1), layers[:2], token_ids=ids, progress=False)
    ds.run_pair_naive(lm, pairs.head(1), layers[:1], token_ids=ids)

    fast, t_fast = timed(lambda: ds.run_pair(lm, pairs, layers, token_ids=ids,
                                             batch_size=args.batch_size, progress=False))
    slow, t_slow = timed(lambda: ds.run_pair_naive(lm, pairs, layers, token_ids=ids))
    diffs = max_diff(fast, slow)
    print(f"\nsame {n} prompt pairs, measured:")
    print(f"  batched (KV prefix once, swaps as single-token rows): {t_fast:8.2f} s  "
          f"({t_fast / n:.3f} s per prompt pair)")
    print(f"  naive (seed: 6 full forwards per layer x component):  {t_slow:8.2f} s  "
          f"({t_slow / n:.3f} s per prompt pair)")
    print(f"  speed-up: {t_slow / t_fast:.1f}x")
    print("  largest |batched - naive| over prompts, layers, components, sides: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    kl_mean = float(np.mean([fast.swap[s]['kl'].mean() for s in ds.SIDES]))
    print(f"  (mean KL of a swap: {kl_mean:.3e}, so the differences are round-off)")

    if args.full and len(pairs_all) > n:
        _, t_all = timed(lambda: ds.run_pair(lm, pairs_all, layers, token_ids=ids,
                                             batch_size=args.batch_size, progress=False))
        est = t_slow / n * len(pairs_all)
        print(f"\nall {len(pairs_all)} prompt pairs:")
        print(f"  batched, measured:                 {t_all:8.1f} s ({t_all / len(pairs_all):.3f} s per pair)")
        print(f"  naive, EXTRAPOLATED from {n} pairs: {est:8.1f} s")
        print(f"  speed-up (measured vs extrapolated): {est / t_all:.1f}x")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other jobs on the machine slow both paths)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
