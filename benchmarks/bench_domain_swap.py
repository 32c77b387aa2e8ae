"""Benchmark: notebook 02's swaps on the engine vs the seed's algorithm (a script, not a test).

    python benchmarks/bench_domain_swap.py                      # smollm2-135m, cpp_python, all pairs
    python benchmarks/bench_domain_swap.py --n-prompts 10

Both sides run in this process on the same model and prompt pairs: every layer, both
components (attention and MLP output), both directions (B's last-token activation into A's
run and A's into B's), per-prompt KL and token-set masses.

* ``seed's algorithm`` (the seed notebook's ``cross_swap_verbose``): for every (prompt pair,
  component, layer) one unbatched full forward to capture A, one to capture B, one baseline
  each and one swapped run each;
* ``engine``: :func:`lib.studies.domain_swap.run_pair` on :mod:`lib.core.engine`.

Prints both times, the ratio and the largest differences, and writes them to
``benchmarks/results/domain_swap.json``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from _common import timed, write_result
from lib.studies import domain_swap as ds
from lib.core.interventions import Intervention
from lib.core.hooks import capture, patch
from lib.core.models import load_model
from lib.core.prompts import load_pairs
from lib.core.sites import site_name


@torch.no_grad()
def seed_algorithm(lm, pairs, layers, components, token_ids) -> dict:
    """Per side: kl, mass_a, mass_b of shape (n, components, layers), and base masses (n,)."""
    ids_a, ids_b = (torch.tensor(t, device=lm.device) for t in token_ids)
    n = len(pairs)
    out = {side: {k: np.zeros((n, len(components), len(layers))) for k in ("kl", "mass_a", "mass_b")}
           for side in ds.SIDES}
    base_mass = {side: {k: np.zeros(n) for k in ("mass_a", "mass_b")} for side in ds.SIDES}

    def last_logits(ids):
        return lm.model(input_ids=ids).logits[:, -1].float()

    for i in range(n):
        ids = [lm.tokenize(pairs.a[i]), lm.tokenize(pairs.b[i])]
        for ci, c in enumerate(components):
            for li, layer in enumerate(layers):
                site = site_name(c, layer)
                captured = []
                for d in range(2):
                    with capture(lm, [site]) as cache:
                        lm.model(input_ids=ids[d])
                    captured.append(cache[site][:, -1:])
                for side in ds.SIDES:
                    d = 0 if side == "b_into_a" else 1
                    last = ids[d].shape[1] - 1
                    base = last_logits(ids[d])
                    with patch(lm, [Intervention(site, positions=(last,), value=captured[1 - d])]):
                        swapped = last_logits(ids[d])
                    m = ds._row_metrics(torch.cat([base, swapped]), ids_a, ids_b)
                    for k in ("kl", "mass_a", "mass_b"):
                        out[side][k][i, ci, li] = float(m[k][1])
                    for k in ("mass_a", "mass_b"):
                        base_mass[side][k][i] = float(m[k][0])
    return {"swap": out, "base": base_mass}


def token_ids(lm, pairs):
    """The model's token sets from notebook 01 when present, else two fixed id ranges."""
    try:
        sets = ds.load_token_sets(lm.name)
        a, b = pairs.domains
        return (ds.token_set_ids(sets, pairs.name, a), ds.token_set_ids(sets, pairs.name, b))
    except (FileNotFoundError, ValueError):
        return list(range(100, 150)), list(range(150, 200))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", default="cpp_python.json", help="prompt file in prompt_set/")
    parser.add_argument("--n-prompts", type=int, default=0, help="0 means every pair of the file")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="engine rows per forward pass (notebook 02's BATCH_SIZE default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    pairs_all = load_pairs(args.pairs)
    pairs = pairs_all.head(args.n_prompts or None)
    layers = list(range(lm.n_layers))
    components = list(ds.COMPONENTS)
    ids = token_ids(lm, pairs)
    n = len(pairs)
    print(f"{lm.name}: {pairs.name}, {n} of {len(pairs_all)} prompt pairs x {len(layers)} layers "
          f"x {len(components)} components x 2 directions; {torch.get_num_threads()} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}")
    ds.run_pair(lm, pairs.head(1), layers[:2], token_ids=ids, progress=False)  # warm-up
    fast, t_fast = timed(lambda: ds.run_pair(lm, pairs, layers, components, token_ids=ids,
                                             batch_size=args.batch_size, progress=False))
    slow, t_slow = timed(lambda: seed_algorithm(lm, pairs, layers, components, ids))
    diffs = {k: max(float(np.abs(fast.swap[s][k] - slow["swap"][s][k]).max()) for s in ds.SIDES)
             for k in ("kl", "mass_a", "mass_b")}
    diffs["base_mass"] = max(float(np.abs(fast.base[s][k] - slow["base"][s][k]).max())
                             for s in ds.SIDES for k in ("mass_a", "mass_b"))
    print(f"seed's algorithm: {t_slow:8.1f} s   engine: {t_fast:8.2f} s   speed-up "
          f"{t_slow / t_fast:.1f}x")
    print("largest |engine - seed|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    write_result("domain_swap", {
        "model": lm.name, "pairs": pairs.name, "n_prompt_pairs": n, "layers": len(layers),
        "batch_size": args.batch_size,
        "components": components, "seconds": {"seed_algorithm": t_slow, "engine": t_fast},
        "speedup": t_slow / t_fast, "max_abs_diff": diffs})
    return 0 if max(diffs.values()) <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
