"""Distributed alignment search on a fine-tuned language model: the thesis' ``X+Y+Z=`` task.

The thesis (maraPislar, ``src/run_das.py``) trains a ``LowRankRotatedSpaceIntervention`` at the
output of block l of a fine-tuned GPT-2, one d × k rotation shared over all token positions,
on counterfactuals of each causal model M1–M7 (:mod:`lib.studies.das.arithmetic`), and reports IIA.
This module strings :mod:`lib.studies.das.arithmetic` (task, splits, causal models, the tuned model) and
:mod:`lib.studies.das` (rotations, ``train_das``, ``iia``, ``random_control``) together.

Why it is cheap: the language model is frozen, so nothing below the intervened layer changes
while a rotation trains. The residual stream after block l of all 1,000 prompts is computed
once by :mod:`lib.core.engine` (:func:`residual_states`: rows without interventions get the
contexts' stored clean activations) and kept; a training example is a pair of arrangement
indices (base, source) into that table. :func:`run_from` runs the blocks above l on the
intervened residual stream (:func:`lib.core.engine.run_stream`: ``inputs_embeds`` with blocks 0..l
passed through, the engine's own mid-stack start, exact where
``lib.core.engine.layer_start_exact`` says so: Llama and Gemma 3, not GPT-2). Training runs whole
prompts from position 0 (all positions are intervened); evaluation (IIA, controls, the sanity
grid, the full-dimension swap) and the pairwise graphs share the first positions of runs whose
prompts agree there through the engine's key/value prefix (:func:`counterfactual_predictions`).

Sites: ``positions=None`` applies one rotation at every position (the thesis' shared
rotation); a tuple of positions applies it there only (per-position sites).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lib.studies.das import arithmetic as ar
from lib.studies import das
from lib.core.engine import (Capture, Context, Engine, Row, layer_start_exact, prefix_groups,
                             run_stream, run_stream_pairs)
from lib.core.stats import bootstrap_ci


class AtPositions(nn.Module):
    """A rotated-subspace intervention applied on the position axis (axis 1) at ``positions``
    only (None: at every position, one rotation shared over them)."""

    def __init__(self, inner: das._RotatedBase, positions: Sequence[int] | None = None):
        super().__init__()
        self.inner = inner
        self.positions = None if positions is None else tuple(int(p) for p in positions)

    def forward(self, base, sources, masks=None):
        if self.positions is None:
            return self.inner(base, sources, masks)
        pos = list(self.positions)
        sources = [sources] if isinstance(sources, torch.Tensor) else sources
        out = base.clone()
        out[:, pos] = self.inner(base[:, pos], [s[:, pos] for s in sources], masks)
        return out


class StateInterchange:
    """Counterfactual examples as index pairs into a table of stored residual streams
    ``states`` (n_arrangements, T, d): the duck type ``lib.studies.das.train_das`` and ``lib.studies.das.iia``
    read (``len`` and ``batch``), without materialising (n, T, d) copies."""

    def __init__(self, states: torch.Tensor, base: torch.Tensor, source: torch.Tensor,
                 labels: torch.Tensor):
        if not len(base) == len(source) == len(labels):
            raise das.DASError(f"base {len(base)}, source {len(source)} and labels "
                               f"{len(labels)} must have one entry per example")
        self.states, self.base, self.source, self.labels = states, base, source, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx):
        b, s = self.base[idx], self.source[idx]
        ones = torch.ones(len(b), 1, dtype=torch.bool, device=self.states.device)
        return self.states[b], [self.states[s]], ones, self.labels[idx].to(self.states.device)


def run_name(model: int, layer: int, rank: int, site: str, seed: int | None = None) -> str:
    """The name of one DAS run (its unit and its rotation file), e.g. ``M7_L22_k64_all``; a run
    of another seed than notebook 09's ``SEED`` ends in ``_s<seed>``, e.g. ``M7_L22_k64_all_s1``."""
    return f"M{model}_L{layer}_k{rank}_{site}" + ("" if seed is None else f"_s{seed}")


def check_layer_start(lm) -> None:
    if not layer_start_exact(lm):
        raise ValueError(f"{lm.name}: running the blocks above a layer from the stored residual "
                         "stream is not exact for this architecture (GPT-2 adds position "
                         "embeddings to its input); DAS here supports Llama and Gemma 3 models")


