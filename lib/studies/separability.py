"""Separability of two sets of activation vectors: held-out Fisher ratio, unbiased MMD², sliced
Wasserstein-1 distance; and the per-layer scoring of domain pairs that notebook 00 runs.

Three metrics between X (n_a × d) and Y (n_b × d), each larger when the sets are easier to tell
apart:

* **Fisher** (Fisher 1936, "The use of multiple measurements in taxonomic problems"; the
  shrinkage form is regularised discriminant analysis, Friedman 1989, with the Ledoit & Wolf 2004
  shrinkage intensity, "A well-conditioned estimator for large-dimensional covariance matrices").
  The direction w = (S_w + λI)⁻¹(μ_b − μ_a) is fitted on training folds and the Fisher ratio
  J = (m_b − m_a)² / (s_a² + s_b²) is computed on the *held-out* fold's projections, averaged over
  K stratified folds. In-sample it would be meaningless here: with d > n the two classes are
  always linearly separable, so an unregularised J is infinite and a shrunk one is still huge
  even for two samples of the same distribution (:func:`fisher_in_sample` shows it).
* **MMD²** (Gretton et al. 2012, "A kernel two-sample test", JMLR 13), Gaussian RBF kernel with
  the median heuristic bandwidth, unbiased U-statistic estimator (can be slightly negative).
* **Sliced Wasserstein-1** (Rabin et al. 2011, "Wasserstein barycenter and its application to
  texture mixing"; Bonneel et al. 2015): the 1-D W1 distance between projections on fixed random
  unit directions, averaged. In the activations' own units (it grows with the residual norm).

The domain-separation study (causal-intervention seed) scores every layer and component at the
last prompt token for each domain pair; :func:`score_layers` does that, :data:`SCORES_SCHEMA`
(with :func:`validate_scores`) is the ``scores/<model>.json`` schema and
:func:`lib.plots.separability.plot_layer_scores` draws it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from lib.core.schema import Kind, map_of, maybe, names, nonempty

METRICS = ("fisher", "mmd", "wasserstein")
COMPONENTS = ("attn_out", "mlp_out", "resid_post")
_EPS = 1e-12


def _as_array(X, name: str) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n × d), got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def _check_pair(X, Y, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    X, Y = _as_array(X, "X"), _as_array(Y, "Y")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y have different dimensions: {X.shape[1]} vs {Y.shape[1]}")
    if len(X) < min_n or len(Y) < min_n:
        raise ValueError(f"need at least {min_n} vectors per set, got {len(X)} and {len(Y)}")
    return X, Y


# --- Fisher ------------------------------------------------------------------------------------

def ledoit_wolf_shrinkage(Z: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity δ ∈ [0, 1] of the covariance S = ZᵀZ/n of already
    centred data Z (n × d), toward μI with μ = tr(S)/d. Same value as
    ``sklearn.covariance.ledoit_wolf_shrinkage(Z, assume_centered=True)``, computed with n × n
    Gram matrices (cheap when d > n)."""
    n, d = Z.shape
    gram = Z @ Z.T
    norms2 = np.diag(gram)
    mu = norms2.sum() / (n * d)
    delta_ = np.sum(gram * gram) / n ** 2            # ||S||_F² (= ||ZᵀZ||_F² / n²)
    beta_ = np.sum(norms2 ** 2)                      # Σ_i ||z_i||⁴ (= sum of (Z∘Z)ᵀ(Z∘Z))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * norms2.sum() / n + d * mu ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else float(beta / delta)


