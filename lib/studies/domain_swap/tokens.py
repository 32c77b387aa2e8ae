"""The reverse intervention (notebook 01): token scores, the discovery / held-out split, the top
tokens of each domain, their filing, and the token-set files; see :mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lib.core import paths
from lib.studies.domain_swap.common import TokenSetMissingError
from lib.studies.domain_swap.runs import PairRun
from lib.core.io import read_result, slug
from lib.studies.steps import TOKEN_SETS_SCHEMA
from lib.core.prompts import PromptPairs


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
    xs, ys = set(x), set(y)
    return len(xs & ys) / len(xs | ys) if xs | ys else None


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
    from lib.core.io import params_key

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
    data = read_result(path, TOKEN_SETS_SCHEMA)   # names the file and the fix when malformed
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
    out: dict[str, dict[str, dict[str, float | None]]] = {}
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
    cols: dict[str, list[object]] = {}   # token reprs, ids, scores; None pads
    for domain, entries in sets.items():
        cols[f"{domain} token"] = [repr(e["token"]) for e in entries[:n]]
        cols[f"{domain} id"] = [e["id"] for e in entries[:n]]
        cols[f"{domain} score"] = [e["score"] for e in entries[:n]]
    length = max((len(v) for v in cols.values()), default=0)
    cols = {k: list(v) + [None] * (length - len(v)) for k, v in cols.items()}
    return pd.DataFrame(cols, index=pd.RangeIndex(1, length + 1, name="rank"))
