"""Last-token activations of many prompts of different lengths, batched with right padding.

Representation probing of a domain (Alain & Bengio 2016, "Understanding intermediate layers
using linear classifier probes"; the domain-separation study of the causal-intervention seed)
reads one vector per prompt: the activation at a site at the prompt's *last* token, the
position whose state produces the next token.

:func:`collect_last_token` tokenizes every prompt with the tokenizer's own defaults (so a BOS
token is added exactly where the tokenizer adds one), sorts the prompts by length so that a
batch holds prompts of similar lengths, pads each batch on the *right* with the tokenizer's own
``pad`` (and attention mask) and reads each prompt's true last position (its length - 1). Right
padding keeps every real token at the position it has in an unbatched run, and causal attention
means a real token never attends to the padding after it, so the result equals unbatched runs
up to float round-off (checked in ``tests/test_activations.py``).

Why this is not engine rows: the engine batches contexts of one length (its stored prefixes and
mid-stack starts need aligned positions), while reading one clean activation per prompt needs
no intervention and no stored state, and padding prompts of every length into full batches
needs fewer passes than batching prompts of one length at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from lib.core.hooks import capture


def token_ids(lm, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's default special tokens (BOS or not)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"prompt {i} must be a non-empty string, got {text!r:.80}")
        out.append(list(lm.tokenizer(text)["input_ids"]))
    return out


@contextmanager
def _pad_token(tokenizer):
    """The tokenizer with a padding token: its own, else its EOS token for the duration (the
    value never matters: padded positions are masked and come after every real token)."""
    if tokenizer.pad_token is not None:
        yield tokenizer
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a padding nor an EOS token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.pad_token = None


def right_padded_batch(tokenizer, ids: Sequence[Sequence[int]],
                       device: torch.device | str = "cpu"):
    """(input_ids, attention_mask, last_positions) for token-id lists of any lengths, padded on
    the right by the tokenizer's own ``pad``."""
    if not ids or min(len(x) for x in ids) == 0:
        raise ValueError("every prompt needs at least one token")
    with _pad_token(tokenizer) as tok:
        batch = tok.pad({"input_ids": [list(x) for x in ids]}, padding=True,
                        padding_side="right", return_attention_mask=True, return_tensors="pt")
    input_ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
    last = mask.sum(dim=1) - 1
    return input_ids.to(device), mask.to(device), last.to(device)


@torch.no_grad()
def collect_last_token(lm, prompts: Sequence[str], sites: Sequence[str], batch_size: int = 16,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Activation at each site at each prompt's last token.

    Returns ``{site: tensor}`` of shape (len(prompts), d_model) in float32 on the CPU, rows in
    the order of ``prompts`` (``head_out`` sites give (len(prompts), n_heads, d_head)). Prompts
    may have different lengths: they are sorted by length, run ``batch_size`` at a time with
    right padding and an attention mask, and each prompt's true last token is read.
    """
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("no sites given; pass names like 'blocks.3.mlp_out' (lib.core.sites)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = token_ids(lm, prompts)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    chunks = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="activations", unit="batch")
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for chunk in chunks:
        input_ids, mask, last = right_padded_batch(lm.tokenizer, [ids[i] for i in chunk],
                                                   lm.device)
        rows = torch.arange(len(chunk), device=lm.device)
        with capture(lm, sites) as cache:
            # logits are not needed: compute them for one position only
            lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                     logits_to_keep=1)
        for site in sites:
            parts[site].append(cache[site][rows, last].float().cpu())
        del cache
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    out = {}
    for site in sites:
        stacked = torch.cat(parts[site]) if parts[site] else torch.empty(0, lm.d_model)
        out[site] = stacked[inverse].contiguous()
    return out


@torch.no_grad()
def collect_last_token_naive(lm, prompts: Sequence[str], sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """Reference implementation: one unbatched forward pass per prompt (for tests)."""
    sites = list(dict.fromkeys(sites))
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for seq in token_ids(lm, prompts):
        input_ids = torch.tensor([seq], device=lm.device)
        with capture(lm, sites, positions=[len(seq) - 1]) as cache:
            lm.model(input_ids=input_ids, use_cache=False)
        for site in sites:
            parts[site].append(cache[site][0, 0].float().cpu())
    return {s: torch.stack(parts[s]) for s in sites}
