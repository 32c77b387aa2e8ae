"""Figures of the domain-separation study (notebook 03): top vs bottom layers, effect vs
separability, KL and bias curves per layer, concept injection, and cross-model comparisons.

The numbers come from ``full_compute/<model>.json`` written by notebook 02 (schema in
:mod:`lib.studies.domain_swap`); the intervention is the last-token cross-swap of attention / MLP outputs
between minimal domain pairs (interchange interventions, Geiger et al. 2021; activation
patching, Vig et al. 2020), the layer scores the separability metrics of notebook 00. Every plot
function takes the loaded JSON (or a dict of them), returns a plotnine ``ggplot`` and never
shows or saves it: the notebook displays it and calls :func:`lib.plots.save_figure`.
Error bars and ribbons are the 95 % bootstrap intervals stored in the JSON.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, element_text, facet_grid, facet_wrap, geom_col, geom_errorbar,
                      geom_hline, geom_line, geom_point, geom_ribbon, geom_text, ggplot, labs,
                      position_dodge, scale_y_log10, theme, theme_bw)

SIDE_LABELS = {"b_into_a": "B's activation in A's prompt", "a_into_b": "A's activation in B's prompt",
               "both": "mean of both sides"}
COMPONENT_LABELS = {"attn_out": "attention output", "mlp_out": "MLP output"}
EFFECT_LABELS = {"kl": "KL(base || swapped)", "abs_delta": "|Δ bias|", "delta": "Δ bias"}


def _components(values) -> pd.Categorical:
    """Component labels in a fixed order (attention before MLP)."""
    labels = [COMPONENT_LABELS.get(c, c) for c in values]
    order = list(COMPONENT_LABELS.values()) + sorted(set(labels) - set(COMPONENT_LABELS.values()))
    return pd.Categorical(labels, categories=order)


class NoResultsError(ValueError):
    """The results hold nothing that this figure can show."""


def _pairs(result: dict) -> dict:
    pairs = result.get("pairs") or {}
    if not pairs:
        raise NoResultsError(f"results of model {result.get('model')!r} hold no pairs; run "
                             "02_all_model_causal first")
    return pairs


def _side_label(side: str, domains) -> str:
    a, b = domains
    return {"b_into_a": f"{b} → {a} prompt", "a_into_b": f"{a} → {b} prompt"}.get(side, side)


def layer_frame(result: dict, kind: str = "swap") -> pd.DataFrame:
    """One row per (pair, component, layer, side, metric): mean, ci_low, ci_high, n, plus the
    layer's separability score, rank and group. ``kind`` is ``swap`` or ``zero_ablation``."""
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get(kind) or {}).items():
            for entry in block["per_layer"]:
                for side, metrics in entry["sides"].items():
                    for metric, stat in metrics.items():
                        if not isinstance(stat, dict) or "mean" not in stat:
                            continue
                        rows.append({"model": result.get("model"), "pair": pair,
                                     "component": comp, "layer": entry["layer"],
                                     "score": entry.get("score"), "rank": entry.get("rank"),
                                     "group": entry.get("group"), "side": side,
                                     "side_label": _side_label(side, data["domains"]),
                                     "metric": metric, "mean": stat["mean"],
                                     "ci_low": stat["ci_low"], "ci_high": stat["ci_high"],
                                     "n": stat["n"]})
    return pd.DataFrame(rows)


def top_bottom_frame(result: dict) -> pd.DataFrame:
    """One row per (pair, component, side, effect, group in top/bottom) with the mean over the
    group's layers (per prompt, then over prompts), its interval and the permutation p-value."""
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get("swap") or {}).items():
            tvb = block["top_vs_bottom"]
            for side in ("b_into_a", "a_into_b", "both"):
                for effect, vals in (tvb.get(side) or {}).items():
                    for group in ("top", "bottom"):
                        st = vals[group]
                        rows.append({"model": result.get("model"), "pair": pair,
                                     "component": comp, "side": side, "effect": effect,
                                     "group": group, "k": tvb["k"],
                                     "layers": ",".join(map(str, tvb[f"{group}_layers"])),
                                     "mean": st["mean"], "ci_low": st["ci_low"],
                                     "ci_high": st["ci_high"], "n": st["n"],
                                     "diff": vals["diff"]["mean"], "p_value": vals["p_value"]})
    return pd.DataFrame(rows)


