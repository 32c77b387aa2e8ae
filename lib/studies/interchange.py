"""Interchange intervention (activation patching) over components x layers x positions.

The technique of pyvene's "Interchange Intervention" tutorial (Wu, Arora et al. 2024, "pyvene:
A Library for Understanding and Improving PyTorch Models via Interventions"; the tutorial is
ported from nano-causal-interventions), itself the interchange intervention of Geiger et al.
2021 ("Causal Abstractions of Neural Networks") and the activation patching of Vig et al. 2020
and Meng et al. 2022 ("Locating and Editing Factual Associations in GPT").

Run the model on a *source* prompt and cache one component's activation; run it on a *base*
prompt of the same token length, overwrite that component at one layer and one position with
the source's value, and read the probability of each answer token at the last position:

    p_t(c, l, p) = softmax(logits(base | c_l[p] := c_l^source[p]))[t]   at the last position.

Components are :mod:`lib.core.sites` kinds. The tutorial's two are ``attn_in`` (pyvene's
``attention_input``: the input of the self-attention module, after its norm, so only what
attention reads at p changes: its query, key and value there) and ``mlp_out`` (pyvene's
``mlp_output``: the MLP's output before the residual add). Nodes are labelled as in the
tutorial: ``a{l}`` for ``attn_in``, ``f{l}`` for ``mlp_out``, ``{kind}{l}`` otherwise.

The grid runs on the intervention engine (:mod:`lib.core.engine`), one cell per row, the source's
activations read by reference from one source run. A patch at position p changes nothing
before p, so rows continue from the base's key/value cache of ``[0, p)``; a patch at layer l
changes nothing below l, so a batch starts at its lowest patched layer from the base's stored
residual stream (where the engine's per-architecture self-check finds that exact; GPT-2 adds
position embeddings to its input, so there every block runs); cells whose source activation
equals the base's bit for bit (shared leading tokens) get the clean run's readout; only the
last position's logits are projected onto the vocabulary.

The same grid is estimated by attribution patching (:mod:`lib.studies.attribution`) and compared.
Figures of the grid: :mod:`lib.plots.interchange`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lib.studies.attribution import attribution_patching, correlations
from lib.core.engine import Context, Engine, Ref, Row, run_naive
from lib.core.interventions import Intervention
from lib.core.parsers import parse_layers, parse_positions, parse_sites
from lib.core.schema import NUM, Kind, map_of, names, nonempty, optional
from lib.core.sites import ALL_SITE_KINDS, GLOBAL_SITES, LAYER_SITES, site_name

DEFAULT_BASE = "The capital of Spain is"
DEFAULT_SOURCE = "The capital of Italy is"
DEFAULT_TOKENS = (" Madrid", " Rome")
DEFAULT_COMPONENTS = ("mlp_out", "attn_in")
ENGINES = ("batched", "naive")
NODE_PREFIX = {"attn_in": "a", "mlp_out": "f"}
RECORD_KEYS = ("component", "layer", "position", "node", "token", "token_id", "prob", "logit")
ATTRIBUTION_KEYS = ("component", "layer", "position", "node", "metric", "exact", "estimate",
                    "delta_norm")

_PROMPT = {"prompt": str, "token_ids": [int], "tokens": [str],
           "top": [{"rank": int, "token": str, "token_id": int, "prob": float}]}
_CORRELATION = {"n": int, "pearson": NUM, "spearman": NUM}
#: notebook 05's result (``full_compute/<model>/interchange_<NAME>.json``, :func:`run_interchange`)
SCHEMA = Kind("interchange", "05_interchange_intervention", {
    "base": _PROMPT, "source": _PROMPT, "components": names, "layers": nonempty([int]),
    "positions": nonempty([int]), "nodes": nonempty([str]),
    "answers": nonempty([{"token": str, "token_id": int, "p_base": float, "p_source": float,
                          "logit_base": float, "logit_source": float}]),
    "records": nonempty([{"component": str, "layer": int, "position": int, "node": str,
                          "token": str, "token_id": int, "prob": float, "logit": float}]),
    "attribution": optional({
        "metrics": map_of(str), "clean": map_of(float),
        "records": [{"component": str, "layer": int, "position": int, "node": str,
                     "metric": str, "exact": float, "estimate": float, "delta_norm": float}],
        "correlation": map_of({"all_cells": _CORRELATION, "changed_cells": _CORRELATION})}),
    "engine": optional(str), "method": optional(str), "params_key": optional(str)})


class TokenizationMismatchError(ValueError):
    """Base and source prompts tokenize to different lengths, so positions do not align."""


# --- parameters -----------------------------------------------------------------------------

def align_prompts(lm, base: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, pos) of base and source; a clear error if their lengths differ."""
    b = lm.tokenizer(base)["input_ids"]
    s = lm.tokenizer(source)["input_ids"]
    if len(b) != len(s):
        raise TokenizationMismatchError(
            f"base and source must tokenize to the same length for position-aligned patching, "
            f"but for {lm.name} the base has {len(b)} tokens {lm.token_strings(b)} and the "
            f"source has {len(s)} tokens {lm.token_strings(s)}. Reword one prompt so both have "
            "the same number of tokens.")
    return (torch.tensor([b], device=lm.device), torch.tensor([s], device=lm.device))


