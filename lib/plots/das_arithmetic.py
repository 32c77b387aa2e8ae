"""Figures of DAS on a language model (notebook 09, the thesis' X+Y+Z= task): the fine-tuning
curves, and IIA per layer beside the random-subspace control and the full-dimension swap.
The 3 x 3 sanity grid is :func:`lib.plots.das.plot_wrong_model_grid`.

Every function takes rows from the notebook's result JSON (``full_compute/<model>/das_*.json``)
and returns a plotnine ``ggplot``; the notebook saves it with :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, facet_grid, facet_wrap, geom_line, geom_point, ggplot, labs,
                      scale_y_continuous, theme_bw)


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


def plot_iia_by_layer(rows: list[dict], title: str = "DAS IIA per layer") -> ggplot:
    """``rows``: dicts with ``model`` (causal model), ``layer``, ``iia``, ``rotation``
    ("learned", "random control" or "full swap") and ``site`` (facet row) and ``rank``
    (facet column)."""
    df = pd.DataFrame(rows)
    df["rank"] = "rank " + df["rank"].astype(str)
    return (ggplot(df, aes("layer", "iia", color="model", linetype="rotation"))
            + geom_line() + geom_point(size=1.5)
            + facet_grid("site ~ rank")
            + scale_y_continuous(limits=(0, 1))
            + labs(x="layer (block output)", y="IIA (held-out arrangements)", color="",
                   linetype="", title=title)
            + theme_bw())