def spearman_frame(result: dict, kind: str = "swap") -> pd.DataFrame:
    """One row per (pair, component, side, effect): Spearman rho, p-value and n of
    separability score vs mean effect across layers."""
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get(kind) or {}).items():
            for side, effects in block.get("spearman", {}).items():
                for effect, sp in effects.items():
                    rows.append({"model": result.get("model"), "pair": pair, "component": comp,
                                 "side": side, "effect": effect, "rho": sp["rho"],
                                 "p_value": sp["p_value"], "n": sp["n"]})
    return pd.DataFrame(rows)


def _fmt_p(p) -> str:
    if p is None or pd.isna(p):
        return "p = n/a"
    return f"p = {p:.2g}" if p >= 1e-3 else "p < 0.001"


def plot_layer_comparison(result: dict, component: str, pair: str):
    """The seed's ``attn_comparison`` / ``mlp_comparison``: KL and Δ bias of the swap on each
    of the top-k and bottom-k layers, grouped bars per side, 95 % bootstrap error bars."""
    data = _pairs(result).get(pair)
    if data is None or component not in (data.get("swap") or {}):
        raise NoResultsError(f"no swap results for pair {pair!r}, component {component!r}")
    df = layer_frame({"model": result.get("model"), "pairs": {pair: data}}, "swap")
    df = df[(df["component"] == component) & df["group"].isin(["top", "bottom"])
            & df["metric"].isin(["kl", "delta"])].copy()
    order = ([f"L{l}" for l in data["top_layers"][component]]
             + [f"L{l}" for l in data["bottom_layers"][component]])
    df["layer_label"] = pd.Categorical([f"L{l}" for l in df["layer"]], categories=order, ordered=True)
    top_name = f"top {len(data['top_layers'][component])} ({result.get('metric', 'score')})"
    bottom_name = f"bottom {len(data['bottom_layers'][component])}"
    df["group"] = pd.Categorical([top_name if g == "top" else bottom_name for g in df["group"]],
                                 categories=[top_name, bottom_name])
    df["metric"] = pd.Categorical([EFFECT_LABELS.get(m, m) for m in df["metric"]],
                                  categories=[EFFECT_LABELS["kl"], EFFECT_LABELS["delta"]])
    dodge = position_dodge(width=0.8)
    return (ggplot(df, aes("layer_label", "mean", fill="side_label"))
            + geom_col(position=dodge, width=0.75)
            + geom_errorbar(aes(ymin="ci_low", ymax="ci_high"), position=dodge, width=0.3)
            + geom_hline(yintercept=0, linetype="dashed", size=0.3)
            + facet_grid("metric ~ group", scales="free")
            + labs(x="layer (ranked by separability)", y="mean over prompts (95 % CI)",
                   fill="swap", title=f"{result.get('model')} · {pair} · "
                                      f"{COMPONENT_LABELS.get(component, component)}")
            + theme_bw() + theme(legend_position="bottom"))