def _check_layer(lm, layer: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer must be an int from 0 to {lm.n_layers - 1}, got {layer!r}")
    return layer


@torch.no_grad()
def residual_states(lm, tokens: ar.TaskTokens, layers: Sequence[int],
                    chunk: int = 250) -> dict[int, torch.Tensor]:
    """``blocks.l.resid_post`` of every arrangement's prompt, (1000, T, d) per layer, read from
    :class:`lib.core.engine.Engine`'s stored clean runs (in chunks of ``chunk`` contexts)."""
    layers = [_check_layer(lm, int(l)) for l in layers]
    sites = tuple(f"blocks.{l}.resid_post" for l in layers)
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    ids = tokens.input_ids
    for a in range(0, len(ids), chunk):
        contexts = [Context(ids[i:i + 1]) for i in range(a, min(a + chunk, len(ids)))]
        engine = Engine(lm, contexts, batch_size=len(contexts), layer_start=False)
        got = engine.run([Row(i) for i in range(len(contexts))], Capture(sites))
        for l, site in zip(layers, sites):
            parts[l].append(got[site])
    return {l: torch.cat(parts[l]) for l in layers}


class LazyStates(Mapping):
    """:func:`residual_states` of ``layers``, computed on first use: a rerun whose runs,
    checks and graphs are all stored reads none of them and skips the forward passes."""

    def __init__(self, lm, tokens: ar.TaskTokens, layers: Sequence[int]):
        self.lm, self.tokens, self.layers = lm, tokens, [_check_layer(lm, int(l)) for l in layers]
        self._states: dict[int, torch.Tensor] | None = None

    @property
    def computed(self) -> bool:
        return self._states is not None

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not one of the stored layers {self.layers}")
        if self._states is None:
            self._states = residual_states(self.lm, self.tokens, self.layers)
        return self._states[layer]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def run_from(lm, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Last-position output (class scores of the tuned model) of blocks ``layer+1..`` run on
    ``h``, the residual stream after block ``layer`` (n, T, d); differentiable in ``h``."""
    return run_stream(lm, layer, h)


def head_at(lm, layer: int):
    check_layer_start(lm)
    _check_layer(lm, layer)
    return lambda h: run_from(lm, layer, h)


def pairs_data(states: torch.Tensor, pairs: dict) -> StateInterchange:
    dev = states.device
    return StateInterchange(states, pairs["base"].to(dev), pairs["source"].to(dev),
                            pairs["label"])


@torch.no_grad()
def predictions(lm, tokens: ar.TaskTokens, batch_size: int = 250) -> torch.Tensor:
    """The tuned model's predicted class for every arrangement (1000,)."""
    return ar.class_logits(lm, tokens.input_ids, batch_size).argmax(-1)


def full_swap_check(lm, layer: int, states: torch.Tensor, pairs: dict,
                    preds: torch.Tensor, positions: Sequence[int] | None = None) -> dict:
    """The full-dimension swap (rank d, any orthogonal R: R Rᵀ = I) at every position: the
    output must be the source's own prediction, so IIA equals how often the source's predicted
    sum is the counterfactual label (and, for a model that is always right, how often the
    source's true sum is)."""
    module = AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, lm.d_model, seed=0,
                                                            orthogonal_map=None), positions)
    module.inner.set_rotation(torch.eye(lm.d_model))
    got = shared_iia(lm, layer, module, states, pairs)
    src = pairs["source"]
    src_sum = ar.label_of(*ar.arrangement_tensor()[src].T)
    return {"iia": got,
            "source_prediction_is_label": float((preds[src] == pairs["label"]).float().mean()),
            "source_sum_is_label": float((src_sum == pairs["label"]).float().mean())}


def das_run(lm, layer: int, rank: int, states: torch.Tensor, train_pairs: dict,
            test_pairs: dict, positions: Sequence[int] | None = None, epochs: int = 1,
            batch_size: int = 64, lr: float = 0.01, seed: int = 0,
            eval_pairs: dict | None = None, progress: bool = False):
    """Train one low-rank rotation (d × ``rank``) at ``blocks.layer.resid_post`` and measure
    held-out IIA beside a random subspace of the same rank. Returns the module and a result
    (IIA, control IIA, curve, sizes); the curve's ``seconds`` are timings, not for files."""
    head = head_at(lm, layer)
    inner = das.LowRankRotatedSpaceIntervention(lm.d_model, int(rank), seed=seed)
    module = AtPositions(inner, positions)
    train = pairs_data(states, train_pairs)
    evald = pairs_data(states, eval_pairs) if eval_pairs is not None else None
    out = das.train_das(module, head, train, epochs=epochs, batch_size=batch_size, lr=lr,
                        seed=seed, eval_data=evald, progress=progress)
    return module, run_result(lm, layer, rank, module, states, test_pairs, seed, out["curve"],
                              out["steps"], len(train))


