"""Domain swaps at the last token: cross-swap interventions, the reverse intervention that finds
characteristic tokens, zero ablation and concept-vector injection.

This is the causal half of the domain-separation study (seed: ``causal_intervention_README.md``,
ManjotSingh08x/causal_intervention): where does a model keep "which domain am I in" (C++ vs
Python, finance vs medical, ...), and do the layers where two domains separate best (Fisher,
MMD, Wasserstein scores of notebook 00) also matter most causally? The intervention is an
interchange intervention (activation patching; Vig et al. 2020 "Causal mediation analysis for
interpreting neural NLP"; Geiger et al. 2021 "Causal abstractions of neural networks") on the
output of one attention or MLP module at the prompt's last token, between the two prompts of a
minimal pair (the same task in domain A and in domain B).

Definitions (A and B are ``PromptPairs.domains[0]`` and ``[1]``; p(.) is the next-token
distribution at the last prompt position):

* **Sides.** ``b_into_a``: base = the domain-A prompt, its last-token component output at one
  layer replaced by the paired domain-B prompt's. ``a_into_b``: base = the B prompt with A's
  activation. Zero ablation and injection use the same base prompts (``b_into_a`` = runs on A).
* **KL** = KL(p_base || p_intervened) = sum_t p_base(t) (log p_base(t) - log p_intervened(t)).
* **Masses.** mass_A = sum of p over the token set of A (from ``token_sets/<model>.json``),
  mass_B likewise, before (base run) and after (intervened run).
* **Bias shift** Δ = (mass_B - mass_A)_after - (mass_B - mass_A)_before, on both sides with
  the same sign convention as the seed (positive = moved toward B). A swap that carries domain
  information gives Δ > 0 on ``b_into_a`` and Δ < 0 on ``a_into_b``.
* **Zero ablation**: the component's last-token output set to 0; KL and Δ against the base.
* **Concept-vector injection** at one layer: add α·(mean_B - mean_A) of the component's
  last-token outputs (means over the discovery half's prompts, so the vector is not fitted to
  the held-out prompts it is tested on) to A's runs (``b_into_a``), and
  α·(mean_A - mean_B) to B's runs (``a_into_b``); masses, bias and KL per α.
* **Reverse intervention** (notebook 01), on the *discovery* half of a seeded split of each
  pair file (:func:`split_pairs`; notebook 02 measures every effect on the other half):
  score_B(t) = mean over prompts, layers and components of the change of t's next-token
  probability on side ``b_into_a`` (B's activation promotes t in A's run, so t is
  characteristic of B); score_A(t) likewise on side ``a_into_b``. The change is
  log max(p_swapped, floor) - log max(p_base, floor) (``dlogp``, the default: relative, so a
  frequent token does not win by having much probability to move) or p_swapped - p_base
  (``dprob``, the seed's: on smollm2-135m its sets are mostly ' the', '\n', ' a').
  :func:`select_token_sets` keeps the top N of each domain, disjoint (below). The seed's code
  filed the tokens promoted on ``b_into_a`` under A (``assignment="base"``, which exchanges the
  two lists' labels). **Reference** (no intervention): ref_B(t) = mean over pairs of
  log max(p_B(t), floor) - log max(p_A(t), floor) of the clean runs, ref_A = -ref_B; the Jaccard
  overlap of each score and filing with its top N (:func:`reference_agreement`) says which
  sets characterize their domain.
* **Depth control** (:func:`_depth_control`): separability vs swap effect per layer, given the
  layer index (partial Spearman) and relative to zero ablation at the same layer.

Efficiency. Every swap, zero ablation and injection is a row on the intervention engine
(:mod:`lib.engine`): each prompt is a context run once; a last-token intervention cannot change
earlier positions (causal attention), so each row runs only the last token on the prompt's
stored key/value cache, from the intervened layer up (where the engine's self-check allows);
a swap's value references the paired prompt's stored last-token output. The concept vectors'
means come from one batched forward per group of prompts
(:func:`lib.activations.collect_last_token`). The seed's algorithm (one unbatched full forward
for each capture, each baseline and each intervention) lives in the benchmark
(``benchmarks/bench_domain_swap.py``) that times the two against each other.

Result file of notebook 02, ``full_compute/<model>.json``::

    {"model": str, "metric": "fisher", "components": ["attn_out", "mlp_out"],
     "sides": {"b_into_a": "base = A prompt, B's activation", "a_into_b": ...},
     "pairs": {"cpp_python": {
        "domains": ["cpp", "python"], "n_prompts": int (held-out pairs evaluated),
        "evaluated_pairs": [their indices in the pair file], "layers": [ints evaluated],
        "token_set_sizes": {"cpp": int, "python": int},
        "layer_ranking": {component: [layers, most separable first]},
        "top_layers": {component: [k layers]}, "bottom_layers": {component: [k layers]},
        "swap": {component: {
            "per_layer": [{"layer": l, "score": float|null, "rank": int|null,
                           "group": "top"|"bottom"|"middle",
                           "sides": {side: {"kl": STAT, "delta": STAT, "mass_a_before": STAT,
                                            "mass_a_after": STAT, "mass_b_before": STAT,
                                            "mass_b_after": STAT}}}, ...],
            "top_vs_bottom": {"k": int, "top_layers": [...], "bottom_layers": [...],
                              side|"both": {effect: {"top": STAT, "bottom": STAT, "diff": STAT,
                                                     "p_value": float, "test": str, ...}}},
            "spearman": {side|"both": {effect: {"rho", "p_value", "n"}}},
            "depth_control": {side|"both": {effect: {
                "partial_given_layer": {"rho", "p_value", "n", "df"},
                "partial_given_zero": {...}, "ratio_to_zero": {"rho", "p_value", "n"},
                "relative_top_vs_bottom": {"top", "bottom", "diff", "p_value", ...}}}}}},
        "zero_ablation": {component: {"per_layer": [{"layer", "score", "group",
                                                     "sides": {side: {"kl": STAT, "delta": STAT}}}],
                                      "spearman": {...}}},
        "injection": {component: {"layer": int, "alphas": [...], "vector_norm": float,
                                  "sides": {side: [{"alpha", "kl": STAT, "mass_a": STAT,
                                                    "mass_b": STAT, "bias": STAT,
                                                    "delta": STAT}]}}}}},
     "provenance": {...}}

where STAT = {"mean", "std", "n", "ci_low", "ci_high"} (95 % percentile bootstrap of the mean
over prompts, seeded) and effect is ``kl`` or ``abs_delta`` (|Δ|). ``top_vs_bottom`` compares,
per prompt, the mean effect over the top-k layers with the mean over the bottom-k layers: "top"
and "bottom" summarise those per-prompt means, "diff" their per-prompt difference, and the
p-value is a paired sign-flip permutation test over prompts (:func:`lib.stats.permutation_test`).
"both" averages the two sides per prompt. ``spearman`` correlates the per-layer separability
score with the per-layer mean effect over all evaluated layers that have a score.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib import paths
from lib.activations import collect_last_token
from lib.engine import Context, Engine, Ref, Row, run_naive
from lib.hooks import Intervention
from lib.io import read_json, slug
from lib.prompts import PromptPairs
from lib.sites import site_name
from lib.stats import partial_spearman, permutation_test, spearman, summarize

COMPONENTS = ("attn_out", "mlp_out")
SIDES = ("b_into_a", "a_into_b")
SIDE_DOC = {"b_into_a": "base = domain-A prompt, last-token output replaced by the paired "
                        "domain-B prompt's (injection: + alpha (mean_B - mean_A))",
            "a_into_b": "base = domain-B prompt, last-token output replaced by the paired "
                        "domain-A prompt's (injection: + alpha (mean_A - mean_B))"}
EFFECTS = ("kl", "abs_delta")
_BASE_OF = {"b_into_a": 0, "a_into_b": 1}  # index of the base domain


class TokenSetMissingError(FileNotFoundError):
    """No token set file for a model (notebook 01 has not been run for it)."""


class ScoresMissingError(FileNotFoundError):
    """No separability scores for a model, pair, component or metric (notebook 00)."""


# --- per-prompt engine ----------------------------------------------------------------------

@dataclass
class PairRun:
    """Per-prompt results of one domain pair. Arrays are float64 numpy.

    ``base[side]``: masses of the clean base run, ``{"mass_a", "mass_b"}`` of shape (n,).
    ``swap[side]`` / ``zero[side]``: ``{"kl", "mass_a", "mass_b"}`` of shape
    (n, len(components), len(layers)). ``inject[side]``: same keys, shape (n, len(components),
    len(alphas)). With ``accumulate_dprob`` (float64 torch tensors of shape (vocab,)):
    ``dprob[side]`` = sum over prompts, components and layers of p_swapped - p_base;
    ``dlogp[side]`` = the same sum of log max(p_swapped, floor) - log max(p_base, floor);
    ``clean_logp[d]`` = sum over the prompts of domain d (0 = A, 1 = B) of the clean run's
    log max(p, floor); ``clean_p[d]`` = the sum of its p.
    """

    name: str
    domains: tuple[str, str]
    layers: list[int]
    components: list[str]
    n: int
    base: dict = field(default_factory=dict)
    swap: dict = field(default_factory=dict)
    zero: dict = field(default_factory=dict)
    inject: dict = field(default_factory=dict)
    inject_layers: dict = field(default_factory=dict)
    inject_norms: dict = field(default_factory=dict)
    alphas: list[float] = field(default_factory=list)
    dprob: dict = field(default_factory=dict)
    dlogp: dict = field(default_factory=dict)
    clean_logp: dict = field(default_factory=dict)
    clean_p: dict = field(default_factory=dict)
    prob_floor: float = 0.0

    def delta(self, kind: str, side: str) -> np.ndarray:
        """Bias shift Δ = (mass_B - mass_A)_after - (mass_B - mass_A)_before, per prompt."""
        after = getattr(self, kind)[side]
        before = self.base[side]
        bias_before = (before["mass_b"] - before["mass_a"])[:, None, None]
        return (after["mass_b"] - after["mass_a"]) - bias_before


def _ids_tensor(ids: Sequence[int] | None, device) -> torch.Tensor | None:
    if ids is None:
        return None
    return torch.as_tensor(list(ids), dtype=torch.long, device=device)


def _token_stats(logits: torch.Tensor, p_clean: torch.Tensor, ids_a, ids_b,
                 chunk: int = 64) -> torch.Tensor:
    """What the metrics need of each row's last-position logits ``z`` (rows, vocab), in
    float64: ``[lse(z), z . p_c for every clean distribution c of p_clean (contexts, vocab),
    z at A's token set, z at B's]``, a few numbers per row instead of the vocabulary.

    An engine readout (:mod:`lib.engine` applies it to each batch as it comes), so only these
    numbers are kept and stacked, not every row's logits."""
    out = []
    for lo in range(0, logits.shape[0], chunk):
        z = logits[lo:lo + chunk].double()
        parts = [None, z @ p_clean.T]
        if ids_a is not None:
            parts += [z[:, ids_a], z[:, ids_b]]
        top = z.amax(dim=-1, keepdim=True)   # log-sum-exp in place on the float64 copy
        parts[0] = z.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def _stats_metrics(stats: torch.Tensor, context: int, neg_entropy: torch.Tensor,
                   n_contexts: int, n_a: int) -> dict:
    """KL(clean context ``context`` || row) and the token-set masses per row from
    :func:`_token_stats`. With ``z`` a row's logits and ``lse`` their log-sum-exp, ``log p =
    z - lse``, so ``KL(clean || row) = sum_t p_clean log p_clean - p_clean . z + lse`` (the
    clean probabilities sum to 1) and a mass is ``sum over the set of exp(z - lse)``."""
    lse = stats[:, 0]
    out = {"kl": neg_entropy[context] - stats[:, 1 + context] + lse}
    if stats.shape[1] > 1 + n_contexts:
        at = stats[:, 1 + n_contexts:]
        out["mass_a"] = (at[:, :n_a] - lse[:, None]).exp().sum(-1)
        out["mass_b"] = (at[:, n_a:] - lse[:, None]).exp().sum(-1)
    return out