def plot_top_vs_bottom(result: dict, component: str, effects=("kl", "abs_delta")):
    """Mean effect on the top-k vs the bottom-k layers per pair and side, with 95 % intervals
    and the paired permutation p-value of the difference."""
    df = top_bottom_frame(result)
    if df.empty:
        raise NoResultsError("no top-vs-bottom results")
    df = df[(df["component"] == component) & df["effect"].isin(effects)].copy()
    if df.empty:
        raise NoResultsError(f"no top-vs-bottom results for component {component!r}")
    df["side"] = pd.Categorical([SIDE_LABELS[s] for s in df["side"]],
                                categories=[SIDE_LABELS[s] for s in ("b_into_a", "a_into_b", "both")])
    df["effect"] = pd.Categorical([EFFECT_LABELS[e] for e in df["effect"]],
                                  categories=[EFFECT_LABELS[e] for e in effects])
    df["group"] = pd.Categorical(df["group"], categories=["top", "bottom"])
    labels = (df.groupby(["pair", "side", "effect"], observed=True)
              .agg(y=("ci_high", "max"), p=("p_value", "first")).reset_index())
    labels["text"] = [_fmt_p(p) for p in labels["p"]]
    dodge = position_dodge(width=0.8)
    return (ggplot(df, aes("pair", "mean", fill="group"))
            + geom_col(position=dodge, width=0.75)
            + geom_errorbar(aes(ymin="ci_low", ymax="ci_high"), position=dodge, width=0.3)
            + geom_text(aes("pair", "y", label="text"), data=labels, inherit_aes=False,
                        va="bottom", size=7)
            + facet_grid("effect ~ side", scales="free_y")
            + labs(x="domain pair", y="mean over top / bottom layers (95 % CI)",
                   fill=f"layers by {result.get('metric', 'score')}",
                   title=f"{result.get('model')} · {COMPONENT_LABELS.get(component, component)}"
                         " swap: top vs bottom layers")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom"))


def plot_effect_vs_separability(result: dict, effect: str = "kl", side: str = "both"):
    """Per-layer mean swap effect against the layer's separability score, per pair and
    component, with the Spearman correlation in each panel."""
    df = layer_frame(result, "swap")
    if df.empty:
        raise NoResultsError("no per-layer swap results")
    if side == "both":
        metric = "kl" if effect == "kl" else "delta"
        sub = df[df["metric"] == metric].copy()
        if effect == "abs_delta":
            sub["mean"] = sub["mean"].abs()
        sub = (sub.groupby(["pair", "component", "layer", "score", "group"], observed=True)
               ["mean"].mean().reset_index())
    else:
        metric = "kl" if effect == "kl" else "delta"
        sub = df[(df["metric"] == metric) & (df["side"] == side)].copy()
        if effect == "abs_delta":
            sub["mean"] = sub["mean"].abs()
    sub = sub.dropna(subset=["score"])
    if sub.empty:
        raise NoResultsError("no layer has a separability score")
    sp = spearman_frame(result)
    sp = sp[(sp["side"] == side) & (sp["effect"] == effect)].copy()
    sp["text"] = [f"ρ = {r:.2f}, {_fmt_p(p)}" if r is not None and not pd.isna(r) else "ρ = n/a"
                  for r, p in zip(sp["rho"], sp["p_value"])]
    pos = sub.groupby(["pair", "component"]).agg(x=("score", "min"), y=("mean", "max")).reset_index()
    sp = sp.merge(pos, on=["pair", "component"], how="inner")
    sp["component"] = _components(sp["component"])
    sub["component"] = _components(sub["component"])
    sub["group"] = pd.Categorical(sub["group"], categories=["top", "middle", "bottom"])
    n_pairs = sub["pair"].nunique()
    y_label = EFFECT_LABELS.get(effect, effect) + (" (mean of both sides)" if side == "both" else "")
    return (ggplot(sub, aes("score", "mean", color="group"))
            + geom_point(size=2, alpha=0.85)
            + geom_text(aes("x", "y", label="text"), data=sp, inherit_aes=False, ha="left",
                        va="top", size=7)
            + facet_wrap("~ component + pair", scales="free", ncol=n_pairs)
            + labs(x=f"separability ({result.get('metric', 'score')})", y=y_label, color="layer group",
                   title=f"{result.get('model')}: swap effect vs separability per layer")
            + theme_bw() + theme(legend_position="bottom"))


def plot_kl_curves(result: dict, log_scale: bool = True):
    """KL per layer: the swap on both sides and zero ablation on both domains' prompts, with
    95 % bootstrap ribbons, per pair (columns) and component (rows)."""
    frames = []
    swap = layer_frame(result, "swap")
    if swap.empty:
        raise NoResultsError("no per-layer swap results")
    swap = swap[swap["metric"] == "kl"].copy()
    swap["series"] = ["swap: " + SIDE_LABELS[s] for s in swap["side"]]
    frames.append(swap)
    zero = layer_frame(result, "zero_ablation")
    if not zero.empty:
        zero = zero[zero["metric"] == "kl"].copy()
        zero["series"] = ["zero ablation: " + ("A's prompt" if s == "b_into_a" else "B's prompt")
                          for s in zero["side"]]
        frames.append(zero)
    df = pd.concat(frames, ignore_index=True)
    df["component"] = _components(df["component"])
    if log_scale:  # log axes need positive values; KL can round to ~0
        floor = 1e-8
        for col in ("mean", "ci_low", "ci_high"):
            df[col] = df[col].clip(lower=floor)
    fig = (ggplot(df, aes("layer", "mean", color="series", fill="series"))
           + geom_ribbon(aes(ymin="ci_low", ymax="ci_high"), alpha=0.15, color="none")
           + geom_line() + geom_point(size=0.8)
           + facet_grid("component ~ pair", scales="free_y")
           + labs(x="layer", y="KL(base || intervened)", color="", fill="",
                  title=f"{result.get('model')}: KL per layer (last-token interventions)")
           + theme_bw() + theme(legend_position="bottom"))
    return fig + scale_y_log10() if log_scale else fig


def plot_bias_curves(result: dict):
    """Δ bias per layer of the swap on both sides (positive = toward B's tokens)."""
    df = layer_frame(result, "swap")
    if df.empty:
        raise NoResultsError("no per-layer swap results")
    df = df[df["metric"] == "delta"].copy()
    if df.empty:
        raise NoResultsError("no Δ bias in the results (no token sets?)")
    df["series"] = [SIDE_LABELS[s] for s in df["side"]]
    df["component"] = _components(df["component"])
    return (ggplot(df, aes("layer", "mean", color="series", fill="series"))
            + geom_ribbon(aes(ymin="ci_low", ymax="ci_high"), alpha=0.15, color="none")
            + geom_line() + geom_point(size=0.8)
            + geom_hline(yintercept=0, linetype="dashed", size=0.3)
            + facet_grid("component ~ pair", scales="free_y")
            + labs(x="layer", y="Δ = (mass_B − mass_A)_after − (mass_B − mass_A)_before",
                   color="swap", fill="swap",
                   title=f"{result.get('model')}: bias shift per layer")
            + theme_bw() + theme(legend_position="bottom"))


def injection_frame(result: dict) -> pd.DataFrame:
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get("injection") or {}).items():
            for side, items in block["sides"].items():
                for item in items:
                    for metric in ("bias", "kl", "mass_a", "mass_b", "delta"):
                        if metric in item:
                            st = item[metric]
                            rows.append({"pair": pair, "component": comp,
                                         "layer": block["layer"], "side": side,
                                         "alpha": item["alpha"], "metric": metric,
                                         "mean": st["mean"], "ci_low": st["ci_low"],
                                         "ci_high": st["ci_high"]})
    return pd.DataFrame(rows)


