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


def _first_position(rows: Sequence[Sequence[Intervention]], seq_len: int) -> int:
    starts = [min(iv.positions) if iv.positions is not None else 0
              for row in rows for iv in row]
    if any(iv.site == "embed" and iv.positions is None for row in rows for iv in row):
        return 0
    return min(starts, default=seq_len - 1)


@torch.no_grad()
def sweep_logits(lm, input_ids: torch.Tensor, rows: Sequence[Sequence[Intervention]],
                 batch_size: int = 64, prefix_cache: bool = True,
                 progress: bool = False) -> torch.Tensor:
    """Last-position logits (len(rows), vocab), float32, one row per intervention list.

    ``input_ids`` is (1, pos) (the same base for every row) or (len(rows), pos). Each row's
    interventions get ``rows=(batch index,)``; their own ``rows`` field is ignored. With
    ``prefix_cache`` the key/value cache of positions before the earliest patched position is
    computed once (shared base) or once per batch (per-row bases).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(lm.device)
    n_rows, seq_len = len(rows), input_ids.shape[1]
    if input_ids.shape[0] not in (1, n_rows):
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows; expected 1 or {n_rows}")
    start = _first_position(rows, seq_len) if prefix_cache else 0
    start = min(start, seq_len - 1)  # at least the last token runs per row
    shared = input_ids.shape[0] == 1
    shared_past = None
    if start > 0 and shared:
        shared_past = lm.model(input_ids=input_ids[:, :start], use_cache=True).past_key_values

    out = []
    chunks = range(0, n_rows, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="interventions", unit="batch")
    for lo in chunks:
        chunk = rows[lo:lo + batch_size]
        n = len(chunk)
        ids = input_ids.expand(n, -1) if shared else input_ids[lo:lo + n]
        ivs = [replace(iv, rows=(j,)) for j, row in enumerate(chunk) for iv in row]
        kwargs = {}
        if start > 0:
            if shared:
                past = copy.deepcopy(shared_past)
                past.batch_repeat_interleave(n)
            else:
                past = lm.model(input_ids=ids[:, :start], use_cache=True).past_key_values
            kwargs = {"past_key_values": past, "use_cache": True}
        with patch(lm, ivs, offset=start):
            logits = lm.model(input_ids=ids[:, start:], **kwargs).logits
        out.append(logits[:, -1].float())
    return torch.cat(out) if out else torch.empty(0, lm.model.config.get_text_config().vocab_size)


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