def _clean_distributions(clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, sum_t p log p) per row of clean logits (contexts, vocab), float64."""
    logp = torch.log_softmax(clean.double(), dim=-1)
    p = logp.exp()
    return p, (p * logp).sum(-1)


def _row_metrics(logits: torch.Tensor, ids_a, ids_b, keep_probs: bool = False,
                 chunk: int = 64) -> dict:
    """KL(row 0 || row r), token-set masses per row (and, with ``keep_probs``, the float64
    probabilities) from last-position logits (rows, vocab): :func:`_token_stats` and
    :func:`_stats_metrics` with row 0 as the clean distribution. Computed in float64, in
    chunks of rows, so a KL is never negative by more than float64 round-off; no
    full-vocabulary probabilities unless ``keep_probs``."""
    p_clean, neg_entropy = _clean_distributions(logits[:1])
    stats = _token_stats(logits, p_clean, ids_a, ids_b, chunk)
    out = _stats_metrics(stats, 0, neg_entropy, 1, 0 if ids_a is None else len(ids_a))
    if keep_probs:
        out["probs"] = _probabilities(logits, stats, chunk)
    return out


def _probabilities(logits: torch.Tensor, stats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Full-vocabulary float64 probabilities of each row, from its logits and the
    log-sum-exp that :func:`_token_stats` stored first in its row."""
    return torch.cat([(logits[lo:lo + chunk].double() - stats[lo:lo + chunk, :1]).exp()
                      for lo in range(0, logits.shape[0], chunk)])


