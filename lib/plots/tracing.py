"""Figures of causal tracing (notebook 06): trace heatmaps, severed-path curves and average
indirect effects over a fact set.

The numbers come from :mod:`lib.studies.tracing` (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", as packaged by ``chanind/causal-tracer``); the heatmap follows
causal-tracer's, the curves ROME's Fig. 2 and 3. Plot functions return plotnine ``ggplot``
objects; the notebook displays them and calls :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lib.studies.tracing import TraceResult

PALETTES = {"hidden": "Purples", "mlp": "Greens", "attention": "Reds"}


def _token_labels(tokens: Sequence[str], subject_range: Sequence[int]) -> list[str]:
    s0, s1 = subject_range
    labels = []
    for i, tok in enumerate(tokens):
        text = repr(tok)[1:-1] if tok.strip() == "" or "\n" in tok else tok
        labels.append(f"{text}*" if s0 <= i < s1 else text)
    return labels


def plot_trace_heatmap(result: TraceResult | dict, title: str | None = None):
    """Heatmap like causal-tracer's: tokens down (first at top, subject tokens marked "*"),
    layers across, colour = restored p(answer) from p_corrupt upwards."""
    import pandas as pd
    from plotnine import (aes, element_text, geom_tile, ggplot, labs, scale_fill_cmap,
                          scale_x_continuous, scale_y_reverse, theme, theme_minimal)

    res = result.to_dict() if isinstance(result, TraceResult) else result
    scores = np.array([[np.nan if v is None else v for v in row] for row in res["scores"]],
                      dtype=float)
    n_tok, n_layers = scores.shape
    df = pd.DataFrame([{"token": t, "layer": l, "p": scores[t, l]}
                       for t in range(n_tok) for l in range(n_layers)])
    df = df.dropna()
    labels = _token_labels(res["tokens"], res["subject_range"])
    kind, window = res["kind"], res["window"]
    xlab = ("single restored layer" if kind == "hidden" and window == 1 else
            f"center of interval of {window} restored {kind} layers")
    hi = max(float(np.nanmax(scores)), res["p_corrupt"] + 1e-6)
    title = title or f"Impact of restoring {kind} after corrupted input"
    return (ggplot(df, aes("layer", "token", fill="p"))
            + geom_tile()
            + scale_fill_cmap(PALETTES.get(kind, "Purples"), limits=(res["p_corrupt"], hi),
                              name=f"p({res['answer'].strip()})")
            + scale_y_reverse(breaks=list(range(n_tok)), labels=labels, expand=(0, 0))
            + scale_x_continuous(breaks=list(range(0, n_layers, 5)), expand=(0, 0))
            + labs(x=xlab, y="", title=title,
                   subtitle=f"p_clean={res['p_clean']:.3f}  p_corrupt={res['p_corrupt']:.3f}  "
                            f"nu={res['noise']:.4g}  samples={res['samples']}")
            + theme_minimal()
            + theme(plot_title=element_text(size=10), plot_subtitle=element_text(size=8)))


def plot_severed(curves: dict, title: str | None = None):
    """Indirect effect of one restored hidden state per layer: ordinary vs MLP severed vs
    attention severed (ROME Fig. 2 right)."""
    import pandas as pd
    from plotnine import (aes, geom_hline, geom_line, geom_point, ggplot, labs,
                          scale_color_manual, theme_minimal)

    names = {"ordinary": "ordinary", "mlp_severed": "MLP severed",
             "attention_severed": "attention severed"}
    df = pd.DataFrame([{"layer": l, "ie": p - curves["p_corrupt"], "curve": label}
                       for key, label in names.items()
                       for l, p in zip(curves["layers"], curves[key])])
    df["curve"] = pd.Categorical(df["curve"], categories=list(names.values()))
    title = title or (f"Restoring the hidden state at {curves['token_str'].strip()!r} "
                      f"(token {curves['token']})")
    return (ggplot(df, aes("layer", "ie", color="curve"))
            + geom_hline(yintercept=0, linetype="dotted", color="grey")
            + geom_line() + geom_point(size=1)
            + scale_color_manual(values=["#6a51a3", "#238b45", "#cb181d"])
            + labs(x="restored layer", y="indirect effect  p_restored - p_corrupt",
                   color="", title=title)
            + theme_minimal())


CURVE_LABELS = {"hidden": "hidden", "mlp": "mlp", "attention": "attention",
                "hidden_mlp_severed": "hidden, MLP severed",
                "hidden_attention_severed": "hidden, attention severed"}
CURVE_COLOURS = {"hidden": "#6a51a3", "mlp": "#238b45", "attention": "#cb181d",
                 "hidden_mlp_severed": "#41ab5d", "hidden_attention_severed": "#fb6a4a"}


def plot_average_effects(effects, title: str | None = None,
                         xlab: str = "layer (centre of the window for mlp / attention)"):
    """Average indirect effect per layer with 95% bands, per kind, at the last subject token
    and the last token (ROME Fig. 3 style). ``effects`` comes from
    :func:`lib.studies.tracing_facts.average_effects`."""
    from plotnine import (aes, facet_wrap, geom_hline, geom_line, geom_ribbon, ggplot, labs,
                          scale_color_manual, scale_fill_manual, theme, theme_minimal)

    df = effects.copy()
    df["token"] = df["token"].map({"last_subject": "last subject token",
                                   "last": "last token"}).fillna(df["token"])
    kinds = [k for k in CURVE_COLOURS if k in set(df["kind"])]
    df["curve"] = df["kind"].map(CURVE_LABELS).fillna(df["kind"])
    labels = [CURVE_LABELS[k] for k in kinds]
    colours = [CURVE_COLOURS[k] for k in kinds]
    n = int(df["n"].max())
    return (ggplot(df, aes("layer", "mean", color="curve", fill="curve"))
            + geom_hline(yintercept=0, linetype="dotted", color="grey")
            + geom_ribbon(aes(ymin="lo", ymax="hi"), alpha=0.2, color="none")
            + geom_line()
            + facet_wrap("~token")
            + scale_color_manual(values=colours, limits=labels)
            + scale_fill_manual(values=colours, limits=labels)
            + labs(x=xlab, y="average indirect effect", color="", fill="",
                   title=title or f"Average indirect effect over {n} correct facts (95% band)")
            + theme_minimal()
            + theme(legend_position="bottom"))
