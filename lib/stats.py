"""Small, seeded statistics for intervention effects: bootstrap intervals, permutation tests,
rank correlation.

* :func:`bootstrap_ci` is the percentile bootstrap (Efron 1979, "Bootstrap methods: another look
  at the jackknife"; Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13): resample
  the n observations with replacement ``n_resamples`` times, take the statistic of each resample,
  report the (alpha/2, 1 - alpha/2) quantiles.
* :func:`permutation_test` is a Monte-Carlo permutation test (Fisher 1935; Good 2005,
  *Permutation, Parametric and Bootstrap Tests of Hypotheses*). Paired data use random sign flips
  of the per-unit differences, unpaired data random relabelling of the pooled sample. The p-value
  counts the observed statistic as one of the permutations, ``(1 + #{|T*| >= |T|}) / (1 + P)``
  (Phipson & Smyth 2010, "Permutation p-values should never be zero"), so it is never 0.
* :func:`spearman` wraps :func:`scipy.stats.spearmanr` with a JSON-ready result.

Every random function takes a ``seed`` and builds its own ``numpy.random.Generator``: the same
inputs and seed give the same numbers, independent of any global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def _as_1d(values, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; a statistic needs at least one observation")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values; drop or fix them first")
    return arr


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` (default: the mean) of ``values``.

    ``statistic`` maps an array (n_resamples, n) to (n_resamples,); with a single observation
    the interval collapses to that value.
    """
    arr = _as_1d(values)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    stat = statistic or (lambda x: x.mean(axis=-1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    boot = np.asarray(stat(arr[idx]), dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> dict:
    """``{"mean", "std", "n", "ci_low", "ci_high"}`` of ``values``: sample std (ddof=1; None
    for one value) and the percentile-bootstrap interval of the mean."""
    arr = _as_1d(values)
    low, high = bootstrap_ci(arr, n_bootstrap, confidence, seed)
    return {"mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n": int(arr.size), "ci_low": low, "ci_high": high}


def permutation_test(x: Sequence[float], y: Sequence[float], n_permutations: int = 10000,
                     seed: int = 0, paired: bool = False,
                     alternative: str = "two-sided") -> dict:
    """Monte-Carlo permutation test of mean(x) - mean(y).

    ``paired=True``: x[i] and y[i] belong to the same unit (e.g. the same prompt); the null is
    that the labels are exchangeable within a unit, tested by random sign flips of x[i] - y[i].
    ``paired=False``: the null is that the pooled values are exchangeable, tested by random
    relabelling. ``alternative`` is ``two-sided``, ``greater`` (x larger) or ``less``.
    Returns ``{"statistic", "p_value", "n_permutations", "paired", "alternative", "n_x", "n_y"}``.
    """
    xa, ya = _as_1d(x, "x"), _as_1d(y, "y")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    if paired:
        if xa.size != ya.size:
            raise ValueError(f"paired test needs x and y of equal length, got {xa.size} and {ya.size}")
        diff = xa - ya
        observed = float(diff.mean())
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n_permutations, diff.size))
        null = (signs * diff).mean(axis=1)
    else:
        pooled = np.concatenate([xa, ya])
        observed = float(xa.mean() - ya.mean())
        perms = np.argsort(rng.random((n_permutations, pooled.size)), axis=1)
        shuffled = pooled[perms]
        null = shuffled[:, :xa.size].mean(axis=1) - shuffled[:, xa.size:].mean(axis=1)
    # Round-off guard: a permuted statistic equal to the observed one counts as "as extreme".
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed) - tol
    elif alternative == "greater":
        extreme = null >= observed - tol
    else:
        extreme = null <= observed + tol
    p_value = (1.0 + float(extreme.sum())) / (1.0 + n_permutations)
    return {"statistic": observed, "p_value": p_value, "n_permutations": int(n_permutations),
            "paired": bool(paired), "alternative": alternative, "n_x": int(xa.size),
            "n_y": int(ya.size)}


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman rank correlation ``{"rho", "p_value", "n"}``; rho and p are None when fewer
    than three pairs or a constant input make it undefined."""
    from scipy.stats import spearmanr

    xa = np.asarray(x, dtype=np.float64).reshape(-1)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if xa.size != ya.size:
        raise ValueError(f"x and y must have equal length, got {xa.size} and {ya.size}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return {"rho": None, "p_value": None, "n": n}
    res = spearmanr(xa, ya)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else rho, "p_value": None if math.isnan(p) else p,
            "n": n}
