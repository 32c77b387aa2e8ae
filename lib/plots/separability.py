"""Figure of the per-layer separability scores (notebook 00).

The scores (held-out Fisher ratio, unbiased MMD², sliced Wasserstein-1; see
:mod:`lib.studies.separability` for the references) come from ``scores/<model>.json``; the plot
function returns a plotnine ``ggplot`` that the notebook displays and saves with
:func:`lib.plots.save_figure`.
"""

from __future__ import annotations

from lib.studies.separability import scores_frame


def plot_layer_scores(payload: dict, kind: str = "pair"):
    """Per-layer scores: rows = metrics (free y scales), columns = comparisons, one line per
    component."""
    import pandas as pd
    import plotnine as p9

    df = scores_frame(payload)
    df = df[df.kind == kind].copy()
    if df.empty:
        raise ValueError(f"no comparisons of kind {kind!r} in the scores")
    df["comparison"] = pd.Categorical(df.comparison, categories=list(dict.fromkeys(df.comparison)))
    df["metric"] = df.metric.map({"fisher": "Fisher (held-out)", "mmd": "MMD²",
                                  "wasserstein": "sliced W1"}).fillna(df.metric)
    return (p9.ggplot(df, p9.aes("layer", "value", color="component"))
            + p9.geom_line() + p9.geom_point(size=0.8)
            + p9.facet_grid("metric ~ comparison", scales="free_y")
            + p9.labs(x="layer", y="separability",
                      title=f"{payload['model']}: last-token separability per layer")
            + p9.theme_bw() + p9.theme(figure_size=(11, 6), legend_position="bottom"))
