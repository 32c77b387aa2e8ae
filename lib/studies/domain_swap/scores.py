"""Notebook 00's separability scores as read by the domain swaps: per-layer scores, layer rankings,
top and bottom layers; see :mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lib.core import paths
from lib.studies.domain_swap.common import ScoresMissingError
from lib.core.io import read_result, slug
from lib.studies.separability import SCORES_SCHEMA


# --- separability scores --------------------------------------------------------------------

def load_scores(model: str, scores_dir: str | Path | None = None) -> dict:
    """``scores/<model slug>.json`` from notebook 00; a clear error when it is missing."""
    path = Path(scores_dir or paths.SCORES) / f"{slug(model)}.json"
    if not path.exists():
        raise ScoresMissingError(
            f"separability scores missing for model {model}: run 00_layer_scores for it "
            f"(python -m lib.runner --notebooks 00 --models {model}); expected {path}")
    return read_result(path, SCORES_SCHEMA)


def pair_layer_scores(scores: dict, pair: str, component: str, metric: str) -> dict[int, float]:
    """``{layer: score}`` of the "pair" comparison ``pair`` (layers with a null score left out)."""
    comps = [c for c in scores.get("comparisons", [])
             if c.get("name") == pair and c.get("kind", "pair") == "pair"]
    if not comps:
        have = sorted({c.get("name") for c in scores.get("comparisons", [])})
        raise ScoresMissingError(f"scores of model {scores.get('model')} have no 'pair' comparison "
                                 f"{pair!r} (they have {have}); rerun 00_layer_scores with this "
                                 "prompt file")
    table = comps[0].get("scores", {})
    if component not in table:
        raise ScoresMissingError(f"scores for {pair!r} have no component {component!r} "
                                 f"(they have {sorted(table)}); rerun 00_layer_scores")
    if metric not in table[component]:
        raise ScoresMissingError(f"scores for {pair!r}/{component} have no metric {metric!r} "
                                 f"(they have {sorted(table[component])})")
    values = table[component][metric]
    layers = scores.get("layers") or list(range(len(values)))
    if len(layers) != len(values):
        raise ValueError(f"scores for {pair!r}/{component}/{metric}: {len(values)} values for "
                         f"{len(layers)} layers")
    return {int(l): float(v) for l, v in zip(layers, values)
            if v is not None and not (isinstance(v, float) and math.isnan(v))}


def rank_layers(layer_scores: dict[int, float], layers: Sequence[int] | None = None) -> list[int]:
    """Layers (restricted to ``layers`` when given) from most to least separable; ties by layer."""
    items = [(l, s) for l, s in layer_scores.items() if layers is None or l in set(layers)]
    return [l for l, _ in sorted(items, key=lambda t: (-t[1], t[0]))]


def top_bottom(ranking: Sequence[int], k: int) -> tuple[list[int], list[int]]:
    """The ``k`` most and ``k`` least separable layers; k shrinks to len(ranking) // 2 so the
    two groups never overlap (a clear error when fewer than two layers are ranked)."""
    if len(ranking) < 2:
        raise ValueError(f"need at least two ranked layers for a top/bottom comparison, got "
                         f"{list(ranking)}")
    k = max(1, min(int(k), len(ranking) // 2))
    return list(ranking[:k]), list(ranking[-k:][::-1])
