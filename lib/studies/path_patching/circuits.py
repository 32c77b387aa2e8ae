"""Circuit discovery by ranked edges, and its faithfulness curves, exact on Hugging Face models.

A *ranking* gives every edge of the computation graph a score (edge attribution patching, its
integrated-gradients variant, exact single-edge patching ...). The circuit of size ``k`` is the
``k`` edges of largest |score|. How faithful is it? Two curves over ``k``, as ACDC (Conmy et al.
2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability") and auto-circuit
(Miller et al. 2024, "Transformer Circuit Faithfulness Metrics are not Robust") report them:

* ``direction="keep"``: the circuit's edges carry the clean (base) run, every *other* edge is
  patched from the corrupt (source) run. At k = 0 every edge is patched, which with node-level
  edges is the corrupt run itself: each receiver's input is the sum of its senders' outputs,
  so it reads the corrupt residual stream (up to float rounding; tested on every tiny
  architecture, Gemma 3 included: its post-attention and post-MLP norms sit inside the
  senders' outputs ``attn_add`` / ``mlp_add``, and only per-head senders, which that norm
  mixes, are not additive; :func:`edge_patch` refuses those there). At k = n_edges nothing is
  patched: the engine hands back the clean run's own readout, bit for bit.
* ``direction="remove"`` (the reverse curve): only the circuit's edges are patched.

Each edge set is one row of :func:`lib.studies.path_patching.edge_patch` (exact: one forward pass
per set, the source run read once per pair); all sets of one pair run batched in one call.

The metric is the IOI logit difference ``logit(io) - logit(s)`` at the last position
(:func:`lib.studies.ioi.logit_diff`). Faithfulness at k is a ratio of means over pairs,
``mean(ld_k - ld_corrupt) / mean(ld_clean - ld_corrupt)`` (so 1 = the clean behaviour, 0 = the
corrupt one), with a 95 % percentile-bootstrap interval of that ratio over pairs (the
percentile bootstrap of :func:`lib.core.stats.bootstrap_ci`, written out here so that one set
of resampled pairs serves every k at once, and a ratio of two means is resampled as one).

:func:`curve_summary` gives the smallest circuit reaching 80 % and 90 % of the effect and the
areas of the MIB benchmark (Mueller et al. 2025, "MIB: A Mechanistic Interpretability
Benchmark"): CPR (circuit performance ratio, the area under the curve over the circuit's size as
a fraction of the edges) and CMD (circuit-model distance, the area between the curve and 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lib.core.engine import Context, Engine
from lib.core.schema import NUM, Kind, map_of, maybe, nonempty
from lib.studies.path_patching.edges import check_edge, edge_patch

DIRECTIONS = ("keep", "remove")
#: the faithfulness levels :func:`curve_summary` reports the smallest circuit for
THRESHOLDS = (0.8, 0.9)

_SUMMARY = {"k_80": maybe(int), "k_90": maybe(int), "cpr": float, "cmd": float}
_CURVE = {"ranking": str, "direction": str, "n_edges": int, "n_pairs": int,
          "ks": nonempty([int]), "faithfulness": nonempty([float]), "ci_low": [NUM],
          "ci_high": [NUM], "clean_ld_mean": float, "corrupt_ld_mean": float,
          "clean_ld": [float], "corrupt_ld": [float], "ld": [[float]], "summary": _SUMMARY}


def _check_payload(payload: dict) -> None:
    """Lengths that must agree: one score per edge, one value per k and per pair."""
    n = len(payload["edges"])
    for name, scores in payload["rankings"].items():
        if len(scores) != n:
            raise ValueError(f"ranking {name!r} has {len(scores)} scores for {n} edges")
    for i, c in enumerate(payload["curves"]):
        if c["ranking"] not in payload["rankings"]:
            raise ValueError(f"curve {i} names ranking {c['ranking']!r}, which is not stored")
        if c["direction"] not in DIRECTIONS:
            raise ValueError(f"curve {i}: direction {c['direction']!r} not in {DIRECTIONS}")
        m = len(c["ks"])
        if not len(c["faithfulness"]) == len(c["ci_low"]) == len(c["ci_high"]) == m:
            raise ValueError(f"curve {i}: ks, faithfulness, ci_low and ci_high differ in length")
        if any(len(row) != m for row in c["ld"]) or len(c["ld"]) != c["n_pairs"]:
            raise ValueError(f"curve {i}: ld must hold one value per k for each pair")


#: ``circuit_faithfulness.json``: :func:`circuit_study`
CIRCUIT_SCHEMA = Kind("circuit_faithfulness", "07_path_patching", {
    "edges": nonempty([[str]]), "rankings": map_of([float]), "curves": nonempty([_CURVE]),
    "n_pairs": int, "exact_pairs": int}, extra=_check_payload)


# --- circuits from a ranking ------------------------------------------------------------------------

def k_grid(n_edges: int, n_points: int = 25) -> list[int]:
    """``n_points`` distinct circuit sizes for a faithfulness curve, increasing from 0 to
    ``n_edges`` (both included), log-spaced: 0, 1, then each next size the previous one times
    an equal share of the remaining log distance to ``n_edges`` (rounded, and at least one
    more than the previous), so the grid is geometric where integers allow it and never
    repeats a size. A graph with fewer than ``n_points - 1`` edges gets every size 0..n_edges."""
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or n_edges < 1:
        raise ValueError(f"n_edges must be a positive int, got {n_edges!r}")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2 (0 and n_edges), got {n_points!r}")
    if n_edges + 1 <= n_points:
        return list(range(n_edges + 1))
    if n_points == 2:
        return [0, n_edges]
    sizes = [0, 1]
    for remaining in range(n_points - 2, 0, -1):
        prev = sizes[-1]
        step = round(prev * (n_edges / prev) ** (1 / remaining))
        sizes.append(min(n_edges - remaining + 1, max(prev + 1, step)))
    return sizes


def edge_order(ranking: Sequence[float]) -> list[int]:
    """Edge indices from most to least important: by |score| descending, ties in edge order."""
    return sorted(range(len(ranking)), key=lambda i: (-abs(float(ranking[i])), i))


def circuit_at(edges: Sequence[tuple[str, str]], ranking: Sequence[float], k: int
               ) -> list[tuple[str, str]]:
    """The circuit of size ``k``: the ``k`` edges of largest |score| (ties: earlier edge first),
    in rank order."""
    _check_ranking(edges, ranking)
    _check_ks([k], len(edges))
    return [tuple(edges[i]) for i in edge_order(ranking)[:k]]  # type: ignore[misc]


def patched_sets(edges: Sequence[tuple[str, str]], ranking: Sequence[float], ks: Sequence[int],
                 direction: str = "keep") -> list[list[tuple[str, str]]]:
    """The edges patched from the corrupt run for each k: ``"keep"``, every edge outside the
    circuit of size k; ``"remove"``, the circuit's edges."""
    _check_direction(direction)
    _check_ranking(edges, ranking)
    _check_ks(ks, len(edges))
    order = edge_order(ranking)
    pick = (lambda k: order[k:]) if direction == "keep" else (lambda k: order[:k])
    return [[tuple(edges[i]) for i in sorted(pick(k))] for k in ks]  # type: ignore[misc]


