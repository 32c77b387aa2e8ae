"""The blocks above a layer on a residual stream the caller gives, continuing shared key/value
prefixes (used by DAS on a language model), and many (base, source) runs on such streams with
the positions their prompts share run once; see :mod:`lib.core.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lib.core.engine.passes import _kv_cache, _logits_to_keep, skip_blocks


# --- blocks above a layer, on a residual stream the caller gives ------------------------------

@dataclass
class StreamPrefix:
    """Keys and values of positions ``[0, length)`` in the blocks above ``layer``, one entry
    per prompt it was computed for (:func:`run_stream` with ``keep_prefix=True``); later
    positions of those prompts continue from it."""

    layer: int
    length: int
    keys: list[torch.Tensor]     # blocks layer+1..: (prompts, kv heads, length, head dim)
    values: list[torch.Tensor]

    def cache(self, lm, rows: torch.Tensor):
        """A fresh key/value cache for batch rows continuing prompts ``rows``. The blocks at
        or below ``layer`` are passed through and never read theirs: they get a zero-sized
        placeholder of the right length, so the model counts the positions correctly."""
        n_skip = self.layer + 1
        hold = torch.zeros(1, 1, self.length, 1, dtype=self.keys[0].dtype if self.keys
                           else lm.dtype, device=lm.device).expand(len(rows), -1, -1, -1)
        data = [(hold, hold)] * n_skip + [(k[rows], v[rows])
                                          for k, v in zip(self.keys, self.values)]
        return _kv_cache(lm, data)


def prefix_limit(lm) -> int | None:
    """The longest prefix whose keys and values a key/value cache keeps whole: sliding-window
    layers keep the last ``window - 1`` positions; None where no layer slides."""
    config = lm.model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    return window - 1 if window and any("sliding" in t for t in types) else None


def run_stream(lm, layer: int, h: torch.Tensor, prefix: StreamPrefix | None = None,
               rows: torch.Tensor | None = None, keep_prefix: bool = False):
    """Last-position output (float32) of blocks ``layer+1..`` and the head, run on ``h``
    ``(n, t, d)``: the residual stream after block ``layer`` at positions ``[s, s + t)``,
    where ``s`` is ``prefix.length`` (0 without a prefix). With a prefix, row i continues
    prompt ``rows[i]`` of it (default: row i continues prompt i). Differentiable in ``h``.

    ``keep_prefix=True`` also returns the :class:`StreamPrefix` of these positions (at most
    :func:`prefix_limit` of them: a cache that keeps every position). Used where
    many runs share their first positions (the pairwise-IIA graphs of
    :mod:`lib.studies.das.arithmetic_das`): the shared part runs once. Exact where
    :func:`layer_start_exact` holds (callers check)."""
    from transformers import DynamicCache

    start = prefix.length if prefix is not None else 0
    limit = prefix_limit(lm)
    if keep_prefix and limit is not None and start + h.shape[1] > limit:   # before any work
        raise ValueError(f"a prefix of {start + h.shape[1]} positions is longer than the "
                         f"key/value cache keeps whole ({limit}: a sliding window); keep a "
                         "shorter one")
    inputs = {"inputs_embeds": h, "use_cache": prefix is not None or keep_prefix}
    if prefix is not None:
        if prefix.layer != layer:
            raise ValueError(f"prefix was computed above layer {prefix.layer}, not {layer}")
        rows = torch.arange(len(h)) if rows is None else rows
        inputs["past_key_values"] = prefix.cache(lm, rows.to(lm.device))
    elif keep_prefix:
        inputs["past_key_values"] = DynamicCache(config=lm.model.config)
    with skip_blocks(lm, layer + 1):
        out = lm.model(**inputs, logits_to_keep=_logits_to_keep(h.shape[1], h.device))
    logits = out.logits[:, -1].float()
    if not keep_prefix:
        return logits
    layers = out.past_key_values.layers[layer + 1:]
    if any(l.keys.shape[-2] != start + h.shape[1] for l in layers):   # a cache of another kind
        raise ValueError(f"the key/value cache kept {[l.keys.shape[-2] for l in layers]} "
                         f"positions, not all {start + h.shape[1]}; run without keep_prefix")
    return logits, StreamPrefix(layer, start + h.shape[1], [l.keys for l in layers],
                                [l.values for l in layers])


# --- many (base, source) runs whose prompts share their first positions -----------------------

def prefix_groups(states: torch.Tensor) -> list[torch.Tensor]:
    """``groups[s]`` labels each prompt of ``states`` ``(prompts, positions, ...)`` by its
    stored values at positions ``[0, s)``: equal labels, bitwise equal prefixes (``s = 0``:
    one label)."""
    n = len(states)
    return [torch.zeros(n, dtype=torch.long)] + [
        torch.unique(states[:, :s].reshape(n, -1), dim=0, return_inverse=True)[1].cpu()
        for s in range(1, states.shape[1])]


def shared_prefix_split(groups: Sequence[torch.Tensor], base: torch.Tensor,
                        source: torch.Tensor, limit: int | None = None
                        ) -> tuple[int, torch.Tensor]:
    """Where to split the counterfactual runs (base, source) of a graph into a part shared
    between runs and a part of their own. ``groups[s]`` labels each arrangement by its
    stored residual stream at positions ``[0, s)`` (equal labels: bitwise equal states), so
    for a position-wise intervention the intervened stream at those positions, and with it
    every block's keys and values there, is the same for all runs whose base and source
    carry the same labels. Returns ``(s, shared)``: ``shared[i]`` numbers run i's pair of
    labels, and ``s`` minimises the positions run through the blocks (each distinct pair's
    ``s`` once, plus each run's ``T - s``), ``s <= limit``; ``s = 0`` shares nothing."""
    n_runs, length = len(base), len(groups)
    best = (n_runs * length, 0, torch.arange(n_runs))
    for s in range(1, length if limit is None else min(length, limit + 1)):
        code = groups[s][base] * (int(groups[s].max()) + 1) + groups[s][source]
        _, shared = torch.unique(code, return_inverse=True)
        cost = (int(shared.max()) + 1) * s + n_runs * (length - s)
        if cost < best[0]:
            best = (cost, s, shared)
    return best[1], best[2]


@torch.no_grad()
def run_stream_pairs(lm, layer: int, streams: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     base: torch.Tensor, source: torch.Tensor, groups: Sequence[torch.Tensor],
                     batch_size: int = 1000,
                     readout: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
                     progress: bool = False, desc: str = "runs") -> torch.Tensor:
    """``readout`` of the last-position output of each run i, whose residual stream after block
    ``layer`` is ``streams(base_idx, source_idx)`` (a batch of runs, ``(n, T, d)``, position
    by position: its value at a position depends only on the two prompts' values there and
    before). Runs whose base and source prompts carry the same ``groups`` labels at positions
    ``[0, s)`` share those positions' keys and values in every block above ``layer``: they are
    computed once per distinct pair (:func:`shared_prefix_split` picks ``s``) and each run
    continues from them (:func:`run_stream`). Rows come back in the order of ``base``."""
    split, shared = shared_prefix_split(groups, base, source, prefix_limit(lm))
    order = torch.argsort(shared, stable=True)             # runs of one prefix pair together
    a_idx, b_idx, shared = base[order], source[order], shared[order]
    it = range(0, len(a_idx), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="batch")
    outs = []
    for start in it:
        h = streams(a_idx[start:start + batch_size], b_idx[start:start + batch_size])
        if split == 0:
            logits = run_stream(lm, layer, h)
        else:   # each distinct prefix pair of the batch once, then every run from there
            _, local, counts = torch.unique_consecutive(    # sorted: each pair's runs adjoin
                shared[start:start + batch_size], return_inverse=True, return_counts=True)
            first = torch.cumsum(counts, 0) - counts
            _, kept = run_stream(lm, layer, h[first, :split], keep_prefix=True)
            logits = run_stream(lm, layer, h[:, split:], kept, local)
        outs.append(readout(logits).cpu())
    if not outs:   # no runs (e.g. a graph of one node)
        return torch.empty(0, dtype=torch.long)
    ordered = torch.cat(outs)
    result = torch.empty_like(ordered)
    result[order] = ordered
    return result
