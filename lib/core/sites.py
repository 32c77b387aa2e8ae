"""One vocabulary of activation sites for every supported architecture.

Site names follow TransformerLens' style: ``embed`` and ``blocks.{layer}.{kind}``. Shapes are
(batch, pos, d_model) except ``head_out``, which is (batch, pos, n_heads, d_head).

====================  ===================================================================
kind                  meaning
====================  ===================================================================
``embed``             token embeddings (output of the embedding module; Gemma's is already
                      scaled by sqrt(d_model); GPT-2's excludes position embeddings, as ROME)
``resid_pre``         residual stream entering block ``layer``
``attn_in``           input of the self-attention module (after its norm), as pyvene's
                      ``attention_input``
``head_out``          per-head attention output before the output projection ("z")
``attn_out``          output of the self-attention module (after the output projection,
                      before any post-norm and the residual add)
``mlp_in``            input of the MLP module (after its norm)
``mlp_out``           output of the MLP module before any post-norm and the residual add, as
                      pyvene's ``mlp_output``
``resid_post``        residual stream leaving block ``layer`` (a block's output)
====================  ===================================================================

Path-patching sites (:data:`PATH_SITES`; not in :func:`all_sites`, so sweeps over the
vocabulary above are unchanged). They let one receiver's input change without changing the
residual stream, and give each sub-layer's additive contribution:

====================  ===================================================================
``attn_norm_in``      the attention sub-layer's input *before* its norm (the residual stream
                      as attention reads it; patching it leaves the residual stream alone)
``mlp_norm_in``       the MLP's input before its norm (the residual stream after attention)
``attn_add``          what attention adds to the residual stream (after Gemma's post-norm;
                      equal to ``attn_out`` on Llama and GPT-2)
``mlp_add``           what the MLP adds to the residual stream (after Gemma's post-norm)
``q_in``              (batch, pos, n_heads, d_model): the pre-norm input each head's query
                      reads; patching one head's slice recomputes only that head's query
``k_in``, ``v_in``    (batch, pos, n_kv_heads, d_model): the same for keys and values (one
                      slice per key/value head under grouped-query attention)
====================  ===================================================================

Each architecture has one :class:`ArchSpec` row that maps these sites to module paths, in the
spirit of causal-tracer's ``LayerConfig``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import torch

LAYER_SITES = ("resid_pre", "attn_in", "head_out", "attn_out", "mlp_in", "mlp_out", "resid_post")
GLOBAL_SITES = ("embed",)
ALL_SITE_KINDS = GLOBAL_SITES + LAYER_SITES
PATH_SITES = ("attn_norm_in", "mlp_norm_in", "attn_add", "mlp_add", "q_in", "k_in", "v_in")
KNOWN_LAYER_SITES = LAYER_SITES + PATH_SITES
# sites whose third axis is a head (queries' heads, or key/value heads for k_in / v_in)
HEAD_SITES = ("head_out", "q_in", "k_in", "v_in")

_SITE_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


@dataclass(frozen=True)
class ArchSpec:
    """Where each site lives in one architecture. Paths are dotted module names; ``attn``,
    ``mlp`` and ``o_proj`` are relative to one block."""

    family: str
    blocks_path: str
    embed_path: str
    final_norm_path: str
    attn: str
    mlp: str
    o_proj: str
    attn_norm: str = "input_layernorm"            # the attention's pre-norm
    mlp_norm: str = "post_attention_layernorm"    # the MLP's pre-norm
    attn_post_norm: str | None = None             # a norm on attention's output (Gemma 2/3)
    mlp_post_norm: str | None = None              # a norm on the MLP's output (Gemma 2/3)
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    fused_qkv: bool = False                       # GPT-2: one Conv1D gives q, k, v

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        # every supported architecture keeps its blocks in an nn.ModuleList at blocks_path
        return cast(torch.nn.ModuleList, model.get_submodule(self.blocks_path))


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", "model.embed_tokens", "model.norm",
                      "self_attn", "mlp", "self_attn.o_proj"),
    "gemma3_text": ArchSpec("gemma3_text", "model.layers", "model.embed_tokens", "model.norm",
                            "self_attn", "mlp", "self_attn.o_proj",
                            mlp_norm="pre_feedforward_layernorm",
                            attn_post_norm="post_attention_layernorm",
                            mlp_post_norm="post_feedforward_layernorm"),
    "gemma3": ArchSpec("gemma3", "model.language_model.layers",
                       "model.language_model.embed_tokens", "model.language_model.norm",
                       "self_attn", "mlp", "self_attn.o_proj",
                       mlp_norm="pre_feedforward_layernorm",
                       attn_post_norm="post_attention_layernorm",
                       mlp_post_norm="post_feedforward_layernorm"),
    "gpt2": ArchSpec("gpt2", "transformer.h", "transformer.wte", "transformer.ln_f",
                     "attn", "mlp", "attn.c_proj", attn_norm="ln_1", mlp_norm="ln_2",
                     q_proj="attn.c_attn", k_proj="attn.c_attn", v_proj="attn.c_attn",
                     fused_qkv=True),
}
# Same module layout as Llama (Gemma 2 has Gemma 3's norms).
for _alias in ("mistral", "qwen2", "qwen3", "gemma"):
    ARCH_SPECS[_alias] = ArchSpec(_alias, *[getattr(ARCH_SPECS["llama"], f) for f in
                                            ("blocks_path", "embed_path", "final_norm_path",
                                             "attn", "mlp", "o_proj")])
ARCH_SPECS["gemma2"] = ArchSpec("gemma2", "model.layers", "model.embed_tokens", "model.norm",
                                "self_attn", "mlp", "self_attn.o_proj",
                                mlp_norm="pre_feedforward_layernorm",
                                attn_post_norm="post_attention_layernorm",
                                mlp_post_norm="post_feedforward_layernorm")


def arch_spec_for(model: torch.nn.Module) -> ArchSpec:
    """The spec row for ``model.config.model_type``; a clear error for an unsupported one."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCH_SPECS:
        raise NotImplementedError(
            f"architecture {model_type!r} has no site table; supported: {sorted(ARCH_SPECS)}. "
            "Add an ArchSpec row to lib/core/sites.py.")
    return ARCH_SPECS[model_type]