def run_result(lm, layer: int, rank: int, module: AtPositions, states: torch.Tensor,
               test_pairs: dict, seed: int, curve: list, steps: int, n_train: int) -> dict:
    """A trained rotation's result: held-out IIA beside a random subspace of the same rank
    (``random_control``, seed + 1), its curve, sizes and orthogonality (one shape for
    :func:`das_run` and :func:`lib.studies.das.stacked.das_runs_stacked`)."""
    inner = module.inner
    control = AtPositions(das.random_control(inner, seed=seed + 1), module.positions)
    return {"layer": layer, "rank": int(rank),
            "positions": "all" if module.positions is None else list(module.positions),
            "iia": shared_iia(lm, layer, module, states, test_pairs),
            "control_iia": shared_iia(lm, layer, control, states, test_pairs),
            "curve": curve, "steps": steps,
            "trainable_parameters": sum(p.numel() for p in inner.parameters()
                                        if p.requires_grad),
            "orthogonality_error": das.orthogonality_error(inner),
            "n_train": n_train, "n_test": len(test_pairs["label"])}


def iia_on(lm, layer: int, module: nn.Module, states: torch.Tensor, pairs: dict) -> float:
    """IIA of a trained module on other counterfactuals (e.g. of another causal model)."""
    return shared_iia(lm, layer, module, states, pairs)


# --- pairwise-IIA graphs (thesis: construct_graph.py) ---------------------------------------

