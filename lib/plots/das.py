"""Figures of distributed alignment search (notebook 08): the choice of network, training curves,
IIA per layer beside the random-subspace control, and the wrong-causal-model grid (balanced IIA
over networks).

DAS: Geiger, Wu et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations". Every function takes rows from the notebook's result JSON
(``full_compute/das_mlp/*.json``), returns a plotnine ``ggplot`` and never shows or saves it; the
notebook displays it and calls :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, facet_wrap, geom_col, geom_hline, geom_line, geom_point, geom_text,
                      geom_tile, ggplot, labs, position_dodge, scale_color_manual,
                      scale_fill_gradient, scale_y_continuous, theme_bw)


def plot_network_selection(rows: list[dict], chosen: int, references: dict[str, float],
                           title: str = "Which network") -> ggplot:
    """``rows``: one per candidate network, with ``seed``, ``validation_iia`` and
    ``control_iia`` (a random rotation with the same subspaces); candidates are ordered by
    validation IIA, the ``chosen`` seed is marked, and ``references`` (label -> IIA) are drawn as
    dashed lines (e.g. the numbers a peer reports)."""
    df = pd.DataFrame(rows).sort_values("validation_iia").reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    df["network"] = ["chosen" if s == chosen else "other" for s in df["seed"]]
    refs = pd.DataFrame({"label": list(references), "iia": list(references.values())})
    # labels above their line, except the lower of two close lines, whose label goes below
    refs["label_y"] = [v - 0.03 if any(0 < w - v < 0.04 for w in refs["iia"]) else v + 0.003
                       for v in refs["iia"]]
    return (ggplot(df, aes("rank", "validation_iia"))
            + geom_point(aes(y="control_iia"), color="grey", shape="x", size=2)
            + geom_point(aes(color="network"), size=2.5)
            + geom_text(aes(label="seed"), size=6, va="bottom", nudge_y=0.012)
            + geom_hline(refs, aes(yintercept="iia"), linetype="dashed", color="#b2182b")
            + geom_text(refs, aes(x=1, y="label_y", label="label"), ha="left", va="bottom",
                        size=7, color="#b2182b")
            + scale_color_manual(values={"chosen": "#2171b5", "other": "black"})
            + scale_y_continuous(limits=(0.4, 1.04))
            + labs(x="network (ordered by validation IIA; labels: seed; x: random rotation)",
                   y="IIA on validation counterfactuals", color="", title=title)
            + theme_bw())


def plot_training_curves(runs: dict[str, list[dict]], title: str = "DAS training") -> ggplot:
    """``runs``: a label per run -> its curve, dicts with ``epoch``, ``eval_iia`` (held-out IIA
    after the epoch) and ``train_accuracy``."""
    df = pd.DataFrame([{**row, "run": label} for label, curve in runs.items() for row in curve])
    long = pd.concat([
        df.assign(metric="held-out IIA", value=df["eval_iia"]),
        df.assign(metric="training accuracy (epoch)", value=df["train_accuracy"])])
    return (ggplot(long, aes("epoch", "value", color="run", linetype="metric"))
            + geom_line() + geom_point(size=1.2)
            + labs(x="epoch", y="accuracy", color="", linetype="", title=title)
            + theme_bw())


def plot_layer_iia(panels: dict[str, list[dict]], title: str = "IIA per layer") -> ggplot:
    """``panels``: a facet title -> per-layer runs, dicts with ``layer``, ``iia`` (the learned
    rotation) and ``control_iia`` (a random one); the dashed line is the majority-class rate
    0.5."""
    df = pd.DataFrame([{"panel": panel, "layer": run["layer"], "iia": run[key], "rotation": label}
                       for panel, runs in panels.items() for run in runs
                       for key, label in (("iia", "learned"), ("control_iia", "random control"))])
    df["layer"] = df["layer"].astype(str)
    return (ggplot(df, aes("layer", "iia", fill="rotation"))
            + geom_col(position=position_dodge(width=0.8), width=0.75)
            + geom_text(aes(label="iia"), format_string="{:.3f}", size=7, va="bottom",
                        position=position_dodge(width=0.8))
            + geom_hline(yintercept=0.5, linetype="dashed", color="grey")
            + facet_wrap("~panel")
            + scale_y_continuous(limits=(0, 1.08))
            + labs(x="layer (block output)", y="IIA (held out)", fill="", title=title)
            + theme_bw())


def plot_wrong_model_grid(rows: list[dict], title: str = "Wrong causal model",
                          y_label: str = "DAS trained on (and network of)") -> ggplot:
    """``rows``: dicts with ``train_model`` (the causal model DAS was trained with, and whose
    task the network solves), ``test_model`` (the counterfactuals IIA is measured on), ``iia``
    (notebook 09's sanity grid; 08's grid over networks is :func:`plot_balanced_grid`)."""
    df = pd.DataFrame(rows)
    order = list(dict.fromkeys(df["train_model"]))
    df["train_model"] = pd.Categorical(df["train_model"], categories=order[::-1])
    df["test_model"] = pd.Categorical(df["test_model"], categories=order)
    return (ggplot(df, aes("test_model", "train_model", fill="iia"))
            + geom_tile(color="white")
            + geom_text(aes(label="iia"), format_string="{:.3f}", size=9)
            + scale_fill_gradient(low="#f7fbff", high="#2171b5", limits=(0, 1))
            + labs(x="IIA tested on counterfactuals of", y=y_label,
                   fill="IIA", title=title)
            + theme_bw())


def plot_balanced_grid(cells: list[dict], title: str = "Wrong causal model",
                          y_label: str = "DAS trained on (and network of)") -> ggplot:
    """``cells``: the grid's cells (``train_model``, ``test_model``, ``inputs``, summaries of
    ``balanced_iia`` and ``control_balanced_iia`` over networks, ``label_true_share`` and
    ``factual_true_share``). One panel per input distribution; each tile shows the median
    balanced IIA, its range over the networks, the control's median and the True shares of the
    labels and of the network's own answers."""
    df = pd.DataFrame([{"train_model": c["train_model"], "test_model": c["test_model"],
                        "inputs": f"{c['inputs']} inputs", "value": c["balanced_iia"]["median"],
                        "label": f"{c['balanced_iia']['median']:.3f}\n"
                                 f"({c['balanced_iia']['min']:.2f}–{c['balanced_iia']['max']:.2f})\n"
                                 f"control {c['control_balanced_iia']['median']:.2f}\n"
                                 f"True {c['label_true_share']:.2f} / "
                                 f"{c['factual_true_share']['median']:.2f}"}
                       for c in cells])
    order = list(dict.fromkeys(df["train_model"]))
    df["train_model"] = pd.Categorical(df["train_model"], categories=order[::-1])
    df["test_model"] = pd.Categorical(df["test_model"], categories=order)
    return (ggplot(df, aes("test_model", "train_model", fill="value"))
            + geom_tile(color="white")
            + geom_text(aes(label="label"), size=7)
            + facet_wrap("~inputs")
            + scale_fill_gradient(low="#f7fbff", high="#2171b5", limits=(0, 1))
            + labs(x="IIA tested on counterfactuals of\n(tiles: median balanced IIA, range over "
                     "networks, control's median, True share of labels / of the network's answers)",
                   y=y_label,
                   fill="balanced IIA\n(median)", title=title)
            + theme_bw())