def plot_injection(result: dict, metric: str = "delta"):
    """Concept-vector injection against α, per side: ``metric`` is ``delta`` (default: the
    shift of mass_B − mass_A from the clean run), ``bias`` (mass_B − mass_A), ``kl``,
    ``mass_a`` or ``mass_b``."""
    df = injection_frame(result)
    if df.empty:
        raise NoResultsError("no injection results")
    df = df[df["metric"] == metric].copy()
    df["series"] = [("+α(μ_B − μ_A) in A's prompt" if s == "b_into_a" else
                     "+α(μ_A − μ_B) in B's prompt") for s in df["side"]]
    df["component"] = [f"{COMPONENT_LABELS.get(c, c)} (L{l})"
                       for c, l in zip(df["component"], df["layer"])]
    return (ggplot(df, aes("alpha", "mean", color="series", fill="series"))
            + geom_ribbon(aes(ymin="ci_low", ymax="ci_high"), alpha=0.15, color="none")
            + geom_line() + geom_point()
            + facet_wrap("~ pair + component", scales="free_y", ncol=4)
            + geom_hline(yintercept=0, linetype="dashed", size=0.3)
            + labs(x="α", y={"bias": "mass_B − mass_A",
                             "delta": "Δ (mass_B − mass_A) vs clean run"}.get(metric, metric),
                   color="", fill="",
                   title=f"{result.get('model')}: concept-vector injection")
            + theme_bw() + theme(legend_position="bottom"))


