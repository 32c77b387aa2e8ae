"""Figures of DAS on a language model (notebook 09, the thesis' X+Y+Z= task): the fine-tuning
curves, IIA per layer over seeds (95 % bands) beside the random-subspace control and the full-dimension swap, and
the pairwise-IIA graphs' mean weights beside the thesis'.
The 3 x 3 sanity grid is :func:`lib.plots.das.plot_wrong_model_grid`.

Every function takes rows from the notebook's result JSON (``full_compute/<model>/das_*.json``)
and returns a plotnine ``ggplot``; the notebook saves it with :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, coord_cartesian, facet_grid, facet_wrap, geom_errorbar, geom_line,
                      geom_linerange, geom_point, geom_ribbon, ggplot, labs, position_dodge,
                      scale_y_continuous, theme_bw)

from lib.studies.das import arithmetic as ar


def plot_finetune_curves(curve: list[dict], title: str = "Fine-tuning") -> ggplot:
    """``curve``: per epoch ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy``."""
    df = pd.DataFrame(curve)
    long = pd.concat([
        df.assign(panel="loss", split="train", value=df["train_loss"]),
        df.assign(panel="loss", split="validation", value=df["val_loss"]),
        df.assign(panel="accuracy", split="train", value=df["train_accuracy"]),
        df.assign(panel="accuracy", split="validation", value=df["val_accuracy"])])
    return (ggplot(long, aes("epoch", "value", color="split"))
            + geom_line() + geom_point(size=1.5)
            + facet_wrap("~panel", scales="free_y")
            + labs(x="epoch", y="", color="", title=title)
            + theme_bw())


def _cells_frame(cells: list[dict]) -> pd.DataFrame:
    """One row per cell and rotation kind (learned, random control): its mean IIA over seeds
    and the interval's ends."""
    return pd.DataFrame([{"model": f"M{c['model']}", "model_id": c["model"],
                          "layer": c["layer"], "rank": c["rank"], "site": c["site"],
                          "rotation": label, "iia": c[key]["mean"],
                          "low": c[key]["ci_low"], "high": c[key]["ci_high"]}
                         for c in cells
                         for label, key in (("learned", "iia"),
                                            ("random control", "control_iia"))])


def plot_iia_by_layer(cells: list[dict], title: str = "DAS IIA per layer") -> ggplot:
    """``cells``: the cells of ``das_iia.json`` (:func:`lib.studies.das.seeds.cells`), dicts
    with ``model`` (causal model number), ``layer``, ``rank``, ``site`` and ``iia`` /
    ``control_iia`` (the learned rotations' and the random ones' mean over seeds with
    ``ci_low`` / ``ci_high``): one panel per causal model (and rank and site, where the cells
    have several), the learned rotations' IIA and their random control's by layer, each
    cell's 95 % interval over seeds as a band and a bar (a cell of one seed has neither)."""
    df = _cells_frame(cells)
    order = sorted({(c["model"], c["rank"], c["site"]) for c in cells})
    several_ranks = len({r for _, r, _ in order}) > 1
    several_sites = len({s for _, _, s in order}) > 1

    def panel(model: int, rank: int, site: str) -> str:
        return (ar.MODEL_NAMES.get(model, f"M{model}")
                + (f", rank {rank}" if several_ranks else "")
                + (f", site {site}" if several_sites else ""))

    df["panel"] = pd.Categorical(
        [panel(m, r, s) for m, r, s in zip(df["model_id"], df["rank"], df["site"])],
        categories=list(dict.fromkeys(panel(m, r, s) for m, r, s in order)))
    return (ggplot(df, aes("layer", "iia", color="rotation"))
            + geom_ribbon(aes(ymin="low", ymax="high", fill="rotation"), alpha=0.2,
                          color="none")
            + geom_linerange(aes(ymin="low", ymax="high"), alpha=0.6)
            + geom_line() + geom_point(size=1.5)
            + facet_wrap("~panel", ncol=min(4, len(order)))
            + coord_cartesian(ylim=(0, 1))   # a t interval of three seeds may leave [0, 1]
            + labs(x="layer (block output)", y="IIA (held-out arrangements)", color="",
                   fill="", title=title)
            + theme_bw())


def plot_iia_by_model(cells: list[dict], title: str = "DAS IIA per causal model") -> ggplot:
    """``cells`` as :func:`plot_iia_by_layer`'s, for one layer: the learned rotations' and the
    random controls' IIA per causal model, each mean with its 95 % interval over seeds as a
    bar (facets: layer and rank by site)."""
    df = _cells_frame(cells)
    df["panel"] = "layer " + df["layer"].astype(str) + ", rank " + df["rank"].astype(str)
    dodge = position_dodge(width=0.5)
    return (ggplot(df, aes("model", "iia", color="rotation"))
            + geom_errorbar(aes(ymin="low", ymax="high"), width=0.3, position=dodge)
            + geom_point(size=2, position=dodge)
            + facet_grid("site ~ panel")
            + coord_cartesian(ylim=(0, 1))
            + labs(x="causal model", y="IIA (held-out arrangements)",
                   color="", title=title)
            + theme_bw())


def plot_iia(cells: list[dict], title: str) -> ggplot:
    """:func:`plot_iia_by_layer` where the cells span several layers, else
    :func:`plot_iia_by_model` (a line over one layer shows nothing)."""
    if len({c["layer"] for c in cells}) > 1:
        return plot_iia_by_layer(cells, title)
    return plot_iia_by_model(cells, title)


def plot_graph_means(graphs: list[dict], title: str = "Pairwise-IIA graphs") -> ggplot:
    """``graphs``: the summaries of ``das_graph.json`` (``model``, ``layer``, ``mean_weight``,
    ``mean_weight_ci``, ``thesis_mean_weight_gpt2_layer7_rank256``): per causal model the
    graph's mean edge weight with its interval (arrangements resampled), beside the thesis'
    mean on GPT-2 (another model, layer and rank: a reference, not a target)."""
    rows = []
    for g in graphs:
        label = f"M{g['model']}"
        rows.append({"model": label, "layer": f"layer {g['layer']}", "source": "this run",
                     "value": g["mean_weight"], "low": g["mean_weight_ci"][0],
                     "high": g["mean_weight_ci"][1]})
        rows.append({"model": label, "layer": f"layer {g['layer']}",
                     "source": "thesis (in-sample, GPT-2, layer 7, rank 256)",
                     "value": g["thesis_mean_weight_gpt2_layer7_rank256"], "low": None,
                     "high": None})
    df = pd.DataFrame(rows)
    ours = df[df["source"] == "this run"]
    return (ggplot(df, aes("model", "value", color="source", shape="source"))
            + geom_linerange(ours, aes(ymin="low", ymax="high"), size=0.8)
            + geom_point(size=2.5)
            + facet_wrap("~layer")
            + scale_y_continuous(limits=(0, 1))
            + labs(x="causal model", y="mean pairwise IIA (edge weight)", color="", shape="",
                   title=title)
            + theme_bw())
