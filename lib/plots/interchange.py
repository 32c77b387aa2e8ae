"""Figures of the interchange-intervention grid (notebook 05): the tutorial's heatmap and bar
chart, and attribution patching next to exact patching.

The numbers come from :func:`lib.studies.interchange.run_interchange` (pyvene's "Interchange
Intervention" tutorial, Wu, Arora et al. 2024; attribution patching, Nanda 2023 and Syed et al.
2023). Every plot function takes the JSON-ready payload, returns a plotnine ``ggplot`` and never
shows or saves it: the notebook displays it and calls :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

from lib.studies.interchange import ATTRIBUTION_KEYS, RECORD_KEYS
from lib.core.parsers import parse_positions


def records_frame(payload: dict):
    """The records as a pandas DataFrame with ordered ``node`` and ``token`` categories and a
    ``position_label`` column (``"3: Spain|Italy"``)."""
    import pandas as pd

    df = pd.DataFrame(payload["records"], columns=list(RECORD_KEYS))
    df["node"] = pd.Categorical(df["node"], categories=payload["nodes"], ordered=True)
    df["token"] = pd.Categorical(df["token"], categories=[a["token"] for a in payload["answers"]],
                                 ordered=True)
    labels = position_labels(payload)
    df["position_label"] = pd.Categorical([labels[p] for p in df["position"]],
                                          categories=[labels[p] for p in payload["positions"]],
                                          ordered=True)
    return df


def position_labels(payload: dict) -> dict[int, str]:
    """``{position: "p: token"}``; where base and source differ, ``"p: base|source"``."""
    out = {}
    for p in payload["positions"]:
        b, s = payload["base"]["tokens"][p], payload["source"]["tokens"][p]
        out[p] = f"{p}: {b.strip() or repr(b)}" + ("" if b == s else f"|{s.strip() or repr(s)}")
    return out


def plot_heatmap(payload: dict, title: str = ""):
    """Tutorial plot 1: probability of each answer token by position (x) and node (y)."""
    from plotnine import (aes, element_text, facet_wrap, geom_tile, ggplot, labs,
                          scale_fill_cmap, scale_color_cmap, theme, theme_bw)

    df = records_frame(payload)
    return (ggplot(df, aes("position_label", "node", fill="prob", color="prob"))
            + geom_tile()
            + facet_wrap("~token")
            + scale_fill_cmap("viridis") + scale_color_cmap("viridis", guide=None)
            + labs(x="position (base|source token)", y="node (a = attention input, "
                   "f = MLP output)", fill="prob", title=title)
            + theme_bw()
            + theme(axis_text_x=element_text(rotation=90), axis_text_y=element_text(size=6)))


def plot_layer_bars(payload: dict, position: int = -1, title: str = ""):
    """Tutorial plot 2: probability per node at one position on a log scale, one facet per
    token; the dashed line is the clean base probability."""
    import math

    import pandas as pd
    from plotnine import (aes, element_text, facet_wrap, geom_hline, geom_rect, ggplot, labs,
                          scale_x_continuous, scale_y_log10, theme, theme_bw)

    position = parse_positions(position, len(payload["base"]["tokens"]), "BAR_POSITION")[0]
    if position not in payload["positions"]:
        raise ValueError(f"position {position} was not patched; patched positions: "
                         f"{payload['positions']}")
    df = records_frame(payload)
    df = df[df["position"] == position].copy()
    nodes = [n for n in payload["nodes"] if n in set(df["node"].astype(str))]
    index = {n: i for i, n in enumerate(nodes)}
    df["x"] = [index[str(n)] for n in df["node"]]
    # Bars start at a floor below the smallest probability (a log axis has no zero).
    positive = [p for p in df["prob"] if p > 0] + [a["p_base"] for a in payload["answers"]
                                                   if a["p_base"] > 0]
    floor = 10.0 ** math.floor(math.log10(min(positive))) if positive else 1e-12
    df["floor"] = floor
    df["top"] = df["prob"].clip(lower=floor)
    clean = pd.DataFrame({"token": pd.Categorical([a["token"] for a in payload["answers"]],
                                                  categories=df["token"].cat.categories),
                          "p_base": [a["p_base"] for a in payload["answers"]]})
    label = position_labels(payload)[position]
    return (ggplot(df)
            + geom_rect(aes(xmin="x - 0.4", xmax="x + 0.4", ymin="floor", ymax="top",
                            fill="token"))
            + geom_hline(clean, aes(yintercept="p_base"), linetype="dashed")
            + scale_x_continuous(breaks=list(range(len(nodes))), labels=nodes,
                                 expand=(0, 0.6))
            + scale_y_log10()
            + facet_wrap("~token", ncol=1)
            + labs(x="node", y="probability (log scale)",
                   title=title or f"patch at position {label}; dashed: clean base")
            + theme_bw()
            + theme(axis_text_x=element_text(rotation=90, size=6), legend_position="none"))


def attribution_frame(payload: dict):
    """Attribution records in long form: one row per cell, metric and method (exact or
    attribution patching)."""
    import pandas as pd

    att = payload["attribution"]
    df = pd.DataFrame(att["records"], columns=list(ATTRIBUTION_KEYS))
    long = df.melt(id_vars=["component", "layer", "position", "node", "metric"],
                   value_vars=["exact", "estimate"], var_name="method", value_name="effect")
    long["method"] = pd.Categorical(long["method"].map({"exact": "exact patching",
                                                        "estimate": "attribution patching"}),
                                    categories=["exact patching", "attribution patching"],
                                    ordered=True)
    long["node"] = pd.Categorical(long["node"], categories=payload["nodes"], ordered=True)
    labels = position_labels(payload)
    long["position_label"] = pd.Categorical([labels[p] for p in long["position"]],
                                            categories=[labels[p] for p in payload["positions"]],
                                            ordered=True)
    return long


def plot_attribution(payload: dict, metric: str = "logit_diff", title: str = ""):
    """Exact patching effect and its attribution-patching estimate side by side (same cells,
    same colour scale) for one metric."""
    from plotnine import (aes, element_text, facet_wrap, geom_tile, ggplot, labs,
                          scale_fill_gradient2, theme, theme_bw)

    df = attribution_frame(payload)
    if metric not in set(df["metric"]):
        raise ValueError(f"unknown metric {metric!r}; available: {sorted(set(df['metric']))}")
    df = df[df["metric"] == metric]
    c = payload["attribution"]["correlation"][metric]["all_cells"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    return (ggplot(df, aes("position_label", "node", fill="effect"))
            + geom_tile()
            + facet_wrap("~method")
            + scale_fill_gradient2(low="#2166ac", mid="white", high="#b2182b", midpoint=0)
            + labs(x="position", y="node", fill=f"change in\n{metric}",
                   title=title or f"{metric}: Pearson {fmt(c['pearson'])}, "
                                  f"Spearman {fmt(c['spearman'])} (all cells)")
            + theme_bw()
            + theme(axis_text_x=element_text(rotation=90), axis_text_y=element_text(size=6)))


def plot_attribution_scatter(payload: dict, title: str = ""):
    """Estimate against exact effect for every cell, one facet per metric (free scales)."""
    import pandas as pd
    from plotnine import (aes, facet_wrap, geom_abline, geom_point, ggplot, labs, theme_bw)

    att = payload["attribution"]
    df = pd.DataFrame(att["records"], columns=list(ATTRIBUTION_KEYS))
    fmt = (lambda v: "n/a" if v is None else f"{v:.2f}")
    names = {m: f"{m}  (r={fmt(c['all_cells']['pearson'])}, "
                f"rho={fmt(c['all_cells']['spearman'])})"
             for m, c in att["correlation"].items()}
    df["metric"] = pd.Categorical(df["metric"].map(names), categories=list(names.values()),
                                  ordered=True)
    return (ggplot(df, aes("exact", "estimate", color="component"))
            + geom_abline(slope=1, intercept=0, linetype="dashed", color="grey")
            + geom_point(alpha=0.7, size=1.5)
            + facet_wrap("~metric", scales="free")
            + labs(x="exact patching effect", y="attribution-patching estimate",
                   title=title or "attribution patching vs exact interchange")
            + theme_bw())