def _all_models_frame(results: dict[str, dict], frame, effect: str, side: str,
                      what: str) -> pd.DataFrame:
    """``frame(result)`` of every model with results, pooled, for one effect and side."""
    frames = [frame(r) for r in results.values() if r.get("pairs")]
    if not frames:
        raise NoResultsError("no model has full_compute results; run 02_all_model_causal")
    df = pd.concat(frames, ignore_index=True)
    df = df[(df["effect"] == effect) & (df["side"] == side)].copy()
    if df.empty:
        raise NoResultsError(f"no {what} for effect {effect!r}, side {side!r}")
    return df


def plot_all_models(results: dict[str, dict], effect: str = "kl", side: str = "both"):
    """Top vs bottom layers for every model with results: mean effect per pair, component
    and model, with 95 % intervals."""
    df = _all_models_frame(results, top_bottom_frame, effect, side, "results")
    df["group"] = pd.Categorical(df["group"], categories=["top", "bottom"])
    df["component"] = _components(df["component"])
    dodge = position_dodge(width=0.8)
    return (ggplot(df, aes("model", "mean", fill="group"))
            + geom_col(position=dodge, width=0.75)
            + geom_errorbar(aes(ymin="ci_low", ymax="ci_high"), position=dodge, width=0.3)
            + facet_grid("component ~ pair", scales="free_y")
            + labs(x="model", y=f"{EFFECT_LABELS.get(effect, effect)} ({SIDE_LABELS[side]})",
                   fill="layers", title="Swap effect on the most vs least separable layers")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom"))


def plot_spearman_all_models(results: dict[str, dict], effect: str = "kl", side: str = "both"):
    """Spearman ρ between separability and swap effect across layers, per model and pair."""
    df = _all_models_frame(results, spearman_frame, effect, side, "Spearman results")
    df["component"] = _components(df["component"])
    # rho is undefined (None) with fewer than three layers: drawn as 0 and marked n/a
    df["star"] = ["n/a" if r is None or pd.isna(r) else "*" if p is not None and p < 0.05 else ""
                  for r, p in zip(df["rho"], df["p_value"])]
    df["rho"] = pd.to_numeric(df["rho"]).fillna(0.0)
    dodge = position_dodge(width=0.8)
    return (ggplot(df, aes("pair", "rho", fill="model"))
            + geom_col(position=dodge, width=0.75)
            + geom_text(aes(label="star"), position=dodge, va="bottom", size=10)
            + geom_hline(yintercept=0, size=0.3)
            + facet_wrap("~ component")
            + labs(x="domain pair", y="Spearman ρ (separability vs effect)", fill="model",
                   title=f"Does separability predict the causal effect? ({EFFECT_LABELS.get(effect, effect)}; * p < 0.05)")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom"))


def summary_table(result: dict) -> pd.DataFrame:
    """One row per (pair, component): top and bottom layers, mean KL and |Δ| on each group
    (both sides averaged), their permutation p-values and the Spearman ρ across layers."""
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get("swap") or {}).items():
            both = block["top_vs_bottom"].get("both", {})
            sp = block.get("spearman", {}).get("both", {})
            row = {"pair": pair, "component": comp,
                   "top_layers": ",".join(map(str, data["top_layers"][comp])),
                   "bottom_layers": ",".join(map(str, data["bottom_layers"][comp])),
                   "n": data["n_prompts"]}
            for effect in ("kl", "abs_delta"):
                if effect in both:
                    row[f"{effect}_top"] = both[effect]["top"]["mean"]
                    row[f"{effect}_bottom"] = both[effect]["bottom"]["mean"]
                    row[f"{effect}_p"] = both[effect]["p_value"]
                if effect in sp:
                    row[f"{effect}_rho"] = sp[effect]["rho"]
                    row[f"{effect}_rho_p"] = sp[effect]["p_value"]
            rows.append(row)
    return pd.DataFrame(rows)


# --- depth control (notebooks 02 and 03) -----------------------------------------------------

DEPTH_TESTS = {
    "spearman": "Spearman ρ, separability vs swap effect",
    "partial_given_layer": "partial ρ given the layer index",
    "partial_given_zero": "partial ρ given zero ablation",
    "ratio_to_zero": "ρ with swap / zero ablation",
}


def depth_control_frame(result: dict, effect: str = "kl", side: str = "both") -> pd.DataFrame:
    """One row per (pair, component, test): the estimate and p-value of the raw top-vs-bottom
    difference, the raw Spearman ρ and each depth control of notebook 02 (``DEPTH_TESTS``, and
    ``relative_top_vs_bottom``: top - bottom of the share swap / (swap + zero ablation))."""
    rows = []
    for pair, data in _pairs(result).items():
        for comp, block in (data.get("swap") or {}).items():
            base = {"model": result.get("model"), "pair": pair, "component": comp}
            raw = block["top_vs_bottom"].get(side, {}).get(effect)
            if raw:
                rows.append({**base, "test": "top_vs_bottom", "estimate": raw["diff"]["mean"],
                             "p_value": raw["p_value"], "n": raw["diff"]["n"]})
            sp = block.get("spearman", {}).get(side, {}).get(effect)
            if sp:
                rows.append({**base, "test": "spearman", "estimate": sp["rho"],
                             "p_value": sp["p_value"], "n": sp["n"]})
            dc = block.get("depth_control", {}).get(side, {}).get(effect, {})
            for test, st in dc.items():
                if test == "relative_top_vs_bottom":
                    rows.append({**base, "test": test, "estimate": st["diff"]["mean"],
                                 "p_value": st["p_value"], "n": st["diff"]["n"]})
                else:
                    rows.append({**base, "test": test, "estimate": st["rho"],
                                 "p_value": st["p_value"], "n": st["n"]})
    return pd.DataFrame(rows)


def claim_table(result: dict, effect: str = "kl", side: str = "both",
                alpha: float = 0.05) -> pd.DataFrame:
    """Per pair and component, whether "the most separable layers matter more" holds: raw (top
    > bottom, and ρ > 0), given depth (partial ρ given the layer index > 0) and relative to zero
    ablation (top > bottom in the share swap / (swap + zero)), each at ``alpha``."""
    df = depth_control_frame(result, effect, side)
    if df.empty:
        raise NoResultsError("no swap results")
    df["holds"] = (df["estimate"] > 0) & (df["p_value"] < alpha)
    keys = ["model", "pair", "component"]
    frames = [df.pivot_table(index=keys, columns="test", values=value, aggfunc="first",
                             dropna=False).add_suffix(suffix)
              for value, suffix in (("holds", ""), ("estimate", "_est"), ("p_value", "_p"))]
    out = frames[0].join(frames[1:]).reset_index()
    has = [c for c in ("top_vs_bottom", "partial_given_layer", "relative_top_vs_bottom")
           if c in out]
    out["survives_depth_control"] = out[has].astype(bool).all(axis=1) if has else False
    return out


def plot_depth_control(result: dict, effect: str = "kl", side: str = "both"):
    """The raw Spearman ρ of separability and swap effect beside the depth-controlled ones
    (given the layer index, given zero ablation, and against swap / zero ablation), per pair
    (x) and component (panels); the shape marks p < 0.05."""
    df = depth_control_frame(result, effect, side)
    df = df[df["test"].isin(DEPTH_TESTS)].dropna(subset=["estimate"]).copy()
    if df.empty:
        raise NoResultsError("no depth-control correlation is defined: they need at least four "
                             "layers with a separability score (and a result file of "
                             "02_all_model_causal that has them)")
    df["test"] = pd.Categorical([DEPTH_TESTS[t] for t in df["test"]],
                                categories=list(DEPTH_TESTS.values()))
    df["significant"] = pd.Categorical(
        ["p < 0.05" if p is not None and p < 0.05 else "p ≥ 0.05" for p in df["p_value"]],
        categories=["p < 0.05", "p ≥ 0.05"])
    df["component"] = _components(df["component"])
    dodge = position_dodge(width=0.7)
    return (ggplot(df, aes("pair", "estimate", color="test", shape="significant"))
            + geom_hline(yintercept=0, linetype="dashed", color="grey")
            + geom_point(position=dodge, size=3)
            + facet_wrap("~ component")
            + labs(x="", y="rank correlation with separability", color="", shape="",
                   title=f"{result.get('model')}: separability vs {EFFECT_LABELS.get(effect, effect)}"
                         ", raw and with depth held fixed")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom", legend_box="vertical"))