def site_name(kind: str, layer: int | None = None) -> str:
    """``site_name("mlp_out", 3) -> "blocks.3.mlp_out"``; ``site_name("embed") -> "embed"``."""
    if kind in GLOBAL_SITES:
        if layer is not None:
            raise ValueError(f"site {kind!r} has no layer")
        return kind
    if kind not in KNOWN_LAYER_SITES:
        raise ValueError(f"unknown site kind {kind!r}; known: "
                         f"{', '.join(ALL_SITE_KINDS + PATH_SITES)}")
    if layer is None:
        raise ValueError(f"site {kind!r} needs a layer")
    return f"blocks.{int(layer)}.{kind}"


def parse_site(name: str) -> tuple[str, int | None]:
    """``"blocks.3.mlp_out" -> ("mlp_out", 3)``; ``"embed" -> ("embed", None)``."""
    if name in GLOBAL_SITES:
        return name, None
    match = _SITE_RE.match(name)
    if not match or match.group(2) not in KNOWN_LAYER_SITES:
        raise ValueError(
            f"unknown site {name!r}; use 'embed' or 'blocks.<layer>.<kind>' with kind one of "
            f"{', '.join(KNOWN_LAYER_SITES)}")
    return match.group(2), int(match.group(1))


def all_sites(n_layers: int) -> list[str]:
    """Every site name of a model with ``n_layers`` blocks, in forward order."""
    return list(GLOBAL_SITES) + [site_name(k, l) for l in range(n_layers) for k in LAYER_SITES]