def answer_token_ids(lm, tokens: Sequence[str]) -> list[int]:
    """The single-token id of each answer string (e.g. " Madrid"); errors name the pieces."""
    if not tokens:
        raise ValueError("give at least one answer token, e.g. ' Madrid,  Rome'")
    return [lm.token_id(t) for t in tokens]


def node_label(kind: str, layer: int | None) -> str:
    """``a3`` for attn_in, ``f3`` for mlp_out (as the tutorial), ``resid_pre3`` otherwise."""
    if layer is None:
        return kind
    return f"{NODE_PREFIX.get(kind, kind)}{layer}"


def node_order(components: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Nodes bottom-up in forward order: a0, f0, a1, f1, ... (embed first)."""
    order = sorted(components, key=ALL_SITE_KINDS.index)
    nodes = [k for k in order if k in GLOBAL_SITES]
    nodes += [node_label(k, l) for l in layers for k in order if k in LAYER_SITES]
    return nodes


def grid_cells(components: Sequence[str], layers: Sequence[int], positions: Sequence[int]
               ) -> list[tuple[str, int | None, int]]:
    """Every (component, layer, position) cell; ``embed`` has no layer (None)."""
    cells = []
    for kind in components:
        for layer in ([None] if kind in GLOBAL_SITES else layers):
            for pos in positions:
                cells.append((kind, layer, pos))
    return cells


def _site(kind: str, layer: int | None) -> str:
    return site_name(kind, layer) if kind not in GLOBAL_SITES else kind


# --- clean runs ------------------------------------------------------------------------------

def top_tokens(lm, logits: torch.Tensor, k: int = 10) -> list[dict]:
    """The ``k`` most probable next tokens: rank, token string, token id, probability."""
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    return [{"rank": r + 1, "token": lm.tokenizer.decode([i]), "token_id": int(i),
             "prob": float(p)} for r, (p, i) in enumerate(zip(top.values.tolist(),
                                                             top.indices.tolist()))]


# --- the grid as engine rows ----------------------------------------------------------------

BASE_CONTEXT, SOURCE_CONTEXT = 0, 1


def grid_contexts(base_ids: torch.Tensor, source_ids: torch.Tensor) -> list[Context]:
    """The two contexts of the grid: the base (patched) and the source (read)."""
    return [Context(base_ids, name="base"), Context(source_ids, name="source")]


def interchange_rows(cells) -> list[Row]:
    """One engine row per cell: the base run with that component, layer and position replaced
    by the source run's activation there (a reference the engine resolves from one source run)."""
    # ignore[arg-type]: a Ref value, resolved by the engine (Intervention.value says Tensor)
    return [Row(BASE_CONTEXT, [Intervention(
                _site(k, l), positions=(p,),
                value=Ref(SOURCE_CONTEXT, _site(k, l)),
                source=f"run:source position {p}")])
            for k, l, p in cells]


def sweep_interchange(lm, base_ids: torch.Tensor, source_ids: torch.Tensor, cells,
                      batch_size: int = 16, engine: str = "batched",
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      skip_noops: bool = True, progress: bool = False,
                      runner: Engine | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(results, clean)``: the last-position readout of each cell (``reduce(logits)``,
    default the float32 logits), in the order of ``cells``, and the clean last-position logits
    of ``"base"`` and ``"source"``.

    ``engine="batched"`` runs the cells on :mod:`lib.core.engine` (grouped by position, the base's
    key/value prefix reused, blocks below a batch's lowest patched layer skipped where exact,
    cells that change nothing answered with the clean run, only the last position projected
    onto the vocabulary); ``"naive"`` is the reference loop, one full forward per cell
    (pyvene's algorithm). ``runner``: an engine on :func:`grid_contexts` to use (and keep)
    instead of a new one.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    contexts = grid_contexts(base_ids, source_ids)
    rows = interchange_rows(cells)
    if runner is None:
        runner = Engine(lm, contexts, batch_size=batch_size, skip_noops=skip_noops,
                        progress=progress)
    out = run_naive(lm, contexts, rows, reduce) if engine == "naive" else runner.run(rows, reduce)
    clean = {"base": runner.clean_readout(BASE_CONTEXT),
             "source": runner.clean_readout(SOURCE_CONTEXT)}
    return out, clean


# --- the whole experiment -------------------------------------------------------------------

def _metrics(token_ids: Sequence[int], tokens: Sequence[str]) -> tuple[dict, dict]:
    """Metrics of the last-position logits used for attribution, and their definitions."""
    fns: dict[str, Callable[..., torch.Tensor]] = {}  # p(tok) takes tid as a default
    defs: dict[str, str] = {}
    for tok, tid in zip(tokens, token_ids):
        fns[f"p({tok})"] = lambda z, tid=tid: z.softmax(-1)[tid]
        defs[f"p({tok})"] = f"probability of {tok!r} (id {tid}) at the last position"
    if len(token_ids) >= 2:
        fns["logit_diff"] = lambda z: z[token_ids[1]] - z[token_ids[0]]
        defs["logit_diff"] = (f"logit of {tokens[1]!r} minus logit of {tokens[0]!r} "
                              "(source answer minus base answer) at the last position")
    return fns, defs


def run_interchange(lm, base: str = DEFAULT_BASE, source: str = DEFAULT_SOURCE,
                    tokens: Sequence[str] = DEFAULT_TOKENS,
                    components: str | Sequence[str] = DEFAULT_COMPONENTS,
                    layers: str | Sequence[int] = "all", positions: str | Sequence[int] = "all",
                    batch_size: int = 16, engine: str = "batched", top_k: int = 10,
                    attribution: bool = True, progress: bool = True) -> dict:
    """The full experiment as a JSON-ready dict (see the README of notebook 05).

    Keys: ``base``/``source`` (prompt, tokens, ids, clean top-k), ``answers`` (clean
    probabilities and logits of each answer token on base and source), ``components``,
    ``layers``, ``positions``, ``nodes`` (plot order), ``records`` (one per component, layer,
    position and token: ``prob`` and ``logit`` at the last position after the patch) and,
    with ``attribution``, ``attribution`` (estimates next to exact effects, correlations).
    """
    components = parse_sites(components)
    base_ids, source_ids = align_prompts(lm, base, source)
    seq_len = base_ids.shape[1]
    layers = parse_layers(layers, lm.n_layers)
    positions = parse_positions(positions, seq_len)
    tokens = list(tokens)
    token_ids = answer_token_ids(lm, tokens)
    ids_t = torch.tensor(token_ids, device=lm.device)

    cells = grid_cells(components, layers, positions)

    def reduce(logits):
        return torch.stack([logits.softmax(-1)[:, ids_t], logits[:, ids_t]], dim=-1)

    # one engine for the grid and attribution: base and source run clean once
    runner = Engine(lm, grid_contexts(base_ids, source_ids), batch_size=batch_size,
                    progress=progress)
    out, clean = sweep_interchange(lm, base_ids, source_ids, cells, batch_size=batch_size,
                                   engine=engine, reduce=reduce, progress=progress,
                                   runner=runner)
    out = out.cpu()
    payload: dict = {"method": "interchange intervention (activation patching), pyvene tutorial "
                               "semantics: one component x layer x position patched per run"}
    for name, text, ids in (("base", base, base_ids), ("source", source, source_ids)):
        payload[name] = {"prompt": text, "token_ids": ids[0].tolist(),
                         "tokens": lm.token_strings(ids[0]),
                         "top": top_tokens(lm, clean[name], top_k)}
    payload["answers"] = [
        {"token": tok, "token_id": tid,
         "p_base": float(clean["base"].softmax(-1)[tid]),
         "p_source": float(clean["source"].softmax(-1)[tid]),
         "logit_base": float(clean["base"][tid]), "logit_source": float(clean["source"][tid])}
        for tok, tid in zip(tokens, token_ids)]
    payload.update(components=components, layers=layers, positions=positions,
                   nodes=node_order(components, layers), engine=engine)

    records = []
    for (kind, layer, pos), res in zip(cells, out):
        for t, (tok, tid) in enumerate(zip(tokens, token_ids)):
            records.append({"component": kind, "layer": layer, "position": pos,
                            "node": node_label(kind, layer), "token": tok, "token_id": tid,
                            "prob": float(res[t, 0]), "logit": float(res[t, 1])})
    payload["records"] = records

    if attribution:
        payload["attribution"] = attribution_vs_exact(lm, base_ids, source_ids, cells, out,
                                                      tokens, token_ids, clean["base"], runner)
    return payload


def attribution_vs_exact(lm, base_ids, source_ids, cells, exact_out, tokens, token_ids,
                         clean_base_logits, engine: Engine | None = None) -> dict:
    """Attribution-patching estimates next to the exact effects of the same cells.

    ``exact_out`` is (cells, tokens, 2): probability and logit of each answer token after the
    patch. The exact effect of a cell on a metric is ``metric(patched) - metric(base)``.
    """
    fns, defs = _metrics(token_ids, tokens)
    sites = list(dict.fromkeys(_site(k, l) for k, l, _ in cells))
    est, delta_norm, clean = attribution_patching(lm, base_ids, source_ids, sites, fns, engine)
    exact = {}
    for t, tok in enumerate(tokens):
        exact[f"p({tok})"] = exact_out[:, t, 0] - float(clean_base_logits.softmax(-1)[token_ids[t]])
    if "logit_diff" in fns:
        clean_diff = float(clean_base_logits[token_ids[1]] - clean_base_logits[token_ids[0]])
        exact["logit_diff"] = (exact_out[:, 1, 1] - exact_out[:, 0, 1]) - clean_diff
    records, corr = [], {}
    for metric in fns:
        ex, es, changed = [], [], []
        for c, (kind, layer, pos) in enumerate(cells):
            site = _site(kind, layer)
            e, a, d = float(exact[metric][c]), float(est[metric][site][pos]), \
                float(delta_norm[site][pos])
            records.append({"component": kind, "layer": layer, "position": pos,
                            "node": node_label(kind, layer), "metric": metric, "exact": e,
                            "estimate": a, "delta_norm": d})
            ex.append(e)
            es.append(a)
            changed.append(d > 0)
        corr[metric] = {"all_cells": correlations(ex, es),
                        "changed_cells": correlations([x for x, k in zip(ex, changed) if k],
                                                      [y for y, k in zip(es, changed) if k])}
    return {"metrics": defs, "clean": clean,
            "estimate": "(a_source - a_base) . d metric / d a, at a_base (one forward and one "
                        "backward pass on the base per metric)",
            "exact": "metric(patched) - metric(base), from the interchange grid",
            "records": records, "correlation": corr}


def set_threads(n: int = 0) -> int:
    """Set torch's CPU threads: ``n`` > 0 as given; 0 means half the CPU cores (at least 1),
    which on a shared machine is faster than oversubscribing. Returns the number set."""
    import os

    if n < 0:
        raise ValueError(f"THREADS must be >= 0, got {n}")
    n = n or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    return n


# --- tables (figures: lib.plots.interchange) ---------------------------------------------

def strongest_cells(payload: dict, n: int = 5) -> list[dict]:
    """Per answer token, the ``n`` cells that move its probability most (either way)."""
    import pandas as pd

    df = pd.DataFrame(payload["records"])
    out = []
    for ans in payload["answers"]:
        sub = df[df["token"] == ans["token"]].copy()
        sub["change"] = sub["prob"] - ans["p_base"]
        sub = sub.reindex(sub["change"].abs().sort_values(ascending=False).index).head(n)
        out.extend(sub[["token", "node", "position", "prob", "change"]].to_dict("records"))
    return out