# --- input checks (all before any forward pass) -----------------------------------------------------

def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} ('keep': the circuit clean, "
                         f"every other edge corrupt; 'remove': only the circuit corrupt), got "
                         f"{direction!r}")


def _check_ranking(edges: Sequence, ranking: Sequence[float]) -> None:
    if len(ranking) != len(edges):
        raise ValueError(f"ranking has {len(ranking)} scores but edges has {len(edges)} edges; "
                         "give one score per edge, in the order of edges")
    bad = [i for i, v in enumerate(ranking) if not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"ranking holds non-finite scores (NaN or infinite) at edges {bad[:5]}; "
                         "a circuit needs a finite score for every edge")


def _check_ks(ks: Sequence[int], n_edges: int) -> None:
    if len(ks) == 0:
        raise ValueError("ks is empty; give circuit sizes, e.g. k_grid(len(edges))")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_edges:
            raise ValueError(f"ks: circuit size {k!r} is not an int from 0 to the number of "
                             f"edges ({n_edges})")


def _check_edges(lm, edges: Sequence) -> None:
    if len(edges) == 0:
        raise ValueError("edges is empty; give the graph's edges, e.g. node_edges(lm)")
    seen = set()
    for e in edges:
        if len(e) != 2:
            raise ValueError(f"edges: {e!r} is not a (sender, receiver) pair")
        try:
            check_edge(lm, e[0], e[1])
        except ValueError as err:
            raise ValueError(f"edges: {e[0]} -> {e[1]} is not an edge of {lm.name}: {err}") \
                from None
        if tuple(e) in seen:
            raise ValueError(f"edges: {e[0]} -> {e[1]} is given twice")
        seen.add(tuple(e))