def fisher_direction(Xa: np.ndarray, Xb: np.ndarray,
                     shrinkage: str | float = "ledoit-wolf") -> tuple[np.ndarray, float]:
    """Regularised Fisher direction w = (S_w + λI)⁻¹(μ_b − μ_a) and the λ used.

    S_w is the pooled within-class covariance (class-centred data Z, S_w = ZᵀZ/n). ``shrinkage``
    "ledoit-wolf" uses the Ledoit-Wolf intensity δ of S_w: (1−δ)S_w + δ·tr(S_w)/d·I, i.e.
    λ = δ/(1−δ)·tr(S_w)/d after dividing by (1−δ) (w's scale does not matter for J); a float γ
    gives λ = γ·tr(S_w)/d. Solved in the dual (Woodbury) form with an n × n system, so d ≫ n
    costs nothing extra.
    """
    mu_a, mu_b = Xa.mean(0), Xb.mean(0)
    Z = np.concatenate([Xa - mu_a, Xb - mu_b])
    n, d = Z.shape
    scale = float(np.sum(Z * Z)) / (n * d)  # tr(S_w)/d
    if shrinkage == "ledoit-wolf":
        delta = ledoit_wolf_shrinkage(Z)
        gamma = delta / max(1.0 - delta, _EPS)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and shrinkage > 0:
        gamma = float(shrinkage)
    else:
        raise ValueError(f"shrinkage must be 'ledoit-wolf' or a positive float, got {shrinkage!r}")
    lam = max(gamma * scale, _EPS * max(scale, 1.0))
    diff = mu_b - mu_a
    # (ZᵀZ/n + λI)⁻¹ v = (1/λ)[v − Zᵀ(nλI + ZZᵀ)⁻¹ Z v]
    inner = np.linalg.solve(n * lam * np.eye(n) + Z @ Z.T, Z @ diff)
    w = (diff - Z.T @ inner) / lam
    return w, lam


def fisher_ratio(pa: np.ndarray, pb: np.ndarray) -> float:
    """J = (m_b − m_a)² / (s_a² + s_b²) of two sets of 1-D projections (variances with ddof=1)."""
    pa, pb = np.asarray(pa, dtype=np.float64), np.asarray(pb, dtype=np.float64)
    if len(pa) < 2 or len(pb) < 2:
        raise ValueError(f"the Fisher ratio needs at least 2 projections per class, got "
                         f"{len(pa)} and {len(pb)}; use fewer folds or more prompts")
    num = (pb.mean() - pa.mean()) ** 2
    den = pa.var(ddof=1) + pb.var(ddof=1)
    return float(num / max(den, _EPS * max(num, 1.0)))


def _fold_advice(n: int) -> str:
    """The fix for too few rows: a fold count that works (N_FOLDS is at least 2), else more."""
    if n // 2 >= 2:
        return f"use N_FOLDS <= {n // 2} or more prompts"
    return f"give at least 4 prompts per side (N_FOLDS is at least 2; here {n})"


def check_folds(comparisons: Sequence[Comparison], n_folds: int) -> None:
    """Refuse comparisons too small for ``n_folds`` held-out folds, before any model runs
    (the message names the comparison and the fix)."""
    for c in comparisons:
        try:
            fold_indices(len(c.prompts_a), len(c.prompts_b), n_folds, paired=c.paired)
        except ValueError as err:
            raise ValueError(f"{c.name}: {err}") from None