def _check_layers(lm, layers: Sequence[int]) -> list[int]:
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < lm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for {lm.name}: it has {lm.n_layers} layers "
                         f"(0 to {lm.n_layers - 1})")
    if not layers:
        raise ValueError("no layers to intervene on")
    return layers


def _check_components(components: Sequence[str]) -> list[str]:
    components = list(components)
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {components}")
    return components


@torch.no_grad()
def run_pair(lm, pairs: PromptPairs, layers: Sequence[int],
             components: Sequence[str] = COMPONENTS,
             token_ids: tuple[Sequence[int], Sequence[int]] | None = None, *,
             zero: bool = False, inject: dict[str, int] | None = None,
             alphas: Sequence[float] = (), vector_pairs: PromptPairs | None = None,
             accumulate_dprob: bool = False,
             prob_floor: float = 1e-6, batch_size: int = 64, act_batch_size: int = 16,
             pairs_per_engine: int = 8, naive: bool = False, progress: bool = True) -> PairRun:
    """Last-token swaps (and optionally zero ablation and injection) for every prompt pair.

    ``token_ids`` = (ids of A's token set, ids of B's) enables masses and Δ. ``inject`` maps a
    component to the layer where ``alphas`` x concept vector are added (the vector's means come
    from one batched pass over the prompts of ``vector_pairs``, default ``pairs``,
    :func:`lib.activations.collect_last_token`).

    The rows run on :mod:`lib.engine`, ``pairs_per_engine`` prompt pairs at a time: each prompt
    is a context (run once: its clean next-token logits, key/value cache, residual stream and
    last-token outputs); every intervention on it (swaps, whose values reference the paired
    prompt's last-token output; zeros; injections) is a row that runs only its last token, on
    the stored cache, from the intervened layer up (where that is exact). ``naive=True`` runs
    the same rows with :func:`lib.engine.run_naive` (one full forward each), for tests.
    ``accumulate_dprob`` also sums the whole-vocabulary changes the token-set scores need
    (``PairRun.dprob``, ``dlogp``, ``clean_logp``, ``clean_p``; ``prob_floor`` is the floor of
    the log-probabilities).
    """
    if not 0 < prob_floor < 1:
        raise ValueError(f"prob_floor must be in (0, 1), got {prob_floor}")
    layers = _check_layers(lm, layers)
    components = _check_components(components)
    inject = dict(inject or {})
    alphas = [float(a) for a in alphas]
    if inject and not alphas:
        raise ValueError("inject needs a non-empty list of alphas")
    n, n_c, n_l, n_a = len(pairs), len(components), len(layers), len(alphas)
    if n == 0:
        raise ValueError(f"{pairs.name}: no prompt pairs")
    swap_sites = [site_name(c, l) for c in components for l in layers]
    inject_sites = {c: site_name(c, _check_layers(lm, [l])[0]) for c, l in inject.items()}
    vectors = {}
    if inject_sites:
        isites = list(inject_sites.values())
        fit = vector_pairs if vector_pairs is not None else pairs
        mean_a = collect_last_token(lm, list(fit.a), isites, act_batch_size, progress=False)
        mean_b = collect_last_token(lm, list(fit.b), isites, act_batch_size, progress=False)
        for c, site in inject_sites.items():
            diff = (mean_b[site].mean(0) - mean_a[site].mean(0)).to(lm.device)  # mean_B - mean_A
            vectors[c] = {"b_into_a": diff, "a_into_b": -diff}
    ids_a = _ids_tensor(token_ids[0], lm.device) if token_ids else None
    ids_b = _ids_tensor(token_ids[1], lm.device) if token_ids else None

    run = PairRun(pairs.name, tuple(pairs.domains), layers, components, n, alphas=alphas,
                  inject_layers={c: int(l) for c, l in inject.items()},
                  inject_norms={c: float(v["b_into_a"].norm()) for c, v in vectors.items()},
                  prob_floor=float(prob_floor))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    keys = ["kl"] + (["mass_a", "mass_b"] if token_ids else [])
    for side in SIDES:
        run.base[side] = {k: np.zeros(n) for k in keys if k != "kl"}
        run.swap[side] = {k: np.zeros((n, n_c, n_l)) for k in keys}
        if zero:
            run.zero[side] = {k: np.zeros((n, n_c, n_l)) for k in keys}
        if inject:
            run.inject[side] = {k: np.full((n, n_c, n_a), np.nan) for k in keys}
        if accumulate_dprob:
            for store in (run.dprob, run.dlogp):
                store[side] = torch.zeros(vocab, dtype=torch.float64)
    if accumulate_dprob:
        for d in (0, 1):
            run.clean_logp[d] = torch.zeros(vocab, dtype=torch.float64)
            run.clean_p[d] = torch.zeros(vocab, dtype=torch.float64)

    n_swap = n_c * n_l
    chunks = [list(range(lo, min(n, lo + pairs_per_engine)))
              for lo in range(0, n, pairs_per_engine)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"{pairs.name}", unit="chunk")
    for chunk in chunks:
        # contexts 2k and 2k+1: the A and B prompt of the chunk's k-th pair
        contexts = []
        for i in chunk:
            contexts += [Context(lm.tokenize(pairs.a[i]), name=f"{pairs.name}:{i}:a"),
                         Context(lm.tokenize(pairs.b[i]), name=f"{pairs.name}:{i}:b")]
        rows, spans = [], []
        for k, i in enumerate(chunk):
            for side in SIDES:
                d = _BASE_OF[side]
                base_ctx, src_ctx = 2 * k + d, 2 * k + 1 - d
                last = contexts[base_ctx].length - 1
                src_last = contexts[src_ctx].length - 1
                side_rows = [Row(base_ctx, [Intervention(
                    site, positions=(last,), value=Ref(src_ctx, site, positions=(src_last,)),
                    source=f"{pairs.name}:{side}:{i}")]) for site in swap_sites]
                if zero:
                    side_rows += [Row(base_ctx, [Intervention(site, positions=(last,), kind="zero")])
                                  for site in swap_sites]
                inj_rows = []
                for ci, c in enumerate(components):
                    if c not in inject_sites:
                        continue
                    for ai, alpha in enumerate(alphas):
                        inj_rows.append((ci, ai))
                        side_rows.append(Row(base_ctx, [Intervention(
                            inject_sites[c], positions=(last,), kind="add",
                            value=(alpha * vectors[c][side]).view(1, 1, -1))]))
                spans.append((i, side, base_ctx, len(rows), len(side_rows), inj_rows))
                rows += side_rows
        engine = None if naive else Engine(lm, contexts, batch_size=batch_size)

        @functools.cache
        def clean_run():
            # first asked for by the readout, once the rows' references are resolved: asking
            # the engine for clean readouts before would run the contexts again for their sites
            logits = (run_naive(lm, contexts, [Row(c) for c in range(len(contexts))]) if naive
                      else torch.stack([engine.clean_readout(c) for c in range(len(contexts))]))
            return (logits, *_clean_distributions(logits))

        def stats_of(logits):
            return _token_stats(logits, clean_run()[1], ids_a, ids_b)

        # the whole-vocabulary sums need every row's logits; the metrics alone do not
        readout = None if accumulate_dprob else stats_of
        out_all = run_naive(lm, contexts, rows, readout) if naive else engine.run(rows, readout)
        stats_all = stats_of(out_all) if accumulate_dprob else out_all
        clean, _, neg_entropy = clean_run()
        clean_stats = stats_of(clean)
        n_a = 0 if ids_a is None else len(ids_a)
        for i, side, base_ctx, lo, count, inj_rows in spans:
            stats = torch.cat([clean_stats[base_ctx][None], stats_all[lo:lo + count]])
            m = _stats_metrics(stats, base_ctx, neg_entropy, len(contexts), n_a)
            for key in keys:
                vals = m[key].double().cpu().numpy()
                if key != "kl":
                    run.base[side][key][i] = vals[0]
                run.swap[side][key][i] = vals[1:1 + n_swap].reshape(n_c, n_l)
                off = 1 + n_swap
                if zero:
                    run.zero[side][key][i] = vals[off:off + n_swap].reshape(n_c, n_l)
                    off += n_swap
                for j, (ci, ai) in enumerate(inj_rows):
                    run.inject[side][key][i, ci, ai] = vals[off + j]
            if accumulate_dprob:
                probs = _probabilities(torch.cat([clean[base_ctx][None], out_all[lo:lo + count]]),
                                       stats)
                logp = probs.clamp_min(prob_floor).log()
                run.dprob[side] += (probs[1:1 + n_swap].sum(0) - n_swap * probs[0]).cpu()
                run.dlogp[side] += (logp[1:1 + n_swap].sum(0) - n_swap * logp[0]).cpu()
                d = _BASE_OF[side]
                run.clean_logp[d] += logp[0].cpu()
                run.clean_p[d] += probs[0].cpu()
    return run