_PAIR_KEYS = ("base_ids", "source_ids", "io_id", "s_id")


def _check_pairs(pairs: Sequence[Mapping]) -> None:
    if len(pairs) == 0:
        raise ValueError("pairs is empty; give IOI pairs from lib.studies.ioi.aligned_pairs")
    for i, p in enumerate(pairs):
        missing = [k for k in _PAIR_KEYS if k not in p]
        if missing:
            raise ValueError(f"pairs[{i}] lacks {missing}; build pairs with "
                             "lib.studies.ioi.aligned_pairs")
        if tuple(p["base_ids"].shape) != tuple(p["source_ids"].shape):
            raise ValueError(f"pairs[{i}]: base and source differ in length; edge patching "
                             "needs aligned pairs")


# --- faithfulness curves ----------------------------------------------------------------------------

def _ratio(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """mean(numerators) / mean(denominators) over the last axis."""
    return numerators.mean(-1) / denominators.mean(-1)


def _resampled_ratios(num: np.ndarray, den: np.ndarray, n_resamples: int, seed: int
                      ) -> np.ndarray:
    """``mean(num[:, j]) / mean(den)`` for every column j of ``num`` (pairs x ks) on
    ``n_resamples`` bootstrap resamples of the pairs (one seeded generator; the same resamples
    for every curve of as many pairs and the same seed): (resamples, ks), NaN or infinite
    where a resample's denominator is 0."""
    n = len(den)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num[idx].mean(1) / den[idx].mean(1)[:, None]


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0
                     ) -> tuple[list[float | None], list[float | None]]:
    """Percentile-bootstrap interval (as :func:`lib.core.stats.bootstrap_ci`) of the ratio of
    means ``mean(num[:, j]) / mean(den)`` for every column j of ``num`` (pairs x ks): the pairs
    are resampled together for all columns (:func:`_resampled_ratios`). One pair: the interval
    is the value. None where a resample's denominator is 0."""
    if len(den) == 1:
        value = [float(v) for v in num[0] / den[0]]
        return list(value), list(value)
    ratios = _resampled_ratios(num, den, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha], axis=0)
    as_num = lambda v: float(v) if math.isfinite(v) else None  # noqa: E731
    return [as_num(v) for v in low], [as_num(v) for v in high]


def _differences(clean, corrupt, lds) -> tuple[np.ndarray, np.ndarray]:
    """The numerators (pairs x ks: ld_k - ld_corrupt) and denominators (ld_clean - ld_corrupt)
    of faithfulness, from the per-pair logit differences."""
    c, r, x = (np.asarray(v, dtype=np.float64) for v in (clean, corrupt, lds))
    return x - r[:, None], c - r


def _areas(faithfulness: np.ndarray, ks: Sequence[int], n_edges: int) -> dict[str, Any]:
    """CPR and CMD of faithfulness values over ``ks`` (the last axis): trapezoid areas of f and
    of |1 - f| over x = k / n_edges."""
    x = np.asarray(ks, dtype=np.float64) / n_edges
    return {"cpr": np.trapezoid(faithfulness, x, axis=-1),
            "cmd": np.trapezoid(np.abs(1 - faithfulness), x, axis=-1)}


