"""The blocks above a layer on a residual stream the caller gives, continuing shared key/value
prefixes (used by DAS on a language model); see :mod:`lib.core.engine`.
"""

from __future__ import annotations

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
