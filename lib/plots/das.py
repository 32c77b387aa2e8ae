"""Figures of distributed alignment search (notebook 08): training curves, IIA per layer beside
the random-subspace control, and the wrong-causal-model grid.

DAS: Geiger, Wu et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations". Every function takes rows from the notebook's result JSON
(``full_compute/das_mlp/*.json``), returns a plotnine ``ggplot`` and never shows or saves it; the
notebook displays it and calls :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, facet_wrap, geom_col, geom_hline, geom_line, geom_point, geom_text,
                      geom_tile, ggplot, labs, position_dodge, scale_fill_gradient, scale_y_continuous,
                      theme_bw)


def plot_training_curves(rows: list[dict], title: str = "DAS training") -> ggplot:
    """``rows``: dicts with ``run``, ``epoch``, ``eval_iia`` (held-out IIA after the epoch) and
    ``train_accuracy``."""
    df = pd.DataFrame(rows)
    long = pd.concat([
        df.assign(metric="held-out IIA", value=df["eval_iia"]),
        df.assign(metric="training accuracy (epoch)", value=df["train_accuracy"])])
    return (ggplot(long, aes("epoch", "value", color="run", linetype="metric"))
            + geom_line() + geom_point(size=1.2)
            + labs(x="epoch", y="accuracy", color="", linetype="", title=title)
            + theme_bw())


def plot_layer_iia(rows: list[dict], title: str = "IIA per layer") -> ggplot:
    """``rows``: dicts with ``panel`` (facet), ``layer``, ``iia`` and ``rotation`` (learned or
    random control); the dashed line is the majority-class rate 0.5."""
    df = pd.DataFrame(rows)
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
    task the network solves), ``test_model`` (the counterfactuals IIA is measured on), ``iia``."""
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