def faithfulness_curve(lm, pairs: Sequence[Mapping], edges: Sequence[tuple[str, str]],
                       ranking: Sequence[float], ks: Sequence[int], direction: str = "keep",
                       batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """Faithfulness of the circuits of sizes ``ks`` (see the module docstring) on IOI ``pairs``
    (:func:`lib.studies.ioi.aligned_pairs`: ``base_ids`` clean, ``source_ids`` corrupt,
    ``io_id``, ``s_id``). ``edges``: the graph (e.g. :func:`node_edges`); ``ranking``: one
    score per edge, the circuit of size k being the k edges of largest |score|, ties broken by
    edge order. Every input is checked before any forward pass.

    Returns (JSON-ready) ``ks``, ``faithfulness`` (ratio of means), ``ci_low`` / ``ci_high``
    (95 % bootstrap over pairs), ``direction``, ``n_pairs``, ``n_edges``, the per-pair logit
    differences ``clean_ld``, ``corrupt_ld`` and ``ld`` (pair x k), and their means
    ``clean_ld_mean``, ``corrupt_ld_mean``."""
    from lib.studies.ioi import logit_diff

    _check_direction(direction)
    _check_pairs(pairs)
    _check_edges(lm, edges)
    sets = patched_sets(edges, ranking, ks, direction)
    clean, corrupt, lds = [], [], []
    it: Any = pairs
    if progress and len(pairs) > 1:
        from tqdm.auto import tqdm
        it = tqdm(pairs, desc=f"faithfulness ({direction})", unit="pair", leave=False)
    for pair in it:
        def ld(logits, p=pair):
            return logit_diff(logits, p["io_id"], p["s_id"])
        engine = Engine(lm, [Context(pair["base_ids"], name="base"),
                             Context(pair["source_ids"], name="source")], batch_size=batch_size)
        clean.append(float(engine.clean_readout(0, ld)))
        corrupt.append(float(engine.clean_readout(1, ld)))
        got = edge_patch(lm, pair["base_ids"], pair["source_ids"], sets, ld, engine=engine)
        lds.append([float(v) for v in got.tolist()])
    return _curve_payload(ks, direction, len(edges), clean, corrupt, lds)


def _curve_payload(ks: Sequence[int], direction: str, n_edges: int, clean: list[float],
                   corrupt: list[float], lds: list[list[float]]) -> dict[str, Any]:
    num, den = _differences(clean, corrupt, lds)                   # num: (pairs, ks)
    if den.mean() == 0:
        raise ValueError("the clean and corrupt runs give the same mean logit difference over "
                         "the pairs, so faithfulness (a fraction of their difference) is "
                         "undefined; use pairs whose corruption changes the behaviour")
    faith = _ratio(num.T, den)
    lows, highs = _bootstrap_ratio(num, den)
    return {"direction": direction, "n_edges": n_edges, "n_pairs": len(clean),
            "ks": [int(k) for k in ks], "faithfulness": [float(f) for f in faith],
            "ci_low": lows, "ci_high": highs,
            "clean_ld_mean": float(np.mean(clean)), "corrupt_ld_mean": float(np.mean(corrupt)),
            "clean_ld": clean, "corrupt_ld": corrupt, "ld": lds}


def curve_summary(curve: Mapping[str, Any]) -> dict[str, Any]:
    """What a faithfulness curve (``ks``, ``faithfulness``, ``n_edges``, ``direction``) says
    in four numbers:

    * ``k_80`` / ``k_90``: the smallest k of the grid whose circuit reaches the level: for
      ``"keep"``, faithfulness >= 0.8 (0.9); for ``"remove"``, faithfulness <= 0.2 (0.1), i.e.
      patching the circuit alone removes 80 % (90 %) of the effect. None when no k does.
    * ``cpr`` (MIB's circuit performance ratio): the area under the curve f over
      x = k / n_edges in [0, 1], by the trapezoid rule on the grid's points.
    * ``cmd`` (MIB's circuit-model distance): the area between the curve and 1, the integral
      of |1 - f(x)| over the same x, by the trapezoid rule on |1 - f| at the grid's points.

    A curve sampled only on part of [0, 1] gives the areas over that part. For ``"keep"``
    higher CPR and lower CMD are better; for ``"remove"`` a low CPR says the circuit holds
    the effect."""
    ks, faith = list(curve["ks"]), [float(f) for f in curve["faithfulness"]]
    n_edges, direction = int(curve["n_edges"]), curve["direction"]
    _check_direction(direction)
    if len(ks) != len(faith) or not ks:
        raise ValueError("curve: ks and faithfulness must be non-empty and of equal length")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError("curve: ks must increase")
    out: dict[str, Any] = {}
    for level in THRESHOLDS:
        hit = [k for k, f in zip(ks, faith)
               if (f >= level if direction == "keep" else f <= 1 - level)]
        out[f"k_{round(level * 100)}"] = int(hit[0]) if hit else None
    out.update({k: float(v) for k, v in _areas(np.array(faith), ks, n_edges).items()})
    return out


def circuit_study(lm, pairs: Sequence[Mapping], edges: Sequence[tuple[str, str]],
                  rankings: Mapping[str, Sequence[float]], n_points: int = 25,
                  directions: Sequence[str] = DIRECTIONS, batch_size: int = 32,
                  exact_pairs: int = 0, progress: bool = True) -> dict[str, Any]:
    """The payload of ``circuit_faithfulness.json`` (:data:`CIRCUIT_SCHEMA`): for each ranking
    and direction the faithfulness curve on :func:`k_grid` ``(len(edges), n_points)`` with its
    :func:`curve_summary`. ``exact_pairs``: how many pairs an ``"exact"`` ranking was computed
    on (recorded only). Every input is checked before any forward pass."""
    if not rankings:
        raise ValueError("rankings is empty; give at least one {name: scores}")
    for d in directions:
        _check_direction(d)
    _check_pairs(pairs)
    _check_edges(lm, edges)
    for name, scores in rankings.items():
        try:
            _check_ranking(edges, scores)
        except ValueError as err:
            raise ValueError(f"rankings[{name!r}]: {err}") from None
    ks = k_grid(len(edges), n_points)
    curves = []
    for name, scores in rankings.items():
        for d in directions:
            curve = faithfulness_curve(lm, pairs, edges, scores, ks, d, batch_size, progress)
            curves.append({"ranking": name, **curve, "summary": curve_summary(curve)})
    return {"edges": [[s, r] for s, r in edges],
            "rankings": {name: [float(v) for v in scores] for name, scores in rankings.items()},
            "curves": curves, "n_pairs": len(pairs), "exact_pairs": int(exact_pairs)}


def smallest_circuit(payload: Mapping[str, Any], threshold: float = 0.8) -> dict[str, Any] | None:
    """The smallest circuit of a :func:`circuit_study` payload whose kept edges recover at least
    ``threshold`` of the clean logit difference ("keep" curves; ties: the first ranking): its
    ranking, size, edges and their scores; None when no curve reaches it."""
    key = {0.8: "k_80", 0.9: "k_90"}.get(threshold)
    if key is None:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    reached = [c for c in payload["curves"]
               if c["direction"] == "keep" and c["summary"][key] is not None]
    if not reached:
        return None
    best = min(reached, key=lambda c: c["summary"][key])
    edges = [tuple(e) for e in payload["edges"]]
    scores = payload["rankings"][best["ranking"]]
    order = edge_order(scores)[:best["summary"][key]]
    return {"ranking": best["ranking"], "k": best["summary"][key],
            "edges": [list(edges[j]) for j in order], "scores": [scores[j] for j in order]}


def _area_samples(curve: Mapping[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    """CPR and CMD of ``n_resamples`` bootstrap resamples of a curve's pairs (the same resamples
    for every curve of as many pairs and the same seed, so two rankings can be compared paired)."""
    num, den = _differences(curve["clean_ld"], curve["corrupt_ld"], curve["ld"])
    return _areas(_resampled_ratios(num, den, n_resamples, seed), curve["ks"],
                  int(curve["n_edges"]))


def area_intervals(curve: Mapping[str, Any], n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, list[float]]:
    """95 % percentile-bootstrap intervals over pairs of a curve's CPR and CMD (``{"cpr": [low,
    high], "cmd": [low, high]}``), from the per-pair logit differences the curve stores: the
    pairs are resampled, the curve recomputed as a ratio of means, its areas taken as in
    :func:`curve_summary`."""
    alpha = (1 - confidence) / 2
    return {k: [float(v) for v in np.nanquantile(a, [alpha, 1 - alpha])]
            for k, a in _area_samples(curve, n_resamples, seed).items()}


def area_difference(curve: Mapping[str, Any], other: Mapping[str, Any], n_resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Paired 95 % bootstrap intervals of ``curve``'s CPR and CMD minus ``other``'s (the same
    pairs resampled for both; both curves must be on the same pairs and circuit sizes): two
    rankings differ beyond the pairs' noise only where an interval excludes 0."""
    if curve["ks"] != other["ks"] or len(curve["clean_ld"]) != len(other["clean_ld"]):
        raise ValueError("area_difference: the two curves must share their pairs and ks")
    a, b = _area_samples(curve, n_resamples, seed), _area_samples(other, n_resamples, seed)
    alpha = (1 - confidence) / 2
    return {k: [float(v) for v in np.nanquantile(a[k] - b[k], [alpha, 1 - alpha])] for k in a}
