"""Roles of the IOI heads from evidence (Wang et al. 2022, "Interpretability in the Wild", sections
3.1-3.3): where a head looks from the end position, what it writes directly into the logits of the
names, and whether its OV circuit copies names.

For every head and every clean IOI prompt, one forward pass gives:

* **attention** from the last position to the indirect object (IO), the first subject mention
  (S1) and the second (S2) (the attention probabilities the model computes);
* **direct logit attribution** (DLA): the head's output at the last position, ``z_h W_O^h``,
  carried to the logits through the norms with their scales frozen at this run (Gemma's
  post-attention norm at the attention output of the layer, the final norm at the final
  residual stream), dotted with the unembedding of the IO and the S token (before any logit
  soft-capping). The DLAs of a layer's heads sum to that layer's attention output's DLA;
* the **copy score** of its OV circuit: the residual stream the head reads (``attn_in``) at the
  IO and S1 positions, through the head's value and output weights and the frozen norms to the
  logits, restricted to the distinct name tokens of the prompt file: the share of (prompt,
  position) where the name at that position gets the largest logit among the names (chance:
  one over the number of names); the **negative copy score** is the same for the smallest
  logit (Wang et al. use the top 5 of the whole vocabulary and MLP0's output of the name's
  embedding; reading the residual stream the head actually sees avoids assuming that MLP0 is
  where names are formed, which holds for GPT-2 but is not known for these models).

The role label comes from those numbers alone (:func:`role_of`, thresholds
:data:`ATTENTION_MIN`, :data:`COPY_MIN`). The forward pass here is a plain one with
``output_attentions``: attention probabilities are not a residual-stream site of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from lib.core.hooks import n_kv_heads, record_hooks
from lib.core.schema import NUM, STAT, Kind, nonempty
from lib.core.sites import site_name
from lib.core.stats import summarize
from lib.studies.path_patching.edges import _head_weight
from lib.studies.path_patching.nodes import parse_node

#: a head "attends" a name when its mean attention to it from the end is at least this
ATTENTION_MIN = 0.3
#: a head "copies" (or "negatively copies") names when its (negative) copy score is at least this
COPY_MIN = 0.5
ROLES = ("name mover", "negative name mover", "subject suppression", "other")

_HEAD_ROLE = {"head": str, "layer": int, "head_index": int, "path_delta": NUM,
              "attention": {"io": STAT, "s1": STAT, "s2": STAT},
              "dla": {"io": STAT, "s": STAT, "io_minus_s": STAT},
              "copy_score": float, "negative_copy_score": float, "role": str}
#: ``path_patching_roles.json``: :func:`head_roles` on the strongest heads of the IOI study
ROLES_SCHEMA = Kind("path_patching_roles", "07_path_patching", {
    "heads": nonempty([_HEAD_ROLE]), "n_pairs": int, "n_names": int,
    "thresholds": {"attention_min": float, "copy_min": float}, "method": str})


def frozen_norm(norm: torch.nn.Module, x0: torch.Tensor):
    """The norm ``norm`` as a linear map with its scale frozen at the input ``x0`` (..., d):
    ``f(c) = c * w / rms(x0)`` for an RMS norm, ``(c - mean(c)) * w / std(x0)`` for a layer
    norm (no bias: a contribution carries none). ``f(x0)`` equals ``norm(x0)`` up to a layer
    norm's bias."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    x0 = x0.float()
    if isinstance(norm, torch.nn.LayerNorm):
        scale = (x0.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        weight = norm.weight.float()
        return lambda c: (c.float() - c.float().mean(-1, keepdim=True)) * weight / scale
    rms0 = (x0.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    # the norm's effective weight (Gemma's 1 + w, Llama's w): an input of ones has rms ~1
    dtype = next(norm.parameters()).dtype
    ones = torch.ones(x0.shape[-1], dtype=dtype, device=x0.device)
    with torch.no_grad():
        weight = norm(ones).float() * (1.0 + eps) ** 0.5
    return lambda c: c.float() * weight / rms0


def _value_weight(lm, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d_model, d_head) weight and bias of the value of query head ``head`` (its key/value
    head under grouped-query attention)."""
    block = lm.spec.blocks(lm.model)[layer]
    dh = lm.d_head
    if lm.spec.fused_qkv:  # GPT-2's Conv1D: x @ W, columns q | k | v
        mod = block.get_submodule(lm.spec.v_proj)
        cols = slice(2 * lm.d_model + head * dh, 2 * lm.d_model + (head + 1) * dh)
        return mod.weight[:, cols], (mod.bias[cols] if mod.bias is not None else None)
    mod = block.get_submodule(lm.spec.v_proj)
    kv = head // (lm.n_heads // n_kv_heads(lm))
    rows = slice(kv * dh, (kv + 1) * dh)
    return mod.weight[rows].T, (mod.bias[rows] if mod.bias is not None else None)


@contextmanager
def eager_attention(lm):
    """Inside the block the model computes attention eagerly (SDPA returns no probabilities);
    the previous implementation is restored on exit."""
    configs = {id(m.config): m.config for m in lm.model.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def _positions(ids: list[int], io_id: int, s_id: int) -> tuple[int, int, int]:
    """Positions of IO, S1 and S2 in a prompt's token ids (first IO; first and last S)."""
    io = ids.index(io_id)
    s = [i for i, t in enumerate(ids) if t == s_id]
    return io, s[0], s[-1]


def role_of(attention: dict[str, float], dla_io: float, dla_s: float, copy: float,
            negative_copy: float) -> str:
    """The role a head's numbers show: the name it attends most from the end (at least
    :data:`ATTENTION_MIN`), then the sign of its direct effect on that name's logit, then its
    copy score (at least :data:`COPY_MIN`)."""
    name = max(("io", "s1", "s2"), key=lambda k: attention[k])
    if attention[name] < ATTENTION_MIN:
        return "other"
    if name == "io":
        if dla_io > 0 and copy >= COPY_MIN:
            return "name mover"
        if dla_io < 0 and negative_copy >= COPY_MIN:
            return "negative name mover"
        return "other"
    return "subject suppression" if dla_s < 0 else "other"


def head_roles(lm, pairs: Sequence[dict], heads: Sequence[str],
               path_delta: dict[str, float] | None = None, names: Sequence[str] = (),
               progress: bool = False) -> dict:
    """Attention from the end to IO/S1/S2, DLA on logit(IO) and logit(S), copy scores and the
    role label of each head in ``heads`` (``a<l>.h<h>``) over the clean prompts of ``pairs``
    (from :func:`lib.studies.ioi.aligned_pairs`); ``names``: the name strings of the prompt
    file (default: every IO and S of ``pairs``). JSON-ready; kind :data:`ROLES_SCHEMA`."""
    from tqdm.auto import tqdm

    from lib.studies.ioi import name_token

    if not pairs:
        raise ValueError("head_roles: no pairs")
    parsed = [parse_node(h, lm) for h in heads]
    for h, node in zip(heads, parsed):
        if node.kind != "head" or node.qkv is not None:
            raise ValueError(f"head_roles: {h!r} is not a head; use a<l>.h<h>")
    names = list(names) or sorted({p[k] for p in pairs for k in ("io", "s")})
    name_ids = torch.tensor(sorted({name_token(lm, n) for n in names}), device=lm.device)
    # float32 copies made once (a bfloat16 model would otherwise copy its whole unembedding
    # for every head and prompt); only the names' rows are ever read
    unembed = lm.model.get_output_embeddings().weight
    name_rows = unembed[name_ids].float()
    answer_rows = {t: unembed[t].float() for p in pairs for t in (p["io_id"], p["s_id"])}
    final_norm = lm.model.get_submodule(lm.spec.final_norm_path)
    layers = sorted({n.layer for n in parsed if n.layer is not None})
    last = site_name("resid_post", lm.n_layers - 1)
    sites = [last] + [site_name(k, l) for l in layers for k in ("head_out", "attn_out", "attn_in")]
    per: dict[str, dict[str, list[float]]] = {h: {} for h in heads}
    copies: dict[str, list[tuple[bool, bool]]] = {h: [] for h in heads}
    for pair in tqdm(pairs, desc="head roles", disable=not progress):
        ids = pair["base_ids"].to(lm.device)
        io, s1, s2 = _positions(ids[0].tolist(), pair["io_id"], pair["s_id"])
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad(), eager_attention(lm), record_hooks(lm, sites, store):
            out = lm.model(input_ids=ids, output_attentions=True, use_cache=False)
        final = frozen_norm(final_norm, store[last][0, -1])
        for h, node in zip(heads, parsed):
            assert node.layer is not None and node.head is not None
            l, i = node.layer, node.head
            row = out.attentions[l][0, i, -1]
            w_o = _head_weight(lm, l, i).float()
            post = (frozen_norm(lm.spec.blocks(lm.model)[l].get_submodule(lm.spec.attn_post_norm),
                                store[site_name("attn_out", l)][0, -1])
                    if lm.spec.attn_post_norm else (lambda c: c))
            direct = final(post(store[site_name("head_out", l)][0, -1, i].float() @ w_o))
            logit = torch.stack([direct @ answer_rows[pair["io_id"]],
                                 direct @ answer_rows[pair["s_id"]]])
            values = {"attention.io": row[io], "attention.s1": row[s1], "attention.s2": row[s2],
                      "dla.io": logit[0], "dla.s": logit[1], "dla.io_minus_s": logit[0] - logit[1]}
            for key, v in values.items():
                per[h].setdefault(key, []).append(float(v))
            # the OV circuit on the names at IO and S1 (what the head reads there)
            w_v, b_v = _value_weight(lm, l, i)
            x = store[site_name("attn_in", l)][0, [io, s1]].float()
            v = x @ w_v.float() + (b_v.float() if b_v is not None else 0.0)
            ov = final(post(v @ w_o)) @ name_rows.T
            for k, tok in enumerate((pair["io_id"], pair["s_id"])):
                own = int((name_ids == tok).nonzero()[0, 0])
                copies[h].append((int(ov[k].argmax()) == own, int(ov[k].argmin()) == own))
    rows = []
    for h, node in zip(heads, parsed):
        stats = {key: summarize(v) for key, v in per[h].items()}
        copy = sum(c for c, _ in copies[h]) / len(copies[h])
        negative = sum(n for _, n in copies[h]) / len(copies[h])
        attention = {k: stats[f"attention.{k}"] for k in ("io", "s1", "s2")}
        dla = {k: stats[f"dla.{k}"] for k in ("io", "s", "io_minus_s")}
        rows.append({
            "head": h, "layer": node.layer, "head_index": node.head,
            "path_delta": (path_delta or {}).get(h), "attention": attention, "dla": dla,
            "copy_score": copy, "negative_copy_score": negative,
            "role": role_of({k: v["mean"] for k, v in attention.items()}, dla["io"]["mean"],
                            dla["s"]["mean"], copy, negative)})
    return {"heads": rows, "n_pairs": len(pairs), "n_names": len(name_ids),
            "thresholds": {"attention_min": ATTENTION_MIN, "copy_min": COPY_MIN},
            "method": "clean prompts; attention from the last position; DLA with the norms' "
                      "scales frozen at each prompt's run, before soft-capping; copy score: "
                      "OV circuit on attn_in at the IO and S1 positions, arg max over the "
                      "prompt file's name tokens"}
