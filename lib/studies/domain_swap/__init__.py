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
(:mod:`lib.core.engine`): each prompt is a context run once; a last-token intervention cannot change
earlier positions (causal attention), so each row runs only the last token on the prompt's
stored key/value cache, from the intervened layer up (where the engine's self-check allows);
a swap's value references the paired prompt's stored last-token output. The concept vectors'
means come from one batched forward per group of prompts
(:func:`lib.core.activations.collect_last_token`). The seed's algorithm (one unbatched full forward
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
p-value is a paired sign-flip permutation test over prompts (:func:`lib.core.stats.permutation_test`).
"both" averages the two sides per prompt. ``spearman`` correlates the per-layer separability
score with the per-layer mean effect over all evaluated layers that have a score.
"""

from lib.studies.domain_swap.common import (  # noqa: F401
    COMPONENTS, SIDES, SIDE_DOC, EFFECTS, _BASE_OF, TokenSetMissingError, ScoresMissingError,
)
from lib.studies.domain_swap.runs import (  # noqa: F401
    PairRun, _ids_tensor, _token_stats, _stats_metrics, _clean_distributions, _row_metrics,
    _probabilities, _check_layers, _check_components, run_pair,
)
from lib.studies.domain_swap.tokens import (  # noqa: F401
    SCORES, _check_score, reverse_intervention_scores, reference_scores, jaccard, split_pairs,
    _pair_key, select_token_sets, token_entries, token_sets_path, load_token_sets, token_set_ids,
    ASSIGNMENTS, _filed, reference_agreement, assign_token_sets, held_out_pairs, token_set_table,
)
from lib.studies.domain_swap.scores import (  # noqa: F401
    load_scores, pair_layer_scores, rank_layers, top_bottom,
)
from lib.studies.domain_swap.summaries import (  # noqa: F401
    _stat, _effects, _top_vs_bottom, _paired_comparison, _effects_by_side, _depth_control,
    _spearman_block, _per_layer, summarize_pair,
)
from lib.studies.domain_swap.units import (  # noqa: F401
    token_set_unit, full_compute_unit, load_full_compute, load_all_full_compute,
)
