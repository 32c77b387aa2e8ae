"""Small, seeded statistics for intervention effects: bootstrap intervals, permutation tests,
rank correlation, all computed by scipy.stats.

* :func:`bootstrap_ci` is the percentile bootstrap (Efron 1979, "Bootstrap methods: another look
  at the jackknife"; Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13): resample
  the n observations with replacement ``n_resamples`` times, take the statistic of each resample,
  report the (alpha/2, 1 - alpha/2) quantiles (:func:`scipy.stats.bootstrap`,
  ``method="percentile"``).
* :func:`permutation_test` is a permutation test (Fisher 1935; Good 2005, *Permutation, Parametric
  and Bootstrap Tests of Hypotheses*; :func:`scipy.stats.permutation_test`). Paired data swap
  x[i] and y[i] within a unit (a sign flip of the difference), unpaired data relabel the pooled
  sample. When there are no more distinct permutations than ``n_permutations`` the test is
  exact (every permutation once); otherwise it is Monte Carlo and counts the observed statistic
  as one of the permutations, ``(1 + #{T* as extreme as T}) / (1 + P)`` (Phipson & Smyth 2010,
  "Permutation p-values should never be zero"), so it is never 0. Two-sided means
  ``|T*| >= |T|``.
* :func:`summarize_median`: the median over units (networks trained alike ...), its quartiles,
  range and the percentile-bootstrap interval of the median.
* :func:`t_interval` is Student's t interval of a mean, mean ± t(1 - alpha/2, n - 1) · s / √n
  (Student 1908, "The probable error of a mean"): for a handful of observations (three seeds),
  where a percentile bootstrap has few distinct resamples and an interval inside [min, max].
* :func:`spearman` wraps :func:`scipy.stats.spearmanr` with a JSON-ready result.

Every random function takes a ``seed`` and builds its own ``numpy.random.Generator`` for scipy:
the same inputs and seed give the same numbers, independent of any global random state.
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


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` (default: the mean) of ``values``.

    ``statistic`` maps an array (n_resamples, n) to (n_resamples,); with a single observation
    the interval collapses to that value.
    """
    from scipy.stats import bootstrap

    arr = _as_1d(values)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    stat = statistic or _mean
    if arr.size == 1:  # every resample is the one value (scipy refuses a single observation)
        value = float(np.asarray(stat(arr[None, :]), dtype=np.float64).reshape(-1)[0])
        return value, value
    res = bootstrap((arr,), lambda x, axis=-1: stat(x), n_resamples=n_resamples,
                    confidence_level=confidence,
                    method="percentile", vectorized=True, axis=-1,
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> dict:
    """``{"mean", "std", "n", "ci_low", "ci_high"}`` of ``values``: sample std (ddof=1; None
    for one value) and the percentile-bootstrap interval of the mean."""
    arr = _as_1d(values)
    low, high = bootstrap_ci(arr, n_bootstrap, confidence, seed)
    return {"mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n": int(arr.size), "ci_low": low, "ci_high": high}


def _median(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(x, axis=axis)


def summarize_median(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """``{"median", "q1", "q3", "min", "max", "n", "ci_low", "ci_high"}`` of ``values``: the
    median, its quartiles and range (the spread over units, e.g. networks trained alike) and
    the percentile-bootstrap interval of the median."""
    arr = _as_1d(values)
    low, high = bootstrap_ci(arr, n_bootstrap, confidence, seed, statistic=_median)
    q1, median, q3 = (float(q) for q in np.quantile(arr, [0.25, 0.5, 0.75]))
    return {"median": median, "q1": q1, "q3": q3, "min": float(arr.min()),
            "max": float(arr.max()), "n": int(arr.size), "ci_low": low, "ci_high": high}


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95
               ) -> tuple[float, float]:
    """Student's t interval of the mean of ``values``: mean ± t(1 - alpha/2, n - 1) · s / √n
    with the sample standard deviation s (ddof=1); with a single observation it collapses to
    that value. For a few observations it is wider than a bootstrap's, which cannot leave
    [min, max] and has only a few distinct resamples (10 for n = 3)."""
    from scipy.stats import t as student_t

    arr = _as_1d(values)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, mean
    half = float(student_t.ppf(0.5 + confidence / 2, arr.size - 1)
                 * arr.std(ddof=1) / math.sqrt(arr.size))
    return mean - half, mean + half


def mean_t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``values`` with its sample standard deviation (None for one value), count
    and Student's t interval (:func:`t_interval`), as a JSON-ready dict: ``mean``, ``std``,
    ``n``, ``ci_low``, ``ci_high``."""
    arr = _as_1d(values)
    low, high = t_interval(arr, confidence)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n": int(arr.size), "ci_low": low, "ci_high": high}


def permutation_test(x: Sequence[float], y: Sequence[float], n_permutations: int = 10000,
                     seed: int = 0, paired: bool = False,
                     alternative: str = "two-sided") -> dict:
    """Permutation test of mean(x) - mean(y), exact when ``n_permutations`` covers every
    permutation, else Monte Carlo with ``n_permutations`` random ones.

    ``paired=True``: x[i] and y[i] belong to the same unit (e.g. the same prompt); the null is
    that the labels are exchangeable within a unit (sign flips of x[i] - y[i]).
    ``paired=False``: the null is that the pooled values are exchangeable (relabelling).
    ``alternative`` is ``two-sided``, ``greater`` (x larger) or ``less``. Returns
    ``{"statistic", "p_value", "n_permutations", "exact", "paired", "alternative", "n_x",
    "n_y"}``.
    """
    from scipy.stats import permutation_test as scipy_permutation_test

    xa, ya = _as_1d(x, "x"), _as_1d(y, "y")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if paired and xa.size != ya.size:
        raise ValueError(f"paired test needs x and y of equal length, got {xa.size} and {ya.size}")
    if paired:
        n_distinct = 2.0 ** xa.size
    else:
        n_distinct = float(math.comb(xa.size + ya.size, xa.size))
    # Two-sided: |T*| >= |T| with T = mean(x) - mean(y), i.e. scipy's "greater" on |T|. Both
    # tails count, so a Monte-Carlo p has half the variance of scipy's 2 min(p_less, p_greater).
    two_sided = alternative == "two-sided"
    res = scipy_permutation_test(
        (xa, ya), _abs_mean_difference if two_sided else _mean_difference,
        permutation_type="samples" if paired else "independent", vectorized=True,
        n_resamples=n_permutations, alternative="greater" if two_sided else alternative,
        axis=-1, rng=np.random.default_rng(seed))
    return {"statistic": float(xa.mean() - ya.mean()), "p_value": float(res.pvalue),
            "n_permutations": int(n_permutations), "exact": bool(n_distinct <= n_permutations),
            "paired": bool(paired), "alternative": alternative, "n_x": int(xa.size),
            "n_y": int(ya.size)}


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def _abs_mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.abs(_mean_difference(a, b, axis))


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


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> dict:
    """Partial Spearman correlation of x and y given z: the Pearson correlation of the ranks of
    x and y after each is regressed (least squares, with intercept) on the ranks of z
    (Kendall & Stuart; for one control it equals (r_xy - r_xz r_yz) / sqrt((1 - r_xz²)
    (1 - r_yz²)) of the Spearman r's). Two-sided p from Student's t with n - 3 degrees of
    freedom. ``{"rho", "p_value", "n", "df"}``; rho and p are None when undefined (fewer than
    four points, or x or y constant once z is removed)."""
    from scipy.stats import rankdata, t as student_t

    xa, ya, za = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, z))
    if not xa.size == ya.size == za.size:
        raise ValueError(f"x, y and z must have equal length, got {xa.size}, {ya.size}, {za.size}")
    keep = np.isfinite(xa) & np.isfinite(ya) & np.isfinite(za)
    xa, ya, za = xa[keep], ya[keep], za[keep]
    n = int(xa.size)
    df = n - 3
    undefined = {"rho": None, "p_value": None, "n": n, "df": df}
    if n < 4:
        return undefined
    design = np.column_stack([np.ones(n), rankdata(za)])

    def residual(v):
        r = rankdata(v)
        return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]

    rx, ry = residual(xa), residual(ya)
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom <= 1e-12 * n:
        return undefined
    rho = float(np.clip(rx @ ry / denom, -1.0, 1.0))
    if abs(rho) == 1.0:
        return {"rho": rho, "p_value": 0.0, "n": n, "df": df}
    t_stat = rho * math.sqrt(df / (1.0 - rho * rho))
    return {"rho": rho, "p_value": float(2 * student_t.sf(abs(t_stat), df)), "n": n, "df": df}