def fold_indices(n_a: int, n_b: int, n_folds: int = 5, seed: int = 0,
                 paired: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out indices (into X and into Y) of each of ``n_folds`` stratified folds.

    ``paired=True`` (needs n_a == n_b; row i of X pairs with row i of Y) keeps both members of a
    pair in the same fold, so a fold never trains on the partner of a test prompt. Otherwise
    sklearn's ``StratifiedKFold(shuffle=True, random_state=seed)``. Every fold must hold at least
    2 vectors of each class.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if paired:
        if n_a != n_b:
            raise ValueError(f"paired folds need as many rows in X as in Y, got {n_a} and {n_b}")
        if n_a < 2 * n_folds:
            raise ValueError(f"{n_a} pairs are too few for {n_folds} folds (each held-out fold "
                             f"needs >= 2 pairs); {_fold_advice(n_a)}")
        perm = np.random.default_rng(seed).permutation(n_a)
        return [(np.sort(part), np.sort(part)) for part in np.array_split(perm, n_folds)]
    if min(n_a, n_b) < 2 * n_folds:
        raise ValueError(f"{n_a} and {n_b} vectors are too few for {n_folds} folds (each "
                         f"held-out fold needs >= 2 per class); {_fold_advice(min(n_a, n_b))}")
    from sklearn.model_selection import StratifiedKFold

    labels = np.r_[np.zeros(n_a, dtype=int), np.ones(n_b, dtype=int)]
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    out = []
    for _, test in skf.split(np.zeros((len(labels), 1)), labels):
        out.append((np.sort(test[test < n_a]), np.sort(test[test >= n_a] - n_a)))
    return out


def fisher_cv(X, Y, n_folds: int = 5, seed: int = 0, paired: bool = False,
              shrinkage: str | float = "ledoit-wolf") -> float:
    """Cross-validated (held-out) Fisher separability, averaged over ``n_folds`` folds.

    For each fold: fit :func:`fisher_direction` on the other folds, project the held-out
    vectors of both classes on it and take :func:`fisher_ratio`. With d > n an in-sample score
    is always large (the classes are separable by a hyperplane whatever they are); the held-out
    score is ≈ 1/k (k held-out vectors per class) for identical distributions and grows with
    the true separation. ``paired`` keeps minimal pairs together (see :func:`fold_indices`).
    """
    X, Y = _check_pair(X, Y)
    scores = []
    for test_a, test_b in fold_indices(len(X), len(Y), n_folds, seed, paired):
        train_a = np.setdiff1d(np.arange(len(X)), test_a)
        train_b = np.setdiff1d(np.arange(len(Y)), test_b)
        w, _ = fisher_direction(X[train_a], Y[train_b], shrinkage)
        scores.append(fisher_ratio(X[test_a] @ w, Y[test_b] @ w))
    return float(np.mean(scores))


def fisher_in_sample(X, Y, shrinkage: str | float = "ledoit-wolf") -> float:
    """Fisher ratio fitted and scored on the same vectors (optimistic; for contrast only)."""
    X, Y = _check_pair(X, Y)
    w, _ = fisher_direction(X, Y, shrinkage)
    return fisher_ratio(X @ w, Y @ w)


# --- MMD ----------------------------------------------------------------------------------------

def median_bandwidth(Z: np.ndarray) -> float:
    """Median of the pairwise Euclidean distances between distinct rows of ``Z``
    (:func:`scipy.spatial.distance.pdist`)."""
    from scipy.spatial.distance import pdist

    med = float(np.median(pdist(Z, "euclidean")))
    return med if med > 0 else 1.0


def mmd2_unbiased(X, Y, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with k(x, y) = exp(−||x − y||² / (2σ²)).

    σ is the median heuristic (median pairwise distance of the pooled sample) unless given.
    MMD²_u = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j): the
    diagonal terms are excluded, so the estimate is unbiased and ≈ 0 (possibly < 0) for two
    samples of one distribution.
    """
    from scipy.spatial.distance import pdist, squareform

    X, Y = _check_pair(X, Y)
    n, m = len(X), len(Y)
    Z = np.concatenate([X, Y])
    sigma = median_bandwidth(Z) if bandwidth is None else float(bandwidth)
    K = np.exp(-squareform(pdist(Z, "sqeuclidean")) / (2 * sigma ** 2))
    kxx, kyy, kxy = K[:n, :n], K[n:, n:], K[:n, n:]
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


# --- sliced Wasserstein ---------------------------------------------------------------------------

def random_directions(d: int, n_projections: int = 256, seed: int = 0) -> np.ndarray:
    """``n_projections`` unit vectors in R^d, uniform on the sphere, fixed by ``seed``."""
    theta = np.random.default_rng(seed).standard_normal((n_projections, d))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the empirical distributions of the rows of ``a`` (P × n) and ``b`` (P × m),
    one value per row: the integral over q ∈ (0, 1) of |F_a⁻¹(q) − F_b⁻¹(q)| computed exactly on
    the merged grid of quantile breakpoints (equal to ``scipy.stats.wasserstein_distance``)."""
    a, b = np.sort(np.atleast_2d(a), axis=1), np.sort(np.atleast_2d(b), axis=1)
    n, m = a.shape[1], b.shape[1]
    breaks = np.unique(np.r_[np.arange(1, n + 1) / n, np.arange(1, m + 1) / m])
    widths = np.diff(np.r_[0.0, breaks])
    mids = breaks - widths / 2
    ia = np.minimum((mids * n).astype(int), n - 1)
    ib = np.minimum((mids * m).astype(int), m - 1)
    return np.abs(a[:, ia] - b[:, ib]) @ widths


def sliced_wasserstein(X, Y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced W1: mean over fixed random unit directions θ of W1(θ·X, θ·Y)."""
    X, Y = _check_pair(X, Y, min_n=1)
    theta = random_directions(X.shape[1], n_projections, seed)
    return float(wasserstein_1d(theta @ X.T, theta @ Y.T).mean())


def score(X, Y, metric: str, n_folds: int = 5, seed: int = 0, paired: bool = False,
          n_projections: int = 256) -> float:
    """One metric by name: ``fisher`` (held-out), ``mmd`` or ``wasserstein``."""
    if metric == "fisher":
        return fisher_cv(X, Y, n_folds=n_folds, seed=seed, paired=paired)
    if metric == "mmd":
        return mmd2_unbiased(X, Y)
    if metric == "wasserstein":
        return sliced_wasserstein(X, Y, n_projections=n_projections, seed=seed)
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")


# --- domain comparisons (notebook 00) ---------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """Two domains to compare; ``kind`` "pair" (a prompt file's own minimal pairs) or "cross"."""

    name: str
    domain_a: str
    domain_b: str
    kind: str
    prompts_a: tuple[str, ...]
    prompts_b: tuple[str, ...]

    @property
    def paired(self) -> bool:
        return self.kind == "pair"


def build_comparisons(pair_sets: Sequence, cross: bool = True) -> list[Comparison]:
    """Each file's own pair (kind "pair", name = file stem) and, with ``cross``, every other
    unordered pair of its domains (kind "cross", name "<a>_vs_<b>", domains in file order).

    A domain that appears in several files pools its (distinct) prompts for cross comparisons.
    """
    domains: dict[str, list[str]] = {}
    own = set()
    out = []
    for ps in pair_sets:
        a, b = ps.domains
        if a == b:
            raise ValueError(f"{ps.name}: both domains are called {a!r}")
        out.append(Comparison(ps.name, a, b, "pair", tuple(ps.a), tuple(ps.b)))
        own.add(frozenset((a, b)))
        for dom, prompts in ((a, ps.a), (b, ps.b)):
            pool = domains.setdefault(dom, [])
            pool.extend(p for p in prompts if p not in pool)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two prompt files share a name: {names}")
    if cross:
        for a, b in itertools.combinations(domains, 2):
            if frozenset((a, b)) in own:
                continue
            out.append(Comparison(f"{a}_vs_{b}", a, b, "cross", tuple(domains[a]),
                                  tuple(domains[b])))
    return out


def _check_names(values: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad or values}; choose from {list(allowed)}")
    return values


def score_layers(lm, comparisons: Sequence[Comparison], layers: Sequence[int],
                 components: Sequence[str] = COMPONENTS, metrics: Sequence[str] = METRICS,
                 n_folds: int = 5, n_projections: int = 256, seed: int = 0,
                 batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Score every comparison at every layer and component (last-token activations).

    Each distinct prompt runs through the model once (:func:`lib.core.activations.collect_last_token`).
    Returns the ``comparisons`` list of the ``scores/<model>.json`` schema.
    """
    from lib.core.activations import collect_last_token
    from lib.core.sites import site_name

    components = _check_names(components, COMPONENTS, "components")
    metrics = _check_names(metrics, METRICS, "metrics")
    prompts = list(dict.fromkeys(p for c in comparisons for p in c.prompts_a + c.prompts_b))
    index = {p: i for i, p in enumerate(prompts)}
    sites = [site_name(comp, layer) for layer in layers for comp in components]
    acts = {s: v.double().numpy() for s, v in
            collect_last_token(lm, prompts, sites, batch_size=batch_size,
                               progress=progress).items()}

    units = [(c, comp, li) for c in comparisons for comp in components
             for li in range(len(layers))]
    if progress:
        from tqdm.auto import tqdm
        units = tqdm(units, desc="scores", unit="site")
    results = {c.name: {comp: {m: [math.nan] * len(layers) for m in metrics}
                        for comp in components} for c in comparisons}
    # The matrices are small: one BLAS thread is fastest, and avoids a 100x slowdown when
    # OpenBLAS threads compete with other processes for a few cores.
    with threadpool_limits(limits=1, user_api="blas"):
        for comp_obj, comp, li in units:
            rows_a = [index[p] for p in comp_obj.prompts_a]
            rows_b = [index[p] for p in comp_obj.prompts_b]
            site = site_name(comp, layers[li])
            X, Y = acts[site][rows_a], acts[site][rows_b]
            for metric in metrics:
                results[comp_obj.name][comp][metric][li] = score(
                    X, Y, metric, n_folds=n_folds, seed=seed, paired=comp_obj.paired,
                    n_projections=n_projections)
    return [{"name": c.name, "domain_a": c.domain_a, "domain_b": c.domain_b, "kind": c.kind,
             "n_a": len(c.prompts_a), "n_b": len(c.prompts_b), "scores": results[c.name]}
            for c in comparisons]


def validate_scores(payload: dict) -> None:
    """Raise ValueError naming the first thing that does not match the scores schema."""
    for key in ("model", "components", "metrics", "layers", "n_prompts", "comparisons",
                "provenance"):
        if key not in payload:
            raise ValueError(f"scores file lacks the key {key!r}")
    n_layers = len(payload["layers"])
    for i, comp in enumerate(payload["comparisons"]):
        where = f"comparisons[{i}] ({comp.get('name', '?')})"
        for key in ("name", "domain_a", "domain_b", "kind", "n_a", "n_b", "scores"):
            if key not in comp:
                raise ValueError(f"{where} lacks the key {key!r}")
        if comp["kind"] not in ("pair", "cross"):
            raise ValueError(f"{where}: kind must be 'pair' or 'cross', got {comp['kind']!r}")
        for component in payload["components"]:
            for metric in payload["metrics"]:
                try:
                    values = comp["scores"][component][metric]
                except KeyError:
                    raise ValueError(f"{where} has no scores for {component}/{metric}") from None
                if len(values) != n_layers:
                    raise ValueError(f"{where} {component}/{metric}: {len(values)} values for "
                                     f"{n_layers} layers")
                if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    raise ValueError(f"{where} {component}/{metric}: non-finite values {values}")


#: ``scores/<model>.json`` of notebook 00: types per field, then :func:`validate_scores`
SCORES_SCHEMA = Kind("layer_scores", "00_layer_scores", {
    "model": str, "components": names, "metrics": names, "layers": nonempty([int]),
    "n_prompts": maybe(int),
    "comparisons": nonempty([{"name": str, "domain_a": str, "domain_b": str, "kind": str,
                              "n_a": int, "n_b": int, "scores": map_of(map_of([float]))}])},
    extra=validate_scores, folder="SCORES_DIR")


def scores_frame(payload: dict):
    """Long pandas DataFrame: comparison, kind, domain_a, domain_b, component, metric, layer,
    value."""
    import pandas as pd

    rows = []
    for comp in payload["comparisons"]:
        for component, by_metric in comp["scores"].items():
            for metric, values in by_metric.items():
                for layer, value in zip(payload["layers"], values):
                    rows.append({"comparison": comp["name"], "kind": comp["kind"],
                                 "domain_a": comp["domain_a"], "domain_b": comp["domain_b"],
                                 "component": component, "metric": metric, "layer": layer,
                                 "value": value})
    return pd.DataFrame(rows)


def extreme_layers(payload: dict, metric: str = "fisher", kind: str = "pair"):
    """Per comparison and component, the most and least separable layer under ``metric``."""
    import pandas as pd

    df = scores_frame(payload)
    df = df[(df.metric == metric) & (df.kind == kind)]
    rows = []
    for (name, component), g in df.groupby(["comparison", "component"], sort=False):
        top, low = g.loc[g.value.idxmax()], g.loc[g.value.idxmin()]
        rows.append({"comparison": name, "component": component,
                     "most_separable_layer": int(top.layer), "max": float(top.value),
                     "least_separable_layer": int(low.layer), "min": float(low.value)})
    return pd.DataFrame(rows)


def prompts_digest(pair_sets: Sequence) -> str:
    """sha256 of the prompts actually used (so an edited prompt file is not mistaken for the
    same input)."""
    import hashlib
    import json

    text = json.dumps([[ps.name, list(ps.domains), list(ps.a), list(ps.b)] for ps in pair_sets],
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