# --- reverse intervention and token sets ----------------------------------------------------

SCORES = {
    "dlogp": "mean change of log max(p, floor): a token's relative gain, so frequent tokens "
             "are not favoured (the default)",
    "dprob": "mean change of p (the seed's score): absolute gains, dominated by frequent "
             "tokens such as ' the' or '\\n'",
}


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"SCORE must be one of {sorted(SCORES)}, got {score!r}")
    return score


def reverse_intervention_scores(run: PairRun, score: str = "dlogp"
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(score_A, score_B), each (vocab,): mean over prompts, components and layers of the
    change p_swapped - p_base (``score="dprob"``) or log max(p_swapped, floor) -
    log max(p_base, floor) (``"dlogp"``). B's tokens are those promoted on ``b_into_a`` (B's
    activation in A's run), A's those promoted on ``a_into_b``."""
    _check_score(score)
    if not run.dprob:
        raise ValueError("run_pair was called without accumulate_dprob=True")
    sums = run.dprob if score == "dprob" else run.dlogp
    count = run.n * len(run.components) * len(run.layers)
    return sums["a_into_b"] / count, sums["b_into_a"] / count


def reference_scores(run: PairRun) -> tuple[torch.Tensor, torch.Tensor]:
    """The intervention-free reference (ref_A, ref_B), each (vocab,): the contrast of the two
    domains' clean next-token distributions, ref_B(t) = mean over pairs of
    log max(p_B(t), floor) - log max(p_A(t), floor) (p_A, p_B: the clean runs on the pair's A
    and B prompt), and ref_A = -ref_B."""
    if not run.clean_logp:
        raise ValueError("run_pair was called without accumulate_dprob=True")
    ref_b = (run.clean_logp[1] - run.clean_logp[0]) / run.n
    return -ref_b, ref_b


def jaccard(x: Sequence[int], y: Sequence[int]) -> float | None:
    """|X ∩ Y| / |X ∪ Y| of two id sets (None when both are empty)."""
    x, y = set(x), set(y)
    return len(x & y) / len(x | y) if x | y else None


def split_pairs(pairs: PromptPairs, held_out_fraction: float = 0.5, seed: int = 0) -> dict:
    """A seeded split of a pair file into a discovery half (token sets are found on it) and a
    held-out half (notebook 02 measures every effect on it), so no effect is measured on the
    prompts its token sets were fitted to.

    ``{"seed", "held_out_fraction", "discovery": [indices], "held_out": [indices],
    "discovery_keys": [a hash of each discovery pair's two prompts]}``; the keys let notebook 02
    recognise the discovery pairs in any selection of the file (:func:`held_out_pairs`)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"HELD_OUT_FRACTION must be in (0, 1) (a share of the pairs kept "
                         f"out of token-set discovery), got {held_out_fraction}")
    n = len(pairs)
    n_held = int(round(n * held_out_fraction))
    if n < 2 or not 0 < n_held < n:
        raise ValueError(f"{pairs.name}: {n} pairs cannot be split into a discovery and a "
                         f"held-out half with HELD_OUT_FRACTION={held_out_fraction}; use more "
                         "pairs (N_PROMPTS) or another fraction")
    order = np.random.default_rng(seed).permutation(n)
    discovery = sorted(int(i) for i in order[:n - n_held])
    held_out = sorted(int(i) for i in order[n - n_held:])
    return {"seed": int(seed), "held_out_fraction": float(held_out_fraction),
            "discovery": discovery, "held_out": held_out,
            "discovery_keys": [_pair_key(pairs, i) for i in discovery]}


def _pair_key(pairs: PromptPairs, i: int) -> str:
    from lib.io import params_key

    return params_key({"a": pairs.a[i], "b": pairs.b[i]})


def select_token_sets(score_a: torch.Tensor, score_b: torch.Tensor, top_n: int,
                      exclude_ids: Sequence[int] = ()) -> tuple[list[tuple[int, float]],
                                                                list[tuple[int, float]]]:
    """Top ``top_n`` promoted tokens of each domain, disjoint between the two.

    A token is a candidate for a domain when its score there is positive (it was promoted on
    average). A token that is a candidate for both belongs to the domain where its score is
    larger and is dropped from the weaker side, whose list is filled up from its next-ranked
    tokens (ties, which practically never happen, drop the token from both). Tokens in
    ``exclude_ids`` (e.g. special tokens) are never kept. Returns two lists of (id, score),
    highest score first; a list is shorter than ``top_n`` when fewer tokens were promoted.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    a = score_a.double().cpu().clone()
    b = score_b.double().cpu().clone()
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"scores must be two vectors of equal length, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    excluded = torch.zeros_like(a, dtype=torch.bool)
    ex = [i for i in exclude_ids if 0 <= i < a.numel()]
    if ex:
        excluded[torch.tensor(ex)] = True
    own_a = (a > 0) & (a > b) & ~excluded
    own_b = (b > 0) & (b > a) & ~excluded

    def top(scores, own):
        idx = torch.nonzero(own).view(-1)
        vals = scores[idx]
        # stable order: score descending, then id ascending
        order = sorted(range(idx.numel()), key=lambda j: (-vals[j].item(), idx[j].item()))[:top_n]
        return [(int(idx[j]), float(vals[j])) for j in order]

    return top(a, own_a), top(b, own_b)


def token_entries(lm, ranked: Sequence[tuple[int, float]],
                  clean_p: torch.Tensor | None = None) -> list[dict]:
    """``[{"id", "token", "score"}]`` with each id decoded by the model's tokenizer, and
    ``clean_p`` (the token's mean clean next-token probability) when given."""
    strings = lm.token_strings([i for i, _ in ranked])
    out = [{"id": int(i), "token": s, "score": float(v)} for (i, v), s in zip(ranked, strings)]
    if clean_p is not None:
        for e in out:
            e["clean_p"] = float(clean_p[e["id"]])
    return out


def token_sets_path(model: str, token_sets_dir: str | Path | None = None) -> Path:
    """``<token_sets_dir>/<model slug>.json``."""
    return Path(token_sets_dir or paths.TOKEN_SETS) / f"{slug(model)}.json"


def load_token_sets(model: str, token_sets_dir: str | Path | None = None) -> dict:
    """The token-set file of ``model`` (name or slug); a clear error when it is missing."""
    path = token_sets_path(model, token_sets_dir)
    if not path.exists():
        raise TokenSetMissingError(
            f"token set missing for model {model}: run 01_reverse_intervention for it "
            f"(python -m lib.runner --notebooks 01 --models {model}); expected {path}")
    data = read_json(path)
    for key in ("model", "top_n", "pairs"):
        if key not in data:
            raise ValueError(f"{path} has no {key!r}: not a token-set file written by "
                             "01_reverse_intervention; rerun it with FORCE=True")
    if slug(str(data["model"])) != slug(model):
        raise ValueError(f"{path} holds token sets of model {data['model']!r}, not {model!r}; "
                         "token ids belong to one tokenizer, so rerun 01_reverse_intervention")
    return data


def token_set_ids(token_sets: dict, pair: str, domain: str) -> list[int]:
    """Token ids of ``domain`` in ``pair``; a clear error when they are not there."""
    pairs = token_sets.get("pairs", {})
    if pair not in pairs:
        raise TokenSetMissingError(
            f"token set of model {token_sets.get('model')} has no pair {pair!r} (it has "
            f"{sorted(pairs)}): run 01_reverse_intervention with this prompt file")
    if domain not in pairs[pair]:
        raise TokenSetMissingError(f"token set pair {pair!r} has domains {sorted(pairs[pair])}, "
                                   f"not {domain!r}")
    ids = [int(e["id"]) for e in pairs[pair][domain]]
    if not ids:
        raise ValueError(f"token set {pair}/{domain} of model {token_sets.get('model')} is empty")
    return ids


# --- separability scores --------------------------------------------------------------------

def load_scores(model: str, scores_dir: str | Path | None = None) -> dict:
    """``scores/<model slug>.json`` from notebook 00; a clear error when it is missing."""
    path = Path(scores_dir or paths.SCORES) / f"{slug(model)}.json"
    if not path.exists():
        raise ScoresMissingError(
            f"separability scores missing for model {model}: run 00_layer_scores for it "
            f"(python -m lib.runner --notebooks 00 --models {model}); expected {path}")
    return read_json(path)


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


# --- summaries for full_compute/<model>.json ------------------------------------------------

def _stat(values, n_bootstrap, seed):
    return summarize(np.asarray(values, dtype=np.float64), n_bootstrap, seed)


def _effects(run: PairRun, kind: str, side: str) -> dict[str, np.ndarray]:
    """Per-prompt effects (n, C, L): KL and, with token sets, |Δ|."""
    out = {"kl": getattr(run, kind)[side]["kl"]}
    if run.base[side]:
        out["abs_delta"] = np.abs(run.delta(kind, side))
    return out


def _top_vs_bottom(run, kind, ci, top, bottom, n_bootstrap, n_permutations, seed):
    li = {l: j for j, l in enumerate(run.layers)}
    t_idx = [li[l] for l in top]
    b_idx = [li[l] for l in bottom]
    out = {"k": len(top), "top_layers": list(top), "bottom_layers": list(bottom)}
    for side, effects in _effects_by_side(run, kind).items():
        out[side] = {}
        for effect, arr in effects.items():
            out[side][effect] = _paired_comparison(
                arr[:, ci, t_idx].mean(axis=1), arr[:, ci, b_idx].mean(axis=1), n_bootstrap,
                n_permutations, seed, "mean(top-k layers) - mean(bottom-k layers)")
    return out


def _paired_comparison(top_vals, bot_vals, n_bootstrap, n_permutations, seed, what) -> dict:
    """Top vs bottom per prompt: both summaries, their difference, and the paired sign-flip
    permutation p-value (:func:`lib.stats.permutation_test`)."""
    test = permutation_test(top_vals, bot_vals, n_permutations, seed, paired=True)
    return {"top": _stat(top_vals, n_bootstrap, seed),
            "bottom": _stat(bot_vals, n_bootstrap, seed),
            "diff": _stat(top_vals - bot_vals, n_bootstrap, seed),
            "p_value": test["p_value"], "n_permutations": test["n_permutations"],
            "test": f"paired sign-flip permutation over prompts, two-sided, of {what}"}


def _effects_by_side(run: PairRun, kind: str) -> dict[str, dict[str, np.ndarray]]:
    """:func:`_effects` of both sides and of "both" (the two sides' mean per prompt)."""
    per_side = {side: _effects(run, kind, side) for side in SIDES}
    per_side["both"] = {e: (per_side[SIDES[0]][e] + per_side[SIDES[1]][e]) / 2
                        for e in per_side[SIDES[0]]}
    return per_side


def _depth_control(run, ci, scores_by_layer, top, bottom, n_bootstrap, n_permutations, seed):
    """Does separability predict the swap effect beyond depth and beyond how much the component
    matters at all? Per side and effect, over the layers that have a score:

    * ``partial_given_layer``: partial Spearman of separability and the per-layer mean swap
      effect given the layer index (:func:`lib.stats.partial_spearman`);
    * ``partial_given_zero``: the same given the per-layer mean zero-ablation effect;
    * ``ratio_to_zero``: Spearman of separability and mean swap / mean zero ablation per layer;
    * ``relative_top_vs_bottom``: per prompt, the share swap / (swap + zero) of each layer
      (0.5 where both are 0), averaged over the top-k and the bottom-k layers; paired sign-flip
      permutation test of top - bottom, as for the raw effects."""
    swap, zero = _effects_by_side(run, "swap"), _effects_by_side(run, "zero")
    layers = [l for l in run.layers if l in scores_by_layer]
    idx = [run.layers.index(l) for l in layers]
    sep = [scores_by_layer[l] for l in layers]
    li = {l: j for j, l in enumerate(run.layers)}
    t_idx, b_idx = [li[l] for l in top], [li[l] for l in bottom]
    out = {}
    for side, effects in swap.items():
        out[side] = {}
        for effect, arr in effects.items():
            s_arr, z_arr = arr[:, ci], zero[side][effect][:, ci]
            mean_s, mean_z = s_arr[:, idx].mean(0), z_arr[:, idx].mean(0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = mean_s / mean_z
                total = s_arr + z_arr
                share = np.where(total > 0, s_arr / np.where(total > 0, total, 1.0), 0.5)
            out[side][effect] = {
                "partial_given_layer": partial_spearman(sep, mean_s, layers),
                "partial_given_zero": partial_spearman(sep, mean_s, mean_z),
                "ratio_to_zero": spearman(sep, ratio),
                "relative_top_vs_bottom": _paired_comparison(
                    share[:, t_idx].mean(1), share[:, b_idx].mean(1), n_bootstrap,
                    n_permutations, seed, "the share swap / (swap + zero ablation), top-k "
                    "minus bottom-k layers")}
    return out


def _spearman_block(run, kind, ci, scores_by_layer):
    per_side = _effects_by_side(run, kind)
    layers = [l for l in run.layers if l in scores_by_layer]
    idx = [run.layers.index(l) for l in layers]
    x = [scores_by_layer[l] for l in layers]
    return {side: {e: spearman(x, arr[:, ci, idx].mean(axis=0)) for e, arr in effects.items()}
            for side, effects in per_side.items()}


def _per_layer(run: PairRun, kind: str, ci: int, layer_head, n_bootstrap: int, seed: int,
               has_masses: bool, store_per_prompt: bool) -> list[dict]:
    """Per-layer summaries of one kind of intervention (``swap`` or ``zero``) and component:
    KL and, with token sets, Δ per side; swaps also carry the masses before and after."""
    per_layer = []
    for li, l in enumerate(run.layers):
        entry = layer_head(l)
        entry["sides"] = {}
        for side in SIDES:
            after = getattr(run, kind)[side]
            s = {"kl": _stat(after["kl"][:, ci, li], n_bootstrap, seed)}
            if has_masses:
                s["delta"] = _stat(run.delta(kind, side)[:, ci, li], n_bootstrap, seed)
                if kind == "swap":
                    for m in ("mass_a", "mass_b"):
                        s[f"{m}_before"] = _stat(run.base[side][m], n_bootstrap, seed)
                        s[f"{m}_after"] = _stat(after[m][:, ci, li], n_bootstrap, seed)
            if store_per_prompt:
                s["per_prompt"] = {"kl": after["kl"][:, ci, li]}
                if has_masses:
                    s["per_prompt"]["delta"] = run.delta(kind, side)[:, ci, li]
            entry["sides"][side] = s
        per_layer.append(entry)
    return per_layer


def summarize_pair(run: PairRun, layer_scores: dict[str, dict[int, float]], k: int,
                   n_bootstrap: int = 2000, n_permutations: int = 10000, seed: int = 0,
                   token_set_sizes: dict | None = None, store_per_prompt: bool = False) -> dict:
    """The JSON unit of one pair in ``full_compute/<model>.json`` (schema in the module
    docstring). ``layer_scores[component]`` = ``{layer: separability score}``."""
    out = {"domains": list(run.domains), "n_prompts": run.n, "layers": list(run.layers),
           "token_set_sizes": token_set_sizes or {}, "layer_ranking": {}, "top_layers": {},
           "bottom_layers": {}, "swap": {}, "zero_ablation": {}, "injection": {}}
    has_masses = bool(run.base[SIDES[0]])
    for ci, comp in enumerate(run.components):
        scores = layer_scores[comp]
        ranking = rank_layers(scores, run.layers)
        top, bottom = top_bottom(ranking, k)
        out["layer_ranking"][comp] = ranking
        out["top_layers"][comp] = top
        out["bottom_layers"][comp] = bottom
        rank_of = {l: r for r, l in enumerate(ranking)}

        def layer_head(l):
            return {"layer": l, "score": scores.get(l), "rank": rank_of.get(l),
                    "group": "top" if l in top else "bottom" if l in bottom else "middle"}

        per_layer = _per_layer(run, "swap", ci, layer_head, n_bootstrap, seed, has_masses,
                               store_per_prompt)
        out["swap"][comp] = {
            "per_layer": per_layer,
            "top_vs_bottom": _top_vs_bottom(run, "swap", ci, top, bottom, n_bootstrap,
                                            n_permutations, seed),
            "spearman": _spearman_block(run, "swap", ci, scores)}
        if run.zero:
            zl = _per_layer(run, "zero", ci, layer_head, n_bootstrap, seed, has_masses, False)
            out["zero_ablation"][comp] = {"per_layer": zl,
                                          "spearman": _spearman_block(run, "zero", ci, scores)}
            out["swap"][comp]["depth_control"] = _depth_control(
                run, ci, scores, top, bottom, n_bootstrap, n_permutations, seed)
        if run.inject and comp in run.inject_layers:
            sides = {}
            for side in SIDES:
                rows = []
                for ai, alpha in enumerate(run.alphas):
                    r = {"alpha": alpha,
                         "kl": _stat(run.inject[side]["kl"][:, ci, ai], n_bootstrap, seed)}
                    if has_masses:
                        ma = run.inject[side]["mass_a"][:, ci, ai]
                        mb = run.inject[side]["mass_b"][:, ci, ai]
                        before = run.base[side]["mass_b"] - run.base[side]["mass_a"]
                        r["mass_a"] = _stat(ma, n_bootstrap, seed)
                        r["mass_b"] = _stat(mb, n_bootstrap, seed)
                        r["bias"] = _stat(mb - ma, n_bootstrap, seed)
                        r["delta"] = _stat(mb - ma - before, n_bootstrap, seed)
                    rows.append(r)
                sides[side] = rows
            out["injection"][comp] = {"layer": run.inject_layers[comp], "alphas": run.alphas,
                                      "vector_norm": run.inject_norms[comp],
                                      "layer_choice": "given", "sides": sides}
    return out


# --- notebook-level units -------------------------------------------------------------------

def token_set_unit(lm, pairs: PromptPairs, layers: Sequence[int],
                   components: Sequence[str] = COMPONENTS, top_n: int = 50,
                   exclude_special: bool = True, batch_size: int = 64, progress: bool = True, *,
                   held_out_fraction: float = 0.5, seed: int = 0,
                   prob_floor: float = 1e-6) -> dict:
    """Reverse intervention on one pair file (notebook 01's unit of work), on the discovery half
    of a seeded split (:func:`split_pairs`).

    For every score of ``SCORES`` the top ``top_n`` tokens per domain (``source`` filing,
    disjoint, :func:`select_token_sets`), and the intervention-free reference sets (top
    ``top_n`` of :func:`reference_scores`), each entry ``{"id", "token", "score", "clean_p"}``
    (``clean_p``: mean clean next-token probability over the discovery prompts of both
    domains)::

        {"domains", "n_prompts", "split", "prob_floor",
         "scores": {score: {"sets": {domain: entries}, "n_candidates": {domain: int}}},
         "reference": {"sets": {domain: entries}, "n_candidates": {domain: int}}}

    :func:`assign_token_sets` picks one score and filing and measures the agreement."""
    split = split_pairs(pairs, held_out_fraction, seed)
    discovery = pairs.select(split["discovery"])
    run = run_pair(lm, discovery, layers, components, accumulate_dprob=True,
                   prob_floor=prob_floor, batch_size=batch_size, progress=progress)
    exclude = list(lm.tokenizer.all_special_ids) if exclude_special else []
    excluded = torch.zeros_like(run.clean_p[0], dtype=torch.bool)
    if exclude:
        excluded[torch.tensor([i for i in exclude if 0 <= i < excluded.numel()])] = True
    clean_p = (run.clean_p[0] + run.clean_p[1]) / (2 * run.n)
    a, b = pairs.domains

    def sets_of(score_a, score_b):
        top_a, top_b = select_token_sets(score_a, score_b, top_n, exclude)
        return {"sets": {a: token_entries(lm, top_a, clean_p), b: token_entries(lm, top_b, clean_p)},
                "n_candidates": {
                    a: int(((score_a > 0) & (score_a > score_b) & ~excluded).sum()),
                    b: int(((score_b > 0) & (score_b > score_a) & ~excluded).sum())}}

    return {"domains": [a, b], "n_prompts": len(pairs), "split": split,
            "prob_floor": float(prob_floor),
            "scores": {name: sets_of(*reverse_intervention_scores(run, name)) for name in SCORES},
            "reference": sets_of(*reference_scores(run))}


ASSIGNMENTS = {
    "source": "tokens promoted when B's activation goes into A's run belong to B (the study's "
              "definition: a domain's activations promote its tokens)",
    "base": "tokens promoted in A's run (by B's activation) belong to A (what the seed "
            "notebook's code does: a perturbation promotes tokens that fit the base context)",
}


def _filed(unit: dict, score: str, assignment: str) -> dict:
    """``{"sets", "n_candidates"}`` of one score under one filing (``base`` exchanges the two
    domains' lists: the disjoint selection is symmetric in the two score vectors)."""
    chosen = unit["scores"][score]
    if assignment == "source":
        return chosen
    a, b = unit["domains"]
    return {key: {a: chosen[key][b], b: chosen[key][a]} for key in ("sets", "n_candidates")}


def reference_agreement(unit: dict) -> dict:
    """Jaccard overlap of every (score, filing)'s sets with the reference sets, per domain and
    their mean: ``{score: {assignment: {domain: J, "mean": J}}}``."""
    ref = unit["reference"]["sets"]
    out = {}
    for score in unit["scores"]:
        out[score] = {}
        for assignment in ASSIGNMENTS:
            sets = _filed(unit, score, assignment)["sets"]
            js = {d: jaccard([e["id"] for e in sets[d]], [e["id"] for e in ref[d]])
                  for d in unit["domains"]}
            vals = [v for v in js.values() if v is not None]
            out[score][assignment] = {**js, "mean": sum(vals) / len(vals) if vals else None}
    return out


def assign_token_sets(unit: dict, score: str = "dlogp", assignment: str = "source") -> dict:
    """A :func:`token_set_unit` under one score and filing (see ``SCORES``, ``ASSIGNMENTS``):
    ``{"domains", "n_prompts", "split", "sets", "n_candidates", "reference", "agreement"}``,
    where ``reference`` are the reference sets and ``agreement`` is
    :func:`reference_agreement` (every score and filing, so the choice can be checked)."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"ASSIGNMENT must be one of {sorted(ASSIGNMENTS)}, got {assignment!r}")
    _check_score(score)
    filed = _filed(unit, score, assignment)
    return {"domains": unit["domains"], "n_prompts": unit["n_prompts"], "split": unit["split"],
            "sets": filed["sets"], "n_candidates": filed["n_candidates"],
            "reference": unit["reference"]["sets"], "agreement": reference_agreement(unit)}


def held_out_pairs(token_sets: dict, pairs: PromptPairs
                   ) -> tuple[PromptPairs, list[int], PromptPairs]:
    """(held out, their indices in ``pairs``, discovery): the pairs of ``pairs`` that notebook
    01 did not use to find ``token_sets`` (every pair whose two prompts are not a discovery pair
    of its split), and those it did. A clear error when the file has no split (written before
    splits existed) or no held-out pair is left."""
    split = token_sets.get("split", {}).get(pairs.name)
    if split is None:
        raise TokenSetMissingError(
            f"token sets of model {token_sets.get('model')} have no discovery/held-out split for "
            f"{pairs.name!r}: they were found on every prompt, so effects measured on those "
            "prompts would be circular; rerun 01_reverse_intervention (FORCE=True)")
    found = set(split["discovery_keys"])
    used = [_pair_key(pairs, i) in found for i in range(len(pairs))]
    keep = [i for i, u in enumerate(used) if not u]
    if not keep:
        raise ValueError(f"{pairs.name}: every selected pair was used to find the token sets; "
                         "select more pairs (N_PROMPTS) or rerun 01 with a held-out half")
    return pairs.select(keep), keep, pairs.select([i for i, u in enumerate(used) if u])


def token_set_table(token_sets: dict, pair: str, n: int = 15):
    """A pandas table of the top ``n`` tokens of both domains of ``pair`` side by side."""
    import pandas as pd

    sets = token_sets["pairs"][pair]
    cols = {}
    for domain, entries in sets.items():
        cols[f"{domain} token"] = [repr(e["token"]) for e in entries[:n]]
        cols[f"{domain} id"] = [e["id"] for e in entries[:n]]
        cols[f"{domain} score"] = [e["score"] for e in entries[:n]]
    length = max((len(v) for v in cols.values()), default=0)
    cols = {k: list(v) + [None] * (length - len(v)) for k, v in cols.items()}
    return pd.DataFrame(cols, index=pd.RangeIndex(1, length + 1, name="rank"))


def full_compute_unit(lm, pairs: PromptPairs, layers: Sequence[int], token_sets: dict,
                      scores: dict, *, metric: str = "fisher",
                      components: Sequence[str] = COMPONENTS, k: int = 5,
                      alphas: Sequence[float] = (0, 0.5, 1, 2, 4), inject_layer: int = -1,
                      zero: bool = True, n_bootstrap: int = 2000, n_permutations: int = 10000,
                      seed: int = 0, batch_size: int = 64, store_per_prompt: bool = False,
                      progress: bool = True) -> dict:
    """Everything notebook 02 computes for one pair file (its unit of work; schema in the module
    docstring). Layers are ranked per component by ``metric`` from the "pair" comparison of
    ``scores``; injection runs at ``inject_layer``, or at each component's most separable layer
    when it is negative. Every effect is measured on the pairs that were not used to find the
    token sets (:func:`held_out_pairs`); their indices in ``pairs`` are stored."""
    pairs, evaluated, discovery = held_out_pairs(token_sets, pairs)
    a, b = pairs.domains
    ids = (token_set_ids(token_sets, pairs.name, a), token_set_ids(token_sets, pairs.name, b))
    layer_scores = {c: pair_layer_scores(scores, pairs.name, c, metric) for c in components}
    inject = {}
    choice = {}
    for c in components:
        ranking = rank_layers(layer_scores[c], layers)
        if not ranking:
            raise ScoresMissingError(f"no layer of {list(layers)} has a {metric} score for "
                                     f"{pairs.name}/{c}; rerun 00_layer_scores with these layers")
        if alphas:
            inject[c] = int(inject_layer) if inject_layer >= 0 else ranking[0]
            choice[c] = "given" if inject_layer >= 0 else f"most separable layer by {metric}"
    if inject and len(discovery) == 0:
        raise ValueError(f"{pairs.name}: the concept vector is fitted on the discovery pairs, "
                         "and none is among the selected pairs; select more pairs (N_PROMPTS) "
                         "or skip injection (ALPHAS=[])")
    run = run_pair(lm, pairs, layers, components, ids, zero=zero, inject=inject, alphas=alphas,
                   vector_pairs=discovery, batch_size=batch_size, progress=progress)
    unit = summarize_pair(run, layer_scores, k, n_bootstrap, n_permutations, seed,
                          token_set_sizes={a: len(ids[0]), b: len(ids[1])},
                          store_per_prompt=store_per_prompt)
    for c, text in choice.items():
        unit["injection"][c]["layer_choice"] = text
    unit["evaluated_pairs"] = evaluated
    return unit


def load_full_compute(model: str, full_compute_dir: str | Path | None = None) -> dict:
    """``full_compute/<model slug>.json`` of notebook 02; a clear error when it is missing."""
    path = Path(full_compute_dir or paths.FULL_COMPUTE) / f"{slug(model)}.json"
    if not path.exists():
        raise FileNotFoundError(f"cross-swap results missing for model {model}: run "
                                f"02_all_model_causal for it (python -m lib.runner --notebooks 02 "
                                f"--models {model}); expected {path}")
    data = read_json(path)
    if not isinstance(data, dict) or "pairs" not in data:
        raise ValueError(f"{path} is not a result file of 02_all_model_causal (no 'pairs')")
    return data


def load_all_full_compute(full_compute_dir: str | Path | None = None) -> dict[str, dict]:
    """Every ``full_compute/*.json`` written by notebook 02, by model name (files of other
    notebooks, which have no per-pair ``swap`` results, are skipped). A file that is not valid
    JSON is an error naming it: the cross-model figures never silently leave a model out."""
    folder = Path(full_compute_dir or paths.FULL_COMPUTE)
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)  # names the file and the fix when it is unreadable
        pairs = data.get("pairs") if isinstance(data, dict) else None
        if isinstance(pairs, dict) and pairs and all(isinstance(v, dict) and "swap" in v
                                                     for v in pairs.values()):
            out[data.get("model", path.stem)] = data
    return out
