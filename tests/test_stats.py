"""Seeded statistics: bootstrap intervals, permutation tests, Spearman (lib.core.stats)."""

import numpy as np
import pytest
from scipy.stats import kstest

from lib.core import stats


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(2.0, 1.0, size=25)
    large = rng.normal(2.0, 1.0, size=400)
    for x in (small, large):
        low, high = stats.bootstrap_ci(x, 2000, seed=0)
        assert low < x.mean() < high
    width_small = np.subtract(*stats.bootstrap_ci(small, 2000, seed=0)[::-1])
    width_large = np.subtract(*stats.bootstrap_ci(large, 2000, seed=0)[::-1])
    assert width_large < width_small / 2.5  # ~ sqrt(400 / 25) = 4 times narrower
    # the interval of the mean is close to mean +- 1.96 sd / sqrt(n)
    se = large.std(ddof=1) / np.sqrt(large.size)
    assert width_large == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_is_seeded_and_handles_one_value():
    x = np.arange(30.0)
    assert stats.bootstrap_ci(x, 500, seed=3) == stats.bootstrap_ci(x, 500, seed=3)
    assert stats.bootstrap_ci(x, 500, seed=3) != stats.bootstrap_ci(x, 500, seed=4)
    assert stats.bootstrap_ci([1.5], 100) == (1.5, 1.5)
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci([], 100)
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci([1.0, float("nan")], 100)


def test_summarize_fields():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], 1000, seed=0)
    assert set(s) == {"mean", "std", "n", "ci_low", "ci_high"}
    assert s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert 1.0 <= s["ci_low"] <= 2.5 <= s["ci_high"] <= 4.0
    assert stats.summarize([7.0])["std"] is None


@pytest.mark.parametrize("paired", [True, False])
def test_permutation_p_is_small_for_a_clear_difference(paired):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 40)
    y = x - 1.0 + rng.normal(0, 0.3, 40) if paired else rng.normal(0.0, 1.0, 40)
    res = stats.permutation_test(x, y, 2000, seed=0, paired=paired)
    assert res["p_value"] < 0.01
    assert res["p_value"] >= 1 / 2001  # never zero
    assert res["statistic"] == pytest.approx(x.mean() - y.mean())
    # one-sided: "greater" is significant, "less" is not
    assert stats.permutation_test(x, y, 2000, 0, paired, "greater")["p_value"] < 0.01
    assert stats.permutation_test(x, y, 2000, 0, paired, "less")["p_value"] > 0.9


@pytest.mark.parametrize("paired", [True, False])
def test_permutation_p_is_uniform_under_the_null(paired):
    rng = np.random.default_rng(123)
    pvals = []
    for i in range(300):
        x = rng.normal(0, 1, 15)
        y = rng.normal(0, 1, 15)
        pvals.append(stats.permutation_test(x, y, 199, seed=i, paired=paired)["p_value"])
    pvals = np.array(pvals)
    assert 0.02 <= (pvals < 0.05).mean() <= 0.09
    assert 0.40 <= (pvals < 0.5).mean() <= 0.60
    assert kstest(pvals, "uniform").pvalue > 0.001


def test_permutation_is_seeded_and_checks_inputs():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.5, 1.0, 2.0, 2.5]
    assert stats.permutation_test(x, y, 500, seed=1) == stats.permutation_test(x, y, 500, seed=1)
    with pytest.raises(ValueError, match="equal length"):
        stats.permutation_test([1.0, 2.0], [1.0], paired=True)
    with pytest.raises(ValueError, match="alternative"):
        stats.permutation_test(x, y, alternative="bigger")


def test_spearman():
    x = np.arange(10.0)
    assert stats.spearman(x, x ** 3)["rho"] == pytest.approx(1.0)
    assert stats.spearman(x, -x)["rho"] == pytest.approx(-1.0)
    assert stats.spearman(x, -x)["p_value"] < 0.001
    assert stats.spearman(x, np.ones(10)) == {"rho": None, "p_value": None, "n": 10}
    assert stats.spearman([1.0, 2.0], [2.0, 1.0])["rho"] is None
    # non-finite pairs are dropped
    assert stats.spearman([1.0, 2.0, 3.0, np.nan], [1.0, 2.0, 3.0, 4.0])["n"] == 3


# --- scipy.stats against the hand-written versions it replaced ---------------------------------
# lib.core.stats computed both by hand until scipy.stats.bootstrap / permutation_test took over.
# The bootstrap draws the same resamples from the same seed (rng.integers(0, n, (B, n))), so its
# intervals are unchanged up to round-off in the quantile (measured: <= 1.3e-15 on
# normal data of 2 to 126 values). The
# permutation test draws its permutations differently: exhaustive tests are exact and equal to
# enumeration; Monte-Carlo p-values move within their Monte-Carlo error, sqrt(p (1 - p) / P)
# (at most 0.005 for the P = 10000 of notebook 02's committed results).

def reference_bootstrap_ci(values, n_resamples=2000, confidence=0.95, seed=0):
    """The hand-written percentile bootstrap of the mean that lib.core.stats used before scipy."""
    arr = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, arr.size, size=(n_resamples, arr.size))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(arr[idx].mean(axis=-1), [alpha, 1.0 - alpha])
    return float(low), float(high)