@torch.no_grad()
def counterfactual_predictions(lm, layer: int, module: nn.Module, states: torch.Tensor,
                               base: torch.Tensor, source: torch.Tensor,
                               batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """The predicted class of each counterfactual run (base ``states[base[i]]``, source
    ``states[source[i]]``) of ``module`` at ``blocks.layer.resid_post``: a (len(base),) tensor.

    Shared work is done once: ``module`` acts position by position (a rotation shared over
    positions, or at some positions only), and the residual stream at the first positions of
    a prompt depends only on its first tokens, so runs whose base and source agree there
    (``10+03+0`` of ``10+03+07=`` and ``10+03+09=``) share those positions' keys and values
    in every block above ``layer``; the engine runs them once per distinct pair of prefixes
    and each run continues from them (:func:`lib.core.engine.run_stream_pairs`). On the padded
    prompts of all 1,000 arrangements' ordered pairs that is 40,000 prefixes of 7 positions and
    two positions per run instead of nine; on 1,000 random test counterfactuals about 100
    prefixes of 3 positions and six per run.
    """
    check_layer_start(lm)
    _check_layer(lm, layer)
    base = torch.as_tensor(base, dtype=torch.long).cpu()
    source = torch.as_tensor(source, dtype=torch.long).cpu()
    if base.shape != source.shape or base.dim() != 1:
        raise ValueError(f"base {tuple(base.shape)} and source {tuple(source.shape)} must be "
                         "1-d index tensors of one length")
    dev = states.device

    def streams(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(len(a), 1, dtype=torch.bool, device=dev)
        return module(states[a.to(dev)], [states[b.to(dev)]], ones)

    return run_stream_pairs(lm, layer, streams, base, source, prefix_groups(states),
                            batch_size=batch_size, readout=lambda z: z.argmax(-1),
                            progress=progress, desc=f"counterfactuals, layer {layer}")


def shared_iia(lm, layer: int, module: nn.Module, states: torch.Tensor, pairs: dict) -> float:
    """IIA of ``module`` on the counterfactuals ``pairs`` (base, source, label), with the
    first positions that runs share computed once (:func:`counterfactual_predictions`); the
    same predictions as one whole run per counterfactual (``lib.studies.das.iia``), tested."""
    got = counterfactual_predictions(lm, layer, module, states, pairs["base"], pairs["source"])
    return int((got == torch.as_tensor(pairs["label"]).cpu()).sum()) / len(got)


def pair_predictions(lm, layer: int, module: nn.Module, states: torch.Tensor,
                     pool: Sequence[int] | None = None, batch_size: int = 1000,
                     progress: bool = False) -> torch.Tensor:
    """The predicted class of every counterfactual run (base ``pool[a]``, source ``pool[b]``,
    a != b) of ``module`` at ``blocks.layer.resid_post``: an (n, n) tensor, -1 on the
    diagonal (``pool`` default: all 1,000 arrangements in itertools.product order); runs
    that share their first positions share that work (:func:`counterfactual_predictions`).
    """
    pool_t = torch.arange(len(ar.ARRANGEMENTS)) if pool is None else \
        torch.as_tensor(list(pool), dtype=torch.long)
    n = len(pool_t)
    rows_a, rows_b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    off = rows_a != rows_b
    a_idx, b_idx = rows_a[off], rows_b[off]               # ordered pairs, row-major
    predicted = torch.full((n, n), -1, dtype=torch.long)
    predicted[a_idx, b_idx] = counterfactual_predictions(
        lm, layer, module, states[pool_t.to(states.device)], a_idx, b_idx, batch_size, progress)
    return predicted


def pairwise_iia(lm, layer: int, module: nn.Module, states: torch.Tensor, model,
                 pool: Sequence[int] | None = None, batch_size: int = 1000,
                 progress: bool = False) -> torch.Tensor:
    """The thesis' pairwise-IIA graph of causal model ``model`` for a trained ``module``:
    ``W[a, b]`` (a, b indices into ``pool``, default all 1,000 arrangements in
    itertools.product order) is the IIA over the two counterfactuals (base ``pool[a]``, source
    ``pool[b]``) and (base ``pool[b]``, source ``pool[a]``), so W is symmetric with values in
    {0, 0.5, 1} and a zero diagonal.

    Every ordered pair is evaluated once (:func:`pair_predictions`) and written at its own
    (row, column): the thesis' version that produced its 36 committed graphs looped ``j`` over
    ``arrangements[i+1:]`` and wrote to column ``j`` instead of ``i + 1 + j`` (methods.md 1.6),
    so only cells with i + j < 999 were filled, with the wrong pairs. For all 1,000
    arrangements that is 999,000 counterfactual runs of the blocks above ``layer``.
    """
    predicted = pair_predictions(lm, layer, module, states, pool, batch_size, progress)
    return graph_weights(predicted, model, pool)


def graph_weights(predicted: torch.Tensor, model, pool: Sequence[int] | None = None
                  ) -> torch.Tensor:
    """Pairwise-IIA weights from :func:`pair_predictions`: each ordered pair's prediction
    against ``model``'s counterfactual label (P from the source), averaged over both
    directions."""
    n = len(predicted)
    pool_t = torch.arange(n) if pool is None else torch.as_tensor(list(pool), dtype=torch.long)
    xyz = ar.arrangement_tensor()
    bx = xyz[pool_t][:, None].expand(n, n, 3).reshape(-1, 3)    # base: the row
    sx = xyz[pool_t][None, :].expand(n, n, 3).reshape(-1, 3)    # source: the column
    out = model.run_interchange({"X": bx[:, 0], "Y": bx[:, 1], "Z": bx[:, 2]},
                                {"P": {"X": sx[:, 0], "Y": sx[:, 1], "Z": sx[:, 2]}})
    labels = model.label(out[model.outputs[0]]).reshape(n, n)
    correct = (predicted == labels).float()
    correct.fill_diagonal_(0)
    return (correct + correct.T) / 2


def _node_resampled(weights: np.ndarray, value: float):
    """Statistic for a node bootstrap: resamples of node indices (R, n) -> the fraction of
    off-diagonal cells equal to ``value`` (nan: the mean weight), pairs of copies of one node
    left out."""
    def stat(idx: np.ndarray) -> np.ndarray:
        out = np.empty(idx.shape[0])
        for r, row in enumerate(idx.astype(np.int64)):
            sub = weights[np.ix_(row, row)]
            cells = sub[row[:, None] != row[None, :]]
            out[r] = cells.mean() if np.isnan(value) else (cells == value).mean()
        return out
    return stat


def graph_intervals(weights: torch.Tensor, n_resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """Percentile intervals, resampling arrangements (nodes) with replacement, of the mean
    off-diagonal weight and of the fraction of weight-1 edges: what a graph on a sample of
    the 1,000 arrangements says about the full graph (the cells of one node are not
    independent, so the nodes are resampled, not the cells)."""
    w = weights.double().numpy()
    nodes = np.arange(w.shape[0], dtype=np.float64)
    return {"mean_weight_ci": list(bootstrap_ci(nodes, n_resamples, confidence, seed,
                                                _node_resampled(w, float("nan")))),
            "fraction_weight1_ci": list(bootstrap_ci(nodes, n_resamples, confidence, seed,
                                                     _node_resampled(w, 1.0))),
            "n_resamples": n_resamples, "confidence": confidence}


def _ramsey(adj: list[int], nodes: int) -> tuple[int, int]:
    """networkx's ``approximation.ramsey_R2`` on bitsets: a clique and an independent set of
    the subgraph induced by ``nodes`` (bit v: node v; ``adj[v]``: v's neighbours). Take the
    lowest node, recurse on its neighbours and on its non-neighbours, keep the larger of each
    (the first on ties, as networkx)."""
    if not nodes:
        return 0, 0
    v = (nodes & -nodes).bit_length() - 1
    rest = nodes & ~(1 << v)
    c_1, i_1 = _ramsey(adj, rest & adj[v])
    c_2, i_2 = _ramsey(adj, rest & ~adj[v])
    c_1 |= 1 << v
    i_2 |= 1 << v
    return (c_1 if c_1.bit_count() >= c_2.bit_count() else c_2,
            i_1 if i_1.bit_count() >= i_2.bit_count() else i_2)


def _max_clique(adj: list[int], nodes: int) -> int:
    """networkx's ``approximation.max_clique`` (Boppana and Halldorsson 1992; its
    ``clique_removal`` on the complement graph) on the subgraph induced by ``nodes``, as a
    bitset: the largest independent set of the complement that ``ramsey_R2`` finds while
    cliques of the complement are removed. The same algorithm and the same choices (nodes
    taken lowest first, the first of equal-size sets; tested equal to networkx's result),
    in bit operations: networkx copies the graph at every step of the recursion, hours on a
    1,000-node graph, against a second here."""
    comp = [nodes & ~a & ~(1 << v) for v, a in enumerate(adj)]
    clique, iset = _ramsey(comp, nodes)
    isets = [iset]
    while nodes:
        nodes &= ~clique
        clique, iset = _ramsey(comp, nodes)
        if iset:
            isets.append(iset)
    return max(isets, key=int.bit_count)   # the first of equal size, as networkx


def _bits(mask: int) -> list[int]:
    return [v for v in range(mask.bit_length()) if mask >> v & 1]


def _deeply_recursive(fn, graph, n_nodes: int):
    """``fn(graph)`` in a thread with a large stack and a recursion limit for ``n_nodes``:
    Boppana and Halldorsson's ``ramsey_R2`` (:func:`_ramsey`) recurses once per node it takes,
    so on a dense graph of 1,000 arrangements it runs past Python's default limit of 1,000
    frames."""
    import sys
    import threading

    out: dict = {}

    def target():
        try:
            out["value"] = fn(graph)
        except BaseException as err:   # re-raised in the caller's thread
            out["error"] = err

    limit, stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(max(limit, 8 * n_nodes + 1000))
    threading.stack_size(512 * 1024 * 1024)
    try:
        worker = threading.Thread(target=target)
        worker.start()
        worker.join()
    finally:
        threading.stack_size(stack)
        sys.setrecursionlimit(limit)
    if "error" in out:
        raise out["error"]
    return out["value"]


def graph_summary(weights: torch.Tensor, min_clique: int = 5) -> dict:
    """The thesis' clique analysis (``clique_version/analyse_graphs.py``, RemovalHeuristic):
    keep only weight-1 edges, then repeatedly take ``networkx.approximation.max_clique`` of
    what is left (:func:`_max_clique`, the same algorithm on bitsets), record it when it has at
    least ``min_clique`` nodes, remove its nodes, and stop at the first smaller one. Also the
    mean off-diagonal weight, the fractions of weights 0 / 0.5 / 1 and the mean weight-1
    degree (the numbers of methods.md 5.2 item 7)."""
    import networkx as nx

    n = weights.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    w = weights[off]
    ones = (weights == 1) & off
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    ii, jj = torch.nonzero(torch.triu(ones, 1), as_tuple=True)
    graph.add_edges_from(zip(ii.tolist(), jj.tolist()))
    density, degree = nx.density(graph), 2 * graph.number_of_edges() / n
    rows = np.packbits(ones.numpy(), axis=1, bitorder="little")
    adj = [int.from_bytes(r.tobytes(), "little") for r in rows]
    cliques, remaining = [], (1 << n) - 1
    while remaining:
        clique = _deeply_recursive(lambda left: _max_clique(adj, left), remaining, n)
        if clique.bit_count() < min_clique:
            break
        cliques.append(_bits(clique))
        remaining &= ~clique
    in_cliques = sorted({v for c in cliques for v in c})
    inside = graph.subgraph(in_cliques).number_of_edges()
    return {"n": n, "mean_weight": float(w.mean()),
            "fraction": {str(v): float((w == v).float().mean()) for v in (0.0, 0.5, 1.0)},
            "mean_weight1_degree": degree, "density": density,
            "cliques": cliques, "clique_sizes": [len(c) for c in cliques],
            "nodes_in_cliques": len(in_cliques),
            "fraction_of_edges_in_cliques": inside / max(graph.number_of_edges(), 1)}
