"""The notebook-level units of 01 (a pair file's token sets) and 02 (a pair file's effects), and
the readers of 02's results; see :mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lib.core import paths
from lib.studies.domain_swap.common import COMPONENTS, ScoresMissingError
from lib.studies.domain_swap.runs import run_pair
from lib.studies.domain_swap.scores import pair_layer_scores, rank_layers
from lib.studies.domain_swap.summaries import summarize_pair
from lib.studies.domain_swap.tokens import (
    SCORES,
    held_out_pairs,
    reference_scores,
    reverse_intervention_scores,
    select_token_sets,
    split_pairs,
    token_entries,
    token_set_ids,
)
from lib.core.io import read_json, read_result, slug
from lib.core.schema import verdict
from lib.studies.steps import FULL_COMPUTE_SCHEMA
from lib.core.prompts import PromptPairs


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
    return read_result(path, FULL_COMPUTE_SCHEMA)   # names the file and the fix when malformed


def load_all_full_compute(full_compute_dir: str | Path | None = None) -> dict[str, dict]:
    """Every ``full_compute/*.json`` written by notebook 02, by model name (results of other
    kinds are skipped). A file that is not valid JSON, or a result of 02 that does not have its
    shape, is an error naming it: the cross-model figures never silently leave a model out."""
    folder = Path(full_compute_dir or paths.FULL_COMPUTE)
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)  # names the file and the fix when it is unreadable
        found = verdict(data, FULL_COMPUTE_SCHEMA)[0] if isinstance(data, dict) else "bad"
        if found == "ok":
            out[data["model"]] = data
        elif found == "bad" and isinstance(data, dict) and \
                FULL_COMPUTE_SCHEMA.keys & set(data) - {"model"}:
            read_result(path, FULL_COMPUTE_SCHEMA)   # raises, naming the file and the fix
    return out