def reference_permutation_p(x, y, n_permutations, seed=0, paired=False):
    """The hand-written two-sided Monte-Carlo permutation p-value used before scipy."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if paired:
        diff = xa - ya
        observed = diff.mean()
        null = (rng.choice([-1.0, 1.0], size=(n_permutations, diff.size)) * diff).mean(axis=1)
    else:
        pooled = np.concatenate([xa, ya])
        observed = xa.mean() - ya.mean()
        shuffled = pooled[np.argsort(rng.random((n_permutations, pooled.size)), axis=1)]
        null = shuffled[:, :xa.size].mean(axis=1) - shuffled[:, xa.size:].mean(axis=1)
    tol = 1e-12 * max(1.0, abs(observed))
    return (1.0 + float((np.abs(null) >= abs(observed) - tol).sum())) / (1.0 + n_permutations)


def exhaustive_p(x, y, paired, alternative="two-sided"):
    """The exact permutation p-value by enumerating every sign flip or relabelling."""
    import itertools

    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    observed = xa.mean() - ya.mean()
    if paired:
        diff = xa - ya
        null = np.array([(np.array(s) * diff).mean()
                         for s in itertools.product([-1.0, 1.0], repeat=diff.size)])
    else:
        pooled = np.concatenate([xa, ya])
        null = []
        for chosen in itertools.combinations(range(pooled.size), xa.size):
            mask = np.zeros(pooled.size, dtype=bool)
            mask[list(chosen)] = True
            null.append(pooled[mask].mean() - pooled[~mask].mean())
        null = np.array(null)
    tol = 1e-9 * max(1.0, abs(observed))
    if alternative == "two-sided":
        return float((np.abs(null) >= abs(observed) - tol).mean())
    if alternative == "greater":
        return float((null >= observed - tol).mean())
    return float((null <= observed + tol).mean())


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (40, 2), (126, 3)])
def test_bootstrap_equals_the_hand_written_one(n, seed):
    x = np.random.default_rng(100 + n).lognormal(0.0, 1.0, n)
    for confidence in (0.9, 0.95):
        new = stats.bootstrap_ci(x, 2000, confidence, seed)
        old = reference_bootstrap_ci(x, 2000, confidence, seed)
        assert new == pytest.approx(old, rel=1e-12, abs=1e-15)
    # and the comparison can fail: another seed gives another interval (2 values: always
    # min and max)
    assert n == 2 or stats.bootstrap_ci(x, 2000, 0.95, seed + 1) != pytest.approx(
        reference_bootstrap_ci(x, 2000, 0.95, seed), rel=1e-12)


@pytest.mark.parametrize("paired,n", [(True, 8), (False, 5)])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_exhaustive_permutation_test_is_exact(paired, n, alternative):
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.8, 1.0, n), rng.normal(0.0, 1.0, n)
    res = stats.permutation_test(x, y, 10000, seed=0, paired=paired, alternative=alternative)
    assert res["exact"]   # 2^8 = 256 sign flips, C(10, 5) = 252 relabellings: all enumerated
    assert res["p_value"] == pytest.approx(exhaustive_p(x, y, paired, alternative), abs=1e-12)
    # exact means independent of the seed
    again = stats.permutation_test(x, y, 10000, seed=5, paired=paired, alternative=alternative)
    assert again["p_value"] == res["p_value"]


@pytest.mark.parametrize("paired", [True, False])
def test_monte_carlo_permutation_p_moves_only_within_its_error(paired):
    rng = np.random.default_rng(11)
    n = 12   # 4096 sign flips, 2.7e6 relabellings: more than the 2000 drawn
    x = rng.normal(0.4, 1.0, n)
    y = x - 0.2 + rng.normal(0.0, 1.0, n) if paired else rng.normal(0.0, 1.0, n)
    n_perm = 2000
    new = stats.permutation_test(x, y, n_perm, seed=0, paired=paired)
    assert not new["exact"]
    old = reference_permutation_p(x, y, n_perm, seed=0, paired=paired)
    if paired:
        truth = exhaustive_p(x, y, paired)
    else:   # too many relabellings to enumerate: a long Monte-Carlo run stands in
        truth = reference_permutation_p(x, y, 200_000, seed=1, paired=paired)
    assert 0.05 < truth < 0.95   # a p-value where Monte-Carlo error is largest
    se = np.sqrt(truth * (1 - truth) / n_perm)
    assert abs(new["p_value"] - truth) < 4 * se
    assert abs(old - truth) < 4 * se
    assert abs(new["p_value"] - old) < 4 * np.sqrt(2) * se


def test_partial_spearman_equals_the_closed_form_and_removes_a_shared_cause():
    from scipy.stats import spearmanr

    from lib.core.stats import partial_spearman

    rng = np.random.default_rng(0)
    z = np.arange(30.0)
    x, y = z + rng.normal(0, 5, 30), z + rng.normal(0, 5, 30)
    r_xy, r_xz, r_yz = (spearmanr(a, b)[0] for a, b in ((x, y), (x, z), (y, z)))
    closed = (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    res = partial_spearman(x, y, z)
    assert res["rho"] == pytest.approx(closed, abs=1e-12) and res["df"] == 27
    assert spearmanr(x, y)[1] < 1e-4 and res["p_value"] > 0.05   # z was the shared cause
    direct = partial_spearman(x, x + rng.normal(0, 1, 30), z)
    assert direct["rho"] > 0.5 and direct["p_value"] < 1e-3
    assert partial_spearman([1, 2, 3], [1, 2, 3], [1, 2, 3])["rho"] is None   # n < 4
    assert partial_spearman(z, z * 2, z)["rho"] is None   # nothing left once z is removed
    with pytest.raises(ValueError, match="equal length"):
        partial_spearman([1, 2], [1, 2, 3], [1, 2, 3])


def test_summarize_median_hand_values():
    s = stats.summarize_median([10.0, 1.0, 3.0, 2.0, 4.0], 1000, seed=0)
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0,
                                                                           10.0, 5)
    assert 1.0 <= s["ci_low"] <= 3.0 <= s["ci_high"] <= 10.0
    assert stats.summarize_median([0.5])["ci_low"] == 0.5
