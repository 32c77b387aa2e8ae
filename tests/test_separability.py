"""Separability metrics on synthetic Gaussians with known separation, and per-layer scoring."""

import math

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from lib.studies import separability as S
from lib.plots import separability as sp
from lib.core.prompts import PromptPairs

SHIFTS = [0.0, 1.0, 2.0, 4.0]


def gaussians(shift, n=120, d=20, seed=0, direction=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    Y = rng.standard_normal((n, d))
    u = np.zeros(d) if direction is None else direction
    if direction is None:
        u[0] = 1.0
    return X, Y + shift * u


@pytest.mark.parametrize("metric", S.METRICS)
def test_metric_ranks_increasing_shifts(metric):
    values = [S.score(*gaussians(s, seed=1), metric, n_folds=5, seed=0, paired=True)
              for s in SHIFTS]
    assert all(b > a for a, b in zip(values, values[1:])), (metric, values)


def test_identical_distributions_score_about_zero():
    X, Y = gaussians(0.0, n=400, d=10, seed=2)
    assert S.fisher_cv(X, Y) < 0.1                 # ≈ 1/k with k = 80 held-out per class
    assert abs(S.mmd2_unbiased(X, Y)) < 5e-3       # unbiased: may be slightly negative
    far = S.sliced_wasserstein(*gaussians(2.0, n=400, d=10, seed=2))
    near = S.sliced_wasserstein(X, Y)
    assert near < 0.15 and near < far / 4          # finite-sample bias ~ n^-1/2


def test_unbiased_mmd_is_centred_at_zero():
    """Averaged over many identical-distribution draws the unbiased estimate is ~0 and takes
    both signs; the biased V-statistic (diagonal included) would be > 0 every time."""
    vals = [S.mmd2_unbiased(*gaussians(0.0, n=50, d=5, seed=s)) for s in range(30)]
    assert min(vals) < 0 < max(vals)
    assert abs(np.mean(vals)) < 3 * np.std(vals) / math.sqrt(len(vals)) + 1e-4


def test_mmd_matches_a_direct_formula():
    X, Y = gaussians(1.0, n=15, d=4, seed=3)
    Z = np.concatenate([X, Y])
    dist = np.sqrt(((Z[:, None] - Z[None]) ** 2).sum(-1))
    sigma = np.median(dist[np.triu_indices(len(Z), 1)])
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * sigma ** 2))
    n = len(X)
    xx = sum(k(X[i], X[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(X[i], Y[j]) for i in range(n) for j in range(n)) / (n * n)
    assert S.mmd2_unbiased(X, Y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_fisher_held_out_vs_in_sample_when_d_much_larger_than_n():
    """d = 1000, 40 vectors per class, same distribution: a hyperplane separates the training
    vectors whatever they are, so the in-sample ratio is large; held out it is small."""
    X, Y = gaussians(0.0, n=40, d=1000, seed=4)
    held_out = S.fisher_cv(X, Y, n_folds=5, seed=0)
    in_sample = S.fisher_in_sample(X, Y)
    assert held_out < 0.5
    assert in_sample > 5
    assert in_sample > 20 * held_out
    # ...while a real difference (d ≫ n too) is found held out
    X2, Y2 = gaussians(10.0, n=40, d=1000, seed=4, direction=np.ones(1000) / math.sqrt(1000))
    assert S.fisher_cv(X2, Y2, n_folds=5, seed=0) > 5 * held_out + 1


def test_fisher_direction_dual_form_equals_direct_solve():
    X, Y = gaussians(0.5, n=30, d=80, seed=5)
    for shrinkage in ("ledoit-wolf", 0.1):
        w, lam = S.fisher_direction(X, Y, shrinkage)
        Z = np.concatenate([X - X.mean(0), Y - Y.mean(0)])
        direct = np.linalg.solve(Z.T @ Z / len(Z) + lam * np.eye(80), Y.mean(0) - X.mean(0))
        np.testing.assert_allclose(w, direct, rtol=1e-8, atol=1e-10)


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(6)
    for n, d in [(30, 200), (200, 15)]:
        Z = rng.standard_normal((n, d)) * rng.uniform(0.2, 3, d)
        Z -= Z.mean(0)
        assert S.ledoit_wolf_shrinkage(Z) == pytest.approx(
            ledoit_wolf_shrinkage(Z, assume_centered=True), rel=1e-9)


def test_paired_folds_keep_pairs_together_and_cover_everything():
    folds = S.fold_indices(23, 23, n_folds=5, seed=0, paired=True)
    assert len(folds) == 5
    for ta, tb in folds:
        np.testing.assert_array_equal(ta, tb)
        assert len(ta) >= 2
    assert sorted(np.concatenate([f[0] for f in folds]).tolist()) == list(range(23))


def test_unpaired_folds_are_stratified():
    folds = S.fold_indices(50, 20, n_folds=5, seed=0)
    assert [(len(a), len(b)) for a, b in folds] == [(10, 4)] * 5
    assert sorted(np.concatenate([f[1] for f in folds]).tolist()) == list(range(20))


def test_paired_folds_avoid_leakage():
    """Each pair shares a large random offset (the 'task'); the domains differ by nothing.
    With pairs kept together the held-out score stays low; unequal sets cannot be paired."""
    rng = np.random.default_rng(7)
    task = rng.standard_normal((60, 30)) * 5
    X = task + rng.standard_normal((60, 30))
    Y = task + rng.standard_normal((60, 30))
    assert S.fisher_cv(X, Y, paired=True) < 0.3
    with pytest.raises(ValueError, match="paired folds"):
        S.fold_indices(10, 12, paired=True)


def test_fold_errors_are_clear():
    with pytest.raises(ValueError, match="too few"):
        S.fold_indices(6, 6, n_folds=5, paired=True)
    with pytest.raises(ValueError, match="too few"):
        S.fold_indices(40, 6, n_folds=5)
    with pytest.raises(ValueError, match="n_folds"):
        S.fold_indices(40, 40, n_folds=1)
    with pytest.raises(ValueError, match="different dimensions"):
        S.mmd2_unbiased(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        S.sliced_wasserstein(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="unknown metric"):
        S.score(np.zeros((5, 3)), np.zeros((5, 3)), "kl")
    with pytest.raises(ValueError, match="shrinkage"):
        S.fisher_direction(np.ones((5, 3)), np.zeros((5, 3)), "oas")


def test_wasserstein_1d_equals_scipy_and_shift_is_exact():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((4, 17)), rng.standard_normal((4, 29)) * 2 + 1
    expected = [wasserstein_distance(a[i], b[i]) for i in range(4)]
    np.testing.assert_allclose(S.wasserstein_1d(a, b), expected, rtol=1e-12)
    # Y = X + Δ exactly: every 1-D W1 equals |θ·Δ|
    X = rng.standard_normal((50, 6))
    delta = np.array([1.0, -2.0, 0, 0, 0.5, 0])
    theta = S.random_directions(6, 256, seed=3)
    assert S.sliced_wasserstein(X, X + delta, 256, seed=3) == pytest.approx(
        np.abs(theta @ delta).mean(), rel=1e-10)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0)


def test_same_seed_same_result_other_seed_differs():
    X, Y = gaussians(1.0, n=60, d=30, seed=9)
    assert S.fisher_cv(X, Y, seed=1) == S.fisher_cv(X, Y, seed=1)
    assert S.sliced_wasserstein(X, Y, seed=1) == S.sliced_wasserstein(X, Y, seed=1)
    assert S.sliced_wasserstein(X, Y, seed=1) != S.sliced_wasserstein(X, Y, seed=2)



def _pairs(name, da, db, n):
    return PromptPairs(name, (da, db), tuple(f"{da} prompt number {i}" for i in range(n)),
                       tuple(f"{db} question {i}?" for i in range(n)))


def test_build_comparisons_names_and_kinds():
    sets = [_pairs("cpp_python", "cpp", "python", 4), _pairs("finance_medical", "finance",
                                                              "medical", 4),
            _pairs("science_maths", "science", "maths", 4)]
    comps = S.build_comparisons(sets)
    pairs = [c for c in comps if c.kind == "pair"]
    cross = [c for c in comps if c.kind == "cross"]
    assert [c.name for c in pairs] == ["cpp_python", "finance_medical", "science_maths"]
    assert len(cross) == math.comb(6, 2) - 3
    assert "cpp_vs_finance" in {c.name for c in cross}
    assert not {"cpp_vs_python", "finance_vs_medical"} & {c.name for c in cross}
    # a domain shared by two files pools its prompts
    comps2 = S.build_comparisons([sets[0], _pairs("python_rust", "python", "rust", 3)])
    cross2 = {c.name: c for c in comps2 if c.kind == "cross"}
    assert set(cross2) == {"cpp_vs_rust"}
    assert len(S.build_comparisons([sets[0]], cross=False)) == 1


def test_score_layers_on_a_tiny_model_has_the_schema(llama):
    lm = llama
    sets = [_pairs("ab", "a", "b", 10), _pairs("cd", "c", "d", 10)]
    comps = S.build_comparisons(sets)
    result = S.score_layers(lm, comps, [0, 1], n_folds=2, n_projections=16, progress=False)
    payload = {"model": lm.name, "components": list(S.COMPONENTS), "metrics": list(S.METRICS),
               "layers": [0, 1], "n_prompts": 10, "comparisons": result, "provenance": {}}
    S.validate_scores(payload)
    assert [c["name"] for c in result] == ["ab", "cd", "a_vs_c", "a_vs_d", "b_vs_c", "b_vs_d"]
    assert all(c["n_a"] == 10 and c["n_b"] == 10 for c in result)
    again = S.score_layers(lm, comps, [0, 1], n_folds=2, n_projections=16, progress=False)
    assert again == result
    ext = S.extreme_layers(payload, "fisher", "pair")
    assert len(ext) == 2 * 3 and set(ext.most_separable_layer) <= {0, 1}
    fig = sp.plot_layer_scores(payload)
    assert fig is not None
    # the validator can fail
    payload["comparisons"][0]["scores"]["mlp_out"]["mmd"] = [1.0]
    with pytest.raises(ValueError, match="1 values for 2 layers"):
        S.validate_scores(payload)
    payload["comparisons"][0]["scores"]["mlp_out"]["mmd"] = [1.0, float("nan")]
    with pytest.raises(ValueError, match="non-finite"):
        S.validate_scores(payload)


def gram_sq_dists(A, B):
    """The Gram-matrix formula ||a||² + ||b||² - 2 a·b that scipy's pdist replaced."""
    return np.maximum((A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * A @ B.T, 0.0)


def mmd2_by_gram(X, Y):
    Z = np.concatenate([X, Y])
    d2 = gram_sq_dists(Z, Z)
    sigma = float(np.median(np.sqrt(d2[np.triu_indices(len(Z), k=1)])))
    K = np.exp(-d2 / (2 * sigma ** 2))
    n, m = len(X), len(Y)
    kxx, kyy, kxy = K[:n, :n], K[n:, n:], K[:n, n:]
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()), sigma


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_mmd_and_bandwidth_unchanged_by_scipy_distances(offset):
    """pdist gives the numbers of the hand-written Gram formula (measured here: relative
    change 0 at offset 0, 6e-13 at offset 10; 2e-7 at offset 1e4, where the formula cancels
    and pdist does not)."""
    X, Y = gaussians(0.5, n=60, d=200, seed=3)
    X, Y = X + offset, Y + offset
    want_mmd, want_sigma = mmd2_by_gram(X, Y)
    assert S.median_bandwidth(np.concatenate([X, Y])) == pytest.approx(want_sigma, rel=1e-12)
    assert S.mmd2_unbiased(X, Y) == pytest.approx(want_mmd, rel=1e-10)
    # translation invariance holds to round-off with pdist (the Gram formula loses digits)
    far = S.mmd2_unbiased(X + 1e4, Y + 1e4)
    assert far == pytest.approx(S.mmd2_unbiased(X, Y), rel=1e-9)
