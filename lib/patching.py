"""Batched intervention sweeps: many interventions, one forward pass, shared prefix computed once.

A sweep (every layer x position x component, as in activation patching; Vig et al. 2020,
Meng et al. 2022) is a list of rows, each row a list of :class:`lib.hooks.Intervention` that
apply together. :func:`sweep_logits` runs the rows in batches, one row per batch element.

Work that does not change between rows is done once: an intervention at position p cannot
change anything at positions before p (causal attention), so the key/value cache of the
prefix ``[0, p_min)`` is computed once and copied to every row, and only positions
``p_min..`` are run per row. For last-token swaps this turns each row into a one-token forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch

from lib.hooks import Intervention, patch


def _row_start(row: Sequence[Intervention]) -> int:
    """First position a row of interventions touches (0 when any covers all positions)."""
    if any(iv.positions is None for iv in row):
        return 0
    return min((min(iv.positions) for iv in row), default=0)


@torch.no_grad()
def sweep_logits(lm, input_ids: torch.Tensor, rows: Sequence[Sequence[Intervention]],
                 batch_size: int = 64, prefix_cache: bool = True,
                 progress: bool = False) -> torch.Tensor:
    """Last-position logits (len(rows), vocab), float32, one row per intervention list.

    ``input_ids`` is (1, pos) (the same base for every row) or (len(rows), pos). Each row's
    interventions get ``rows=(batch index,)``; their own ``rows`` field is ignored.

    With ``prefix_cache`` and a shared base, rows are grouped by the first position they touch;
    each group runs only from that position on, continuing from the key/value cache of the
    clean prefix, which is computed once per group. With per-row bases the earliest position
    over all rows is used and the prefix is computed once per batch.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(lm.device)
    n_rows, seq_len = len(rows), input_ids.shape[1]
    if input_ids.shape[0] not in (1, n_rows):
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows; expected 1 or {n_rows}")
    shared = input_ids.shape[0] == 1
    # at least the last token runs per row
    starts = [min(_row_start(row), seq_len - 1) if prefix_cache else 0 for row in rows]
    if not shared:
        starts = [min(starts, default=0)] * n_rows
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        groups.setdefault(s, []).append(i)
    jobs = [(s, idx[lo:lo + batch_size]) for s, idx in sorted(groups.items())
            for lo in range(0, len(idx), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="interventions", unit="batch")

    out: list[torch.Tensor | None] = [None] * n_rows
    shared_past, past_start = None, None
    for start, idx in jobs:
        n = len(idx)
        ids = input_ids.expand(n, -1) if shared else input_ids[idx]
        kwargs = {}
        if start > 0:
            if shared:
                if past_start != start:
                    shared_past = lm.model(input_ids=input_ids[:, :start],
                                           use_cache=True).past_key_values
                    past_start = start
                past = copy.deepcopy(shared_past)
                past.batch_repeat_interleave(n)
            else:
                past = lm.model(input_ids=ids[:, :start], use_cache=True).past_key_values
            kwargs = {"past_key_values": past, "use_cache": True}
        ivs = [replace(iv, rows=(j,)) for j, i in enumerate(idx) for iv in rows[i]]
        with patch(lm, ivs, offset=start):
            # Only the last position goes through the LM head (an index tensor keeps the
            # slice contiguous, which is much faster on CPU than logits_to_keep=1).
            last = torch.tensor([ids.shape[1] - start - 1], device=lm.device)
            logits = lm.model(input_ids=ids[:, start:], logits_to_keep=last,
                              **kwargs).logits[:, -1].float()
        for j, i in enumerate(idx):
            out[i] = logits[j]
    if not out:
        return torch.empty(0, lm.model.get_output_embeddings().weight.shape[0])
    return torch.stack(out)


@torch.no_grad()
def sweep_logits_naive(lm, input_ids: torch.Tensor,
                       rows: Sequence[Sequence[Intervention]]) -> torch.Tensor:
    """The reference loop: one full, unbatched forward per row. For tests and benchmarks."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(lm.device)
    out = []
    for i, row in enumerate(rows):
        ids = input_ids if input_ids.shape[0] == 1 else input_ids[i:i + 1]
        with patch(lm, [replace(iv, rows=None) for iv in row]):
            out.append(lm.model(input_ids=ids).logits[:, -1].float())
    return torch.cat(out)
