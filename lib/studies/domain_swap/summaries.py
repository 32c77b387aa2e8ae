"""Summaries of full_compute/<model>.json (notebook 02): bootstrap intervals, top vs bottom layers,
Spearman and the depth control; see :mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lib.studies.domain_swap.common import SIDES
from lib.studies.domain_swap.runs import PairRun
from lib.studies.domain_swap.scores import rank_layers, top_bottom
from lib.core.stats import partial_spearman, permutation_test, spearman, summarize


# --- summaries for full_compute/<model>.json ------------------------------------------------

def _stat(values, n_bootstrap, seed):
    return summarize(np.asarray(values, dtype=np.float64), n_bootstrap, seed)


def _effects(run: PairRun, kind: str, side: str) -> dict[str, np.ndarray]:
    """Per-prompt effects (n, C, L): KL and, with token sets, |Δ|."""
    out = {"kl": getattr(run, kind)[side]["kl"]}
    if run.base[side]:
        out["abs_delta"] = np.abs(run.delta(kind, side))
    return out


def _top_vs_bottom(run, kind, ci, top, bottom, n_bootstrap, n_permutations, seed):
    li = {l: j for j, l in enumerate(run.layers)}
    t_idx = [li[l] for l in top]
    b_idx = [li[l] for l in bottom]
    out = {"k": len(top), "top_layers": list(top), "bottom_layers": list(bottom)}
    for side, effects in _effects_by_side(run, kind).items():
        out[side] = {}
        for effect, arr in effects.items():
            out[side][effect] = _paired_comparison(
                arr[:, ci, t_idx].mean(axis=1), arr[:, ci, b_idx].mean(axis=1), n_bootstrap,
                n_permutations, seed, "mean(top-k layers) - mean(bottom-k layers)")
    return out


def _paired_comparison(top_vals, bot_vals, n_bootstrap, n_permutations, seed, what) -> dict:
    """Top vs bottom per prompt: both summaries, their difference, and the paired sign-flip
    permutation p-value (:func:`lib.core.stats.permutation_test`)."""
    test = permutation_test(top_vals, bot_vals, n_permutations, seed, paired=True)
    return {"top": _stat(top_vals, n_bootstrap, seed),
            "bottom": _stat(bot_vals, n_bootstrap, seed),
            "diff": _stat(top_vals - bot_vals, n_bootstrap, seed),
            "p_value": test["p_value"], "n_permutations": test["n_permutations"],
            "test": f"paired sign-flip permutation over prompts, two-sided, of {what}"}


def _effects_by_side(run: PairRun, kind: str) -> dict[str, dict[str, np.ndarray]]:
    """:func:`_effects` of both sides and of "both" (the two sides' mean per prompt)."""
    per_side = {side: _effects(run, kind, side) for side in SIDES}
    per_side["both"] = {e: (per_side[SIDES[0]][e] + per_side[SIDES[1]][e]) / 2
                        for e in per_side[SIDES[0]]}
    return per_side


def _depth_control(run, ci, scores_by_layer, top, bottom, n_bootstrap, n_permutations, seed):
    """Does separability predict the swap effect beyond depth and beyond how much the component
    matters at all? Per side and effect, over the layers that have a score:

    * ``partial_given_layer``: partial Spearman of separability and the per-layer mean swap
      effect given the layer index (:func:`lib.core.stats.partial_spearman`);
    * ``partial_given_zero``: the same given the per-layer mean zero-ablation effect;
    * ``ratio_to_zero``: Spearman of separability and mean swap / mean zero ablation per layer;
    * ``relative_top_vs_bottom``: per prompt, the share swap / (swap + zero) of each layer
      (0.5 where both are 0), averaged over the top-k and the bottom-k layers; paired sign-flip
      permutation test of top - bottom, as for the raw effects."""
    swap, zero = _effects_by_side(run, "swap"), _effects_by_side(run, "zero")
    layers = [l for l in run.layers if l in scores_by_layer]
    idx = [run.layers.index(l) for l in layers]
    sep = [scores_by_layer[l] for l in layers]
    li = {l: j for j, l in enumerate(run.layers)}
    t_idx, b_idx = [li[l] for l in top], [li[l] for l in bottom]
    out = {}
    for side, effects in swap.items():
        out[side] = {}
        for effect, arr in effects.items():
            s_arr, z_arr = arr[:, ci], zero[side][effect][:, ci]
            mean_s, mean_z = s_arr[:, idx].mean(0), z_arr[:, idx].mean(0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = mean_s / mean_z
                total = s_arr + z_arr
                share = np.where(total > 0, s_arr / np.where(total > 0, total, 1.0), 0.5)
            out[side][effect] = {
                "partial_given_layer": partial_spearman(sep, mean_s, layers),
                "partial_given_zero": partial_spearman(sep, mean_s, mean_z),
                "ratio_to_zero": spearman(sep, ratio),
                "relative_top_vs_bottom": _paired_comparison(
                    share[:, t_idx].mean(1), share[:, b_idx].mean(1), n_bootstrap,
                    n_permutations, seed, "the share swap / (swap + zero ablation), top-k "
                    "minus bottom-k layers")}
    return out


def _spearman_block(run, kind, ci, scores_by_layer):
    per_side = _effects_by_side(run, kind)
    layers = [l for l in run.layers if l in scores_by_layer]
    idx = [run.layers.index(l) for l in layers]
    x = [scores_by_layer[l] for l in layers]
    return {side: {e: spearman(x, arr[:, ci, idx].mean(axis=0)) for e, arr in effects.items()}
            for side, effects in per_side.items()}


def _per_layer(run: PairRun, kind: str, ci: int, layer_head, n_bootstrap: int, seed: int,
               has_masses: bool, store_per_prompt: bool) -> list[dict]:
    """Per-layer summaries of one kind of intervention (``swap`` or ``zero``) and component:
    KL and, with token sets, Δ per side; swaps also carry the masses before and after."""
    per_layer = []
    for li, l in enumerate(run.layers):
        entry = layer_head(l)
        entry["sides"] = {}
        for side in SIDES:
            after = getattr(run, kind)[side]
            s = {"kl": _stat(after["kl"][:, ci, li], n_bootstrap, seed)}
            if has_masses:
                s["delta"] = _stat(run.delta(kind, side)[:, ci, li], n_bootstrap, seed)
                if kind == "swap":
                    for m in ("mass_a", "mass_b"):
                        s[f"{m}_before"] = _stat(run.base[side][m], n_bootstrap, seed)
                        s[f"{m}_after"] = _stat(after[m][:, ci, li], n_bootstrap, seed)
            if store_per_prompt:
                s["per_prompt"] = {"kl": after["kl"][:, ci, li]}
                if has_masses:
                    s["per_prompt"]["delta"] = run.delta(kind, side)[:, ci, li]
            entry["sides"][side] = s
        per_layer.append(entry)
    return per_layer


def summarize_pair(run: PairRun, layer_scores: dict[str, dict[int, float]], k: int,
                   n_bootstrap: int = 2000, n_permutations: int = 10000, seed: int = 0,
                   token_set_sizes: dict | None = None, store_per_prompt: bool = False) -> dict:
    """The JSON unit of one pair in ``full_compute/<model>.json`` (schema in the module
    docstring). ``layer_scores[component]`` = ``{layer: separability score}``."""
    out: dict[str, Any] = {  # JSON payload
        "domains": list(run.domains), "n_prompts": run.n, "layers": list(run.layers),
        "token_set_sizes": token_set_sizes or {}, "layer_ranking": {}, "top_layers": {},
        "bottom_layers": {}, "swap": {}, "zero_ablation": {}, "injection": {}}
    has_masses = bool(run.base[SIDES[0]])
    for ci, comp in enumerate(run.components):
        scores = layer_scores[comp]
        ranking = rank_layers(scores, run.layers)
        top, bottom = top_bottom(ranking, k)
        out["layer_ranking"][comp] = ranking
        out["top_layers"][comp] = top
        out["bottom_layers"][comp] = bottom
        rank_of = {l: r for r, l in enumerate(ranking)}

        def layer_head(l):
            return {"layer": l, "score": scores.get(l), "rank": rank_of.get(l),
                    "group": "top" if l in top else "bottom" if l in bottom else "middle"}

        per_layer = _per_layer(run, "swap", ci, layer_head, n_bootstrap, seed, has_masses,
                               store_per_prompt)
        out["swap"][comp] = {
            "per_layer": per_layer,
            "top_vs_bottom": _top_vs_bottom(run, "swap", ci, top, bottom, n_bootstrap,
                                            n_permutations, seed),
            "spearman": _spearman_block(run, "swap", ci, scores)}
        if run.zero:
            zl = _per_layer(run, "zero", ci, layer_head, n_bootstrap, seed, has_masses, False)
            out["zero_ablation"][comp] = {"per_layer": zl,
                                          "spearman": _spearman_block(run, "zero", ci, scores)}
            out["swap"][comp]["depth_control"] = _depth_control(
                run, ci, scores, top, bottom, n_bootstrap, n_permutations, seed)
        if run.inject and comp in run.inject_layers:
            sides = {}
            for side in SIDES:
                rows = []
                for ai, alpha in enumerate(run.alphas):
                    r = {"alpha": alpha,
                         "kl": _stat(run.inject[side]["kl"][:, ci, ai], n_bootstrap, seed)}
                    if has_masses:
                        ma = run.inject[side]["mass_a"][:, ci, ai]
                        mb = run.inject[side]["mass_b"][:, ci, ai]
                        before = run.base[side]["mass_b"] - run.base[side]["mass_a"]
                        r["mass_a"] = _stat(ma, n_bootstrap, seed)
                        r["mass_b"] = _stat(mb, n_bootstrap, seed)
                        r["bias"] = _stat(mb - ma, n_bootstrap, seed)
                        r["delta"] = _stat(mb - ma - before, n_bootstrap, seed)
                    rows.append(r)
                sides[side] = rows
            out["injection"][comp] = {"layer": run.inject_layers[comp], "alphas": run.alphas,
                                      "vector_norm": run.inject_norms[comp],
                                      "layer_choice": "given", "sides": sides}
    return out
