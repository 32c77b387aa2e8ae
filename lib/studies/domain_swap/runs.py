"""Last-token swaps, zero ablation and injection of one pair file as engine rows, and their per-row
metrics (KL, token-set masses); see :mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from lib.core.activations import collect_last_token
from lib.studies.domain_swap.common import _BASE_OF, COMPONENTS, SIDES
from lib.core.engine import Context, Engine, Ref, Row, run_naive
from lib.core.interventions import Intervention
from lib.core.prompts import PromptPairs
from lib.core.sites import site_name


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

    An engine readout (:mod:`lib.core.engine` applies it to each batch as it comes), so only these
    numbers are kept and stacked, not every row's logits."""
    out = []
    for lo in range(0, logits.shape[0], chunk):
        z = logits[lo:lo + chunk].double()
        parts = [z @ p_clean.T]   # read before the log-sum-exp below changes z in place
        if ids_a is not None:
            parts += [z[:, ids_a], z[:, ids_b]]
        top = z.amax(dim=-1, keepdim=True)   # log-sum-exp in place on the float64 copy
        lse = z.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)
        out.append(torch.cat([lse, *parts], dim=1))
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
    :func:`lib.core.activations.collect_last_token`).

    The rows run on :mod:`lib.core.engine`, ``pairs_per_engine`` prompt pairs at a time: each prompt
    is a context (run once: its clean next-token logits, key/value cache, residual stream and
    last-token outputs); every intervention on it (swaps, whose values reference the paired
    prompt's last-token output; zeros; injections) is a row that runs only its last token, on
    the stored cache, from the intervened layer up (where that is exact). ``naive=True`` runs
    the same rows with :func:`lib.core.engine.run_naive` (one full forward each), for tests.
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

    domains = cast(tuple[str, str], tuple(pairs.domains))  # PromptPairs has two domains
    run = PairRun(pairs.name, domains, layers, components, n, alphas=alphas,
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
        rows: list[Row] = []
        spans: list[tuple[int, str, int, int, int, list[tuple[int, int]]]] = []
        for k, i in enumerate(chunk):
            for side in SIDES:
                d = _BASE_OF[side]
                base_ctx, src_ctx = 2 * k + d, 2 * k + 1 - d
                last = contexts[base_ctx].length - 1
                src_last = contexts[src_ctx].length - 1
                # ignore[arg-type]: a Ref value, resolved by the engine (typed Tensor there)
                side_rows = [Row(base_ctx, [Intervention(
                    site, positions=(last,),
                    value=Ref(src_ctx, site, positions=(src_last,)),
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
        out_all = (run_naive(lm, contexts, rows, readout) if engine is None  # None: naive
                   else engine.run(rows, readout))
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
