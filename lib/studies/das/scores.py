"""Interchange-intervention accuracy per label class: balanced IIA and the label shares beside it.

IIA (Geiger, Wu et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations") is the share of counterfactual examples on which the
intervened network's answer equals the causal model's counterfactual label. When the network
gives one answer on nearly every input, any rotation scores the share of that answer among the
labels, whatever it aligns. *Balanced* IIA is the mean, over the label classes present, of the
IIA within each class (the balanced accuracy of Brodersen et al. 2010, "The balanced accuracy
and its posterior distribution"): a network that answers one class on every input scores
1 / (number of classes present), 0.5 for two, whatever the rotation. The shares beside it say
what a reader needs to judge a cell: how often the counterfactual label is True, how often the
intervened network answers True, and how often the network answers True on the unintervened
base inputs (its own answer on those inputs).
"""

from __future__ import annotations

import torch

# the intervened answers are rotation's, beside its iia; importable from here too
from lib.studies.das.rotation import intervened_predictions  # noqa: F401


def class_iia(predictions: torch.Tensor, labels: torch.Tensor,
              n_classes: int = 2) -> list[float | None]:
    """IIA within each label class: entry c is the share of the examples labelled c on which
    the prediction is c; ``None`` for a class no example has."""
    predictions, labels = _check(predictions, labels, n_classes)
    out: list[float | None] = []
    for c in range(n_classes):
        rows = labels == c
        n = int(rows.sum())
        out.append(int((predictions[rows] == c).sum()) / n if n else None)
    return out


def balanced_iia(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int = 2) -> float:
    """The mean of :func:`class_iia` over the classes present among ``labels``."""
    present = [v for v in class_iia(predictions, labels, n_classes) if v is not None]
    return sum(present) / len(present)


def iia_scores(predictions: torch.Tensor, labels: torch.Tensor,
               factual_predictions: torch.Tensor | None = None) -> dict:
    """Binary labels (1 is True): ``iia``, ``balanced_iia``, ``class_iia`` ([False, True]),
    ``label_true_share`` (share of True counterfactual labels), ``prediction_true_share``
    (share of True answers after the intervention) and, given the network's answers on the
    unintervened bases, ``factual_true_share``."""
    predictions, labels = _check(predictions, labels, 2)
    out = {"iia": float((predictions == labels).float().mean()),
           "balanced_iia": balanced_iia(predictions, labels),
           "class_iia": class_iia(predictions, labels),
           "label_true_share": float((labels == 1).float().mean()),
           "prediction_true_share": float((predictions == 1).float().mean())}
    if factual_predictions is not None:
        factual = torch.as_tensor(factual_predictions).reshape(-1)
        if len(factual) != len(labels):
            raise ValueError(f"factual_predictions has {len(factual)} rows, labels {len(labels)}"
                             ": give the network's answers on the same examples' bases")
        out["factual_true_share"] = float((factual == 1).float().mean())
    return out


def _check(predictions, labels, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    predictions = torch.as_tensor(predictions).reshape(-1)
    labels = torch.as_tensor(labels).reshape(-1)
    if len(predictions) != len(labels) or not len(labels):
        raise ValueError(f"predictions ({len(predictions)}) and labels ({len(labels)}) must be "
                         "non-empty and of one length: one prediction per counterfactual example")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must be class indices 0..{n_classes - 1}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    return predictions, labels
