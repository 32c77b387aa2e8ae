"""The reference loop of the intervention engine: one full, unbatched forward pass per row.

:func:`run_naive` is what every study's batched rows (:mod:`lib.core.engine`) are checked
against, and the benchmarks' baseline: the row's context input with the context's and the row's
interventions applied by :mod:`lib.core.hooks`, each reference (:class:`Ref`) one more full
forward pass, no key/value cache, no prefix or layer skipped. Same output format as
:func:`lib.core.engine.core.run`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace

import torch

from lib.core.engine.data import Capture, Context, Ref, Row
from lib.core.engine.passes import _full_positions, _iv_key, _positions, _read, _ref_slice
from lib.core.engine.planning import merge_interventions
from lib.core.interventions import Intervention
from lib.core.hooks import apply_hooks, record_hooks


def run_naive(lm, contexts: Sequence[Context], rows: Sequence[Row], readout=None, *,
              grad: bool = False, check_finite: bool = True, reuse_references: bool = False):
    """The reference loop: for each row one full, unbatched forward pass of its context's
    input with the context's and the row's interventions; each reference is one more full
    forward pass (recursively). ``reuse_references=True`` runs each distinct reference once
    and reuses it (what a hand-written loop would do: the benchmarks' baseline). Same output
    format as :func:`run`."""
    contexts = list(contexts)
    memo: dict[tuple, torch.Tensor] = {}

    def forward(ctx: int, ivs: Sequence[Intervention], rd, with_grad: bool):
        c = contexts[ctx]
        resolved = [_naive_value(iv) for iv in ivs]
        all_ivs = [_full_positions(iv, c.length) for iv in list(c.interventions) + resolved]
        merged = merge_interventions([all_ivs])
        store: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            if not with_grad:
                stack.enter_context(torch.no_grad())
            stack.enter_context(apply_hooks(lm, merged, check_finite))
            if isinstance(rd, Capture):
                stack.enter_context(record_hooks(lm, rd.sites, store, detach=not with_grad))
            logits = lm.model(input_ids=c.input_ids.to(lm.device)).logits[:, -1]
        if isinstance(rd, Capture):
            return {s: _positions(store[s], rd.positions)[0] for s in rd.sites}
        return _read(logits, rd)[0]

    def _naive_value(iv: Intervention) -> Intervention:
        ref = iv.value
        if not isinstance(ref, Ref):
            return iv
        key = (ref.context, ref.site, tuple(_iv_key(x) for x in ref.interventions))
        full = memo.get(key) if reuse_references else None
        if full is None:
            full = forward(ref.context, ref.interventions, Capture((ref.site,)), False)[ref.site]
            if reuse_references:
                memo[key] = full
        return replace(iv, value=_ref_slice(full[None], ref, iv))

    if reuse_references:   # every plain reference of a context from one forward pass
        plain: dict[int, set] = defaultdict(set)
        for r in rows:
            for iv in r.interventions:
                if isinstance(iv.value, Ref) and not iv.value.interventions:
                    plain[iv.value.context].add(iv.value.site)
        for ctx, sites in plain.items():
            got = forward(ctx, (), Capture(tuple(sorted(sites))), False)
            memo.update({(ctx, site, ()): value for site, value in got.items()})
    results = [forward(r.context, r.interventions, readout, grad) for r in rows]
    if isinstance(readout, Capture):
        return {s: torch.stack([r[s] for r in results]) if results else torch.empty(0)
                for s in readout.sites}
    return torch.stack(results) if results else torch.empty(0)
