"""Path patching on any supported architecture, in three forms, on the intervention engine.

Path patching asks which *paths* through the computation graph carry an effect, not only which
components: a component's output may be taken from the source run along one path and from the
base run along another. The forms (DESIGN.md, "Path patching"):

1. **Tree patching** (nano-causal-interventions, A. Arora 2023; the path patching of
   Goldowsky-Dill et al. 2023): ``branch(path)`` says where the computation splits, ``which(path)``
   picks the input (0 = base, 1 = source, ...) each path starts from. :func:`tree_patch`.
2. **Sender -> receiver path patching** (Wang et al. 2022, "Interpretability in the Wild", the
   IOI circuit): senders patched from the source run, other components frozen at the base run,
   the receivers' inputs recomputed, then the base run with the receivers patched. The freeze
   policy is explicit: ``"attention"`` (Wang et al.: every attention head frozen, MLPs
   recompute) or ``"all"`` (pyvene's IOI tutorial: MLPs frozen too). :func:`path_patch`.
3. **Edge patching** (ACDC, Conmy et al. 2023; auto-circuit's one-pass masks): a receiver's
   input is the sum of its senders' outputs, so a set of edges (sender output -> receiver input)
   is patched exactly in one forward pass by adding ``source_out(s) - current_out(s)`` at each
   patched edge's receiver, ``current_out`` being the sender's output in that very pass; many
   edge sets run batched, one per row. :func:`edge_patch`. Edge attribution patching (Syed et
   al. 2023) estimates every edge at once from one forward and one backward pass: :func:`eap`.

Node vocabulary
---------------
``emb`` (token (+ position) embeddings: the residual stream entering block 0); ``a{l}`` and
``f{l}`` (the attention and MLP sub-layers of block ``l``; as tree-patching path elements they
are the residual stream *after* that sub-layer, as in nano); heads ``a{l}.h{h}`` and their query,
key and value inputs ``a{l}.h{h}.q`` / ``.k`` / ``.v``; ``logits`` (the final residual stream,
as a receiver). Tree paths also use nano's ``ln_final`` (root), ``a{l}.head`` / ``f{l}.head``
(the sub-layer term of a split node) and ``a{l}.head.pos{p}`` (its input at position p), and the
lineage tree labels the residual term ``a{l}.resid``.

Tree-patching semantics (nano's): requests go from the output down. At a node for which
``branch(path)`` is truthy, the residual term is requested with the path *without* the node and
the sub-layer term with it (``path + [node, node.head]``); at ``node.head``, ``"positions"``
requests the sub-layer's input separately per position (``.head.pos{p}``), and for attention
``"heads"`` (or True) requests it per head (``a{l}.h{h}``) and, where ``branch`` is truthy at
the head too, per query/key/value (``a{l}.h{h}.q``). An unbranched node keeps its name in the
path (nano's code drops an unbranched MLP's name, an asymmetry not kept here). ``which(path)`` is
called at ``emb``. Each request becomes a *run*: a context plus interventions at the sub-layer
inputs of the split nodes (pre-norm sites of :mod:`lib.sites`, so only that sub-layer reads the
other input), whose values are :class:`lib.engine.Ref` references to the runs of the sub-trees;
equal lineages give equal references, and the engine computes each distinct one once.

Computation modules import no plotting library; the lineage tree is drawn by
:mod:`lib.plots.path_patching`.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lib.engine import Capture, Context, Engine, Ref, Row, run_naive
from lib.hooks import Intervention, n_kv_heads
from lib.sites import site_name

FREEZE_POLICIES = ("attention", "all")
Lineage = namedtuple("Lineage", "name children")
"""A node of the lineage tree: ``name`` and ``children`` (Lineages, or an int input index at
``emb``), like nano's ``Path``. Equal lineages are equal computations."""

_NODE_RE = re.compile(r"^(?:(emb)|(logits)|([af])(\d+)(?:\.h(\d+)(?:\.([qkv]))?)?)$")


@dataclass(frozen=True)
class Node:
    """A parsed node name: kind ``emb``, ``logits``, ``a``, ``f`` or ``head``; ``qkv`` for a
    head's input (``"q"``, ``"k"``, ``"v"``)."""

    kind: str
    layer: int | None = None
    head: int | None = None
    qkv: str | None = None

    @property
    def name(self) -> str:
        if self.kind in ("emb", "logits"):
            return self.kind
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}" + (f".{self.qkv}" if self.qkv else "")
        return f"{self.kind}{self.layer}"


def parse_node(name: str, lm=None) -> Node:
    """``"a3.h1.q" -> Node("head", 3, 1, "q")``; checked against ``lm``'s sizes when given."""
    m = _NODE_RE.match(name.strip())
    if not m:
        raise ValueError(f"unknown node {name!r}; use emb, logits, a<l>, f<l>, a<l>.h<h> or "
                         "a<l>.h<h>.q / .k / .v")
    if m.group(1):
        return Node("emb")
    if m.group(2):
        return Node("logits")
    layer = int(m.group(4))
    if lm is not None and not 0 <= layer < lm.n_layers:
        raise ValueError(f"node {name!r}: layer {layer} out of range (0 to {lm.n_layers - 1})")
    if m.group(5) is None:
        return Node(m.group(3), layer)
    if m.group(3) != "a":
        raise ValueError(f"node {name!r}: only attention has heads")
    head = int(m.group(5))
    if lm is not None and not 0 <= head < lm.n_heads:
        raise ValueError(f"node {name!r}: head {head} out of range (0 to {lm.n_heads - 1})")
    return Node("head", layer, head, m.group(6))


def all_heads(lm) -> list[str]:
    return [f"a{l}.h{h}" for l in range(lm.n_layers) for h in range(lm.n_heads)]


# --- 1. tree patching ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Run:
    """A run holding a lineage's value: context ``context`` under ``ivs``."""

    context: int
    ivs: tuple[Intervention, ...] = ()


@dataclass
class TreePatch:
    """One tree patch: its readout, its lineage tree, its run (context and interventions)."""

    readout: torch.Tensor
    lineage: Lineage
    row: Row


class _TreeBuilder:
    def __init__(self, lm, n_inputs: int, length: int, which, branch):
        self.lm, self.n_inputs, self.length = lm, n_inputs, length
        self.which, self.branch = which, branch
        self.clean = {}   # input index -> _Run
        self.memo: dict[tuple, _Run] = {}

    def _clean(self, k: int) -> _Run:
        if not isinstance(k, int) or not 0 <= k < self.n_inputs:
            raise ValueError(f"which(path) returned {k!r}; it must be an input index 0 to "
                             f"{self.n_inputs - 1}")
        return self.clean.setdefault(k, _Run(k))

    def _ref(self, run: _Run, site: str) -> Ref:
        return Ref(run.context, site, None, run.ivs)

    def request(self, node: tuple, path: list[str]) -> tuple[Lineage, _Run]:
        """The lineage and run of ``node`` (``("emb",)``, ``("a", l)`` or ``("f", l)``)
        requested along ``path`` (which does not hold the node yet)."""
        if node[0] == "emb":
            path = path + ["emb"]
            k = self.which(path)
            return Lineage("emb", (k,)), self._clean(k)
        kind, layer = node
        name = f"{kind}{layer}"
        path = path + [name]
        below = ("f", layer - 1) if kind == "a" and layer > 0 else \
            ("emb",) if kind == "a" else ("a", layer)
        if not self.branch(path):
            lin, run = self.request(below, path)
            return Lineage(name, (lin,)), run
        lin_r, run_r = self.request(below, path[:-1])
        head = f"{name}.head"
        hpath = path + [head]
        how = self.branch(hpath)
        ivs: list[Intervention] = []
        if kind == "a" and how in ("heads", True):
            children, ivs = self._heads(layer, below, hpath, run_r)
        elif how == "positions":
            site = site_name("attn_norm_in" if kind == "a" else "mlp_norm_in", layer)
            read = site_name("resid_pre", layer) if kind == "a" else site
            children, groups = [], {}
            for p in range(self.length):
                lin_p, run_p = self.request(below, hpath + [f"{head}.pos{p}"])
                children.append(Lineage(f"{head}.pos{p}", (lin_p,)))
                groups.setdefault(id(run_p), (run_p, []))[1].append(p)
            for run_p, ps in groups.values():
                if run_p is not run_r:
                    ivs.append(Intervention(site, positions=tuple(ps),
                                            value=self._ref(run_p, read), source="tree"))
        else:
            lin_s, run_s = self.request(below, hpath)
            children = [lin_s]
            if run_s is not run_r:
                site = site_name("attn_norm_in" if kind == "a" else "mlp_norm_in", layer)
                read = site_name("resid_pre", layer) if kind == "a" else site
                ivs.append(Intervention(site, value=self._ref(run_s, read), source="tree"))
        lineage = Lineage(name, (Lineage(f"{name}.resid", (lin_r,)),
                                 Lineage(head, tuple(children))))
        if not ivs:
            return lineage, run_r
        key = lineage
        if key not in self.memo:
            self.memo[key] = _Run(run_r.context, run_r.ivs + tuple(ivs))
        return lineage, self.memo[key]

    def _heads(self, layer: int, below, hpath, run_r):
        lm = self.lm
        n_kv = n_kv_heads(lm)
        group = lm.n_heads // n_kv
        children, runs = [], {"q": [], "k": [], "v": []}
        for h in range(lm.n_heads):
            hname = f"a{layer}.h{h}"
            if self.branch(hpath + [hname]):
                parts = []
                for x in "qkv":
                    lin, run = self.request(below, hpath + [hname, f"{hname}.{x}"])
                    parts.append(Lineage(f"{hname}.{x}", (lin,)))
                    runs[x].append(run)
                children.append(Lineage(hname, tuple(parts)))
            else:
                lin, run = self.request(below, hpath + [hname])
                children.append(Lineage(hname, (lin,)))
                for x in "qkv":
                    runs[x].append(run)
        ivs = []
        for x in "qkv":
            site = site_name(f"{x}_in", layer)
            per = runs[x]
            if x != "q":   # one key/value head serves `group` query heads
                slots = []
                for g in range(n_kv):
                    members = per[g * group:(g + 1) * group]
                    if any(m is not members[0] for m in members):
                        raise ValueError(
                            f"a{layer}: query heads {list(range(g * group, (g + 1) * group))} "
                            f"share key/value head {g} (grouped-query attention), so their "
                            f"{'key' if x == 'k' else 'value'} inputs must come from one "
                            "lineage; branch q only, or give the group one input")
                    slots.append(members[0])
                per = slots
            groups = {}
            for h, run in enumerate(per):
                if run is not run_r:
                    groups.setdefault(id(run), (run, []))[1].append(h)
            for run, hs in groups.values():
                ivs.append(Intervention(site, heads=tuple(hs), value=self._ref(run, site),
                                        source="tree"))
        return children, ivs

    def build(self) -> tuple[Lineage, _Run]:
        lin, run = self.request(("f", self.lm.n_layers - 1), ["ln_final"])
        return Lineage("ln_final", (lin,)), run


def tree_rows(lm, n_inputs: int, length: int, patches: Sequence[tuple[Callable, Callable]]
              ) -> tuple[list[Row], list[Lineage]]:
    """Engine rows and lineage trees of ``patches``, a list of ``(which, branch)`` pairs."""
    rows, lineages = [], []
    for which, branch in patches:
        lin, run = _TreeBuilder(lm, n_inputs, length, which, branch).build()
        rows.append(Row(run.context, run.ivs))
        lineages.append(lin)
    return rows, lineages


def tree_patch(lm, inputs: Sequence[torch.Tensor], patches, readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False
               ) -> list[TreePatch]:
    """Run tree patches on ``inputs`` (token ids, all of one length): ``patches`` is one
    ``(which, branch)`` pair or a list of them, run batched on one engine (distinct lineages
    computed once over all of them). ``readout`` as :meth:`lib.engine.Engine.run` (last-position
    logits by default). ``naive=True`` runs the engine's reference loop instead."""
    if isinstance(patches, tuple) and len(patches) == 2 and callable(patches[0]):
        patches = [patches]
    inputs = [torch.as_tensor(x).reshape(1, -1) for x in inputs]
    lengths = {x.shape[1] for x in inputs}
    if len(lengths) != 1:
        raise ValueError(f"tree patching needs inputs of one length (positions are aligned); "
                         f"got lengths {[x.shape[1] for x in inputs]}")
    rows, lineages = tree_rows(lm, len(inputs), lengths.pop(), patches)
    contexts = [Context(x.to(lm.device), name=f"input {i}") for i, x in enumerate(inputs)]
    if naive:
        out = run_naive(lm, contexts, rows, readout)
    else:
        engine = engine or Engine(lm, contexts, batch_size=batch_size)
        out = engine.run(rows, readout)
    return [TreePatch(out[i], lin, row) for i, (lin, row) in enumerate(zip(lineages, rows))]


def node_position_patch(node: str, position: int):
    """nano's single node x position patch: split ``node`` (``a{l}`` or ``f{l}``) and its
    sub-layer by positions; the sub-layer's input at ``position`` comes from input 1 (the
    source), everything else from input 0. For ``a{l}`` this is notebook 05's ``attn_in``
    patch at that position; ``node="none"`` patches nothing."""
    head, pos = f"{node}.head", f"{node}.head.pos{position}"

    def branch(path):
        return True if path[-1] == node else "positions" if path[-1] == head else False

    def which(path):
        return 1 if pos in path else 0
    return which, branch


def node_order(n_layers: int) -> list[str]:
    """nano's sweep order: none, f{L-1}, a{L-1}, ..., f0, a0."""
    return ["none"] + [f"{k}{l}" for l in reversed(range(n_layers)) for k in "fa"]


def cumulative_patch(nodes_above: Sequence[str], position: int):
    """nano's cumulative direct-path patch: every node of ``nodes_above`` (from the top down)
    split by positions along the main residual chain only (paths of length <= 3), and every
    path through one of their sub-layers' inputs at ``position`` reads input 1: the direct
    paths from the source at that position through each of those sub-layers to the output."""
    chosen = set(nodes_above)
    suffix = f".pos{position}"

    def branch(path):
        if len(path) > 3:
            return False
        last = path[-1]
        if last in chosen:
            return True
        if last.endswith(".head") and last[:-5] in chosen:
            return "positions"
        return False

    def which(path):
        return 1 if any(p.endswith(suffix) for p in path) else 0
    return which, branch


def count_lineages(lineage: Lineage) -> int:
    """Distinct sub-lineages (merged as nano's drawing merges them)."""
    seen = set()

    def walk(x):
        if not isinstance(x, Lineage) or x in seen:
            return
        seen.add(x)
        for c in x.children:
            walk(c)
    walk(lineage)
    return len(seen)


def lineage_edges(lineage: Lineage, collapse: bool = True) -> tuple[dict, list]:
    """``(labels, edges)`` of the lineage tree for drawing: one node per distinct sub-lineage
    (``{id: label}``), edges parent -> child, leaves the input indices. ``collapse`` merges a
    chain of single-child nodes into one node labelled ``top ... bottom (n)``."""
    ids: dict = {}
    labels: dict[int, str] = {}
    edges: list[tuple[int, int]] = []

    def chain(x):
        names = [x.name]
        while collapse and isinstance(x, Lineage) and len(x.children) == 1 and \
                isinstance(x.children[0], Lineage) and len(x.children[0].children) == 1 and \
                isinstance(x.children[0].children[0], Lineage):
            x = x.children[0]
            names.append(x.name)
        return x, names

    def visit(x) -> int:
        key = ("leaf", x) if not isinstance(x, Lineage) else x
        if key in ids:
            return ids[key]
        if not isinstance(x, Lineage):
            ids[key] = len(ids)
            labels[ids[key]] = f"input {x}"
            return ids[key]
        end, names = chain(x)
        ids[key] = node = len(ids)
        labels[node] = names[0] if len(names) == 1 else \
            f"{names[0]} … {names[-1]} ({len(names)})"
        for c in end.children:
            edges.append((node, visit(c)))
        return node
    visit(lineage)
    return labels, edges


# --- 2. sender -> receiver path patching ------------------------------------------------------

def _receiver_site(node: Node, lm) -> tuple[str, tuple[int, ...] | None]:
    if node.kind == "logits":
        return site_name("resid_post", lm.n_layers - 1), None
    if node.kind == "a":
        return site_name("attn_norm_in", node.layer), None
    if node.kind == "f":
        return site_name("mlp_norm_in", node.layer), None
    if node.kind == "head" and node.qkv:
        head = node.head if node.qkv == "q" else node.head // (lm.n_heads // n_kv_heads(lm))
        return site_name(f"{node.qkv}_in", node.layer), (head,)
    raise ValueError(f"receiver {node.name!r}: use logits, a<l>, f<l> (the sub-layer's input) "
                     "or a head's input a<l>.h<h>.q / .k / .v")


def _sender_groups(snodes: Sequence[Node], n_layers: int
                   ) -> tuple[dict[int, list[int]], set[int], set[int], int]:
    """Senders grouped: heads by layer, layers of whole attention and MLP sub-layers, and the
    lowest sender's layer (-1 for ``emb``); any other node is refused."""
    heads: dict[int, list[int]] = {}
    attn, mlp, low = set(), set(), n_layers
    for s in snodes:
        if s.kind == "head" and s.qkv is None:
            heads.setdefault(s.layer, []).append(s.head)
        elif s.kind in ("a", "f"):
            (attn if s.kind == "a" else mlp).add(s.layer)
        elif s.kind == "emb":
            low = -1
            continue
        else:
            raise ValueError(f"sender {s.name!r}: use emb, a<l>, f<l> or a head a<l>.h<h>")
        low = min(low, s.layer)
    return heads, attn, mlp, low


def path_patch_row(lm, senders: Sequence[str], receivers: Sequence[str] = ("logits",),
                   freeze: str = "attention", base: int = 0, source: int = 1,
                   positions: Sequence[int] | None = None) -> Row:
    """The engine row of one sender -> receiver path patch (Wang et al. 2022).

    Stage 1 (a reference, resolved by the engine): the base run with the senders' outputs from
    the source run and, at every layer from the lowest sender's up to below the receivers,
    every other attention head frozen at its base-run output (``freeze="attention"``), and
    every MLP too (``"all"``). Stage 2 (the row): the base run with each receiver's input
    replaced by its value in stage 1. For ``logits`` the row is stage 1 itself. ``positions``
    limits every patch and freeze to those positions (positions where base and source agree
    on every earlier token change nothing, so leaving them out is exact).
    """
    if freeze not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {freeze!r}; use 'attention' (Wang et al. "
                         "2022: heads frozen, MLPs recompute) or 'all' (pyvene's IOI "
                         "tutorial: MLPs frozen too)")
    if not senders:
        raise ValueError("give at least one sender")
    pos = None if positions is None else tuple(positions)
    snodes = [parse_node(s, lm) for s in senders]
    rnodes = [parse_node(r, lm) for r in receivers]
    if any(r.kind == "logits" for r in rnodes) and len(rnodes) > 1:
        raise ValueError("logits as a receiver stands alone")
    heads_by_layer, whole_attn, whole_mlp, low = _sender_groups(snodes, lm.n_layers)
    stage1 = []
    for s in snodes:
        if s.kind in ("a", "f"):
            kind = "attn_out" if s.kind == "a" else "mlp_out"
            stage1.append(Intervention(site_name(kind, s.layer), positions=pos,
                                       value=Ref(source, site_name(kind, s.layer)),
                                       source="sender"))
        elif s.kind == "emb":
            stage1.append(Intervention(site_name("resid_pre", 0), positions=pos,
                                       value=Ref(source, site_name("resid_pre", 0)),
                                       source="sender"))
    for layer, hs in heads_by_layer.items():
        site = site_name("head_out", layer)
        stage1.append(Intervention(site, positions=pos, heads=tuple(sorted(hs)),
                                   value=Ref(source, site), source="sender"))
    # receivers' layers: the receiver reads the residual stream entering its sub-layer
    top_attn = top_mlp = lm.n_layers - 1
    for r in rnodes:
        if r.kind == "logits":
            continue
        if r.kind == "f":
            top_attn, top_mlp = min(top_attn, r.layer), min(top_mlp, r.layer - 1)
        else:
            top_attn, top_mlp = min(top_attn, r.layer - 1), min(top_mlp, r.layer - 1)
        first = min([s.layer for s in snodes if s.layer is not None], default=-1)
        if (r.kind == "f" and r.layer < first) or (r.kind != "f" and r.layer <= first):
            raise ValueError(f"receiver {r.name!r} is not above every sender {list(senders)}")
    for layer in range(max(0, low), top_attn + 1):
        if layer in whole_attn:
            continue
        others = [h for h in range(lm.n_heads) if h not in heads_by_layer.get(layer, [])]
        if len(others) == lm.n_heads:
            site = site_name("attn_out", layer)
            stage1.append(Intervention(site, positions=pos, value=Ref(base, site),
                                       source="frozen"))
        elif others:
            site = site_name("head_out", layer)
            stage1.append(Intervention(site, positions=pos, heads=tuple(others),
                                       value=Ref(base, site), source="frozen"))
    if freeze == "all":
        for layer in range(max(0, low), top_mlp + 1):
            if layer not in whole_mlp:
                site = site_name("mlp_out", layer)
                stage1.append(Intervention(site, positions=pos, value=Ref(base, site),
                                           source="frozen"))
    if rnodes[0].kind == "logits":
        return Row(base, stage1)
    ivs = []
    for r in rnodes:
        site, heads = _receiver_site(r, lm)
        ivs.append(Intervention(site, positions=pos, heads=heads,
                                value=Ref(base, site, None, tuple(stage1)), source="receiver"))
    return Row(base, ivs)


def path_patch(lm, base_ids, source_ids, specs: Sequence[dict], readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False,
               local: bool = True):
    """Readouts of many sender -> receiver path patches, batched: each spec is a dict of
    :func:`path_patch_row`'s arguments (``senders``, ``receivers``, ``freeze``, ``positions``).
    Context 0 is the base, 1 the source.

    When every spec sends heads or sub-layers to the logits at every position that can differ
    and the readout is the logits or a function of them, the rows are position-local (every attention output from the lowest
    sender up is fixed, so no position reads another) and ``local=True`` computes them by
    :func:`local_logits`: the last position's stream only, no attention; ``local=False`` runs
    the engine's rows. ``naive=True`` runs the engine's reference loop instead: one unbatched
    forward pass per path, each distinct reference (the base and source values it reads) once."""
    rows = [path_patch_row(lm, **spec) for spec in specs]
    contexts = [Context(base_ids, name="base"), Context(source_ids, name="source")]
    if naive:
        return run_naive(lm, contexts, rows, readout, reuse_references=True)
    engine = engine or Engine(lm, contexts, batch_size=batch_size)
    first = _first_difference(engine.contexts[0].input_ids, engine.contexts[1].input_ids)
    if local and not isinstance(readout, Capture) and specs and \
            all(_is_local(lm, s, first, engine.contexts[0].length) for s in specs):
        logits = local_logits(lm, engine, specs, batch_size=max(batch_size, 256))
        return logits if readout in (None, "logits") else readout(logits)
    return engine.run(rows, readout)


def _first_difference(base_ids: torch.Tensor, source_ids: torch.Tensor) -> int:
    """The first position where the two prompts' tokens differ (their length if none)."""
    b, s = base_ids.reshape(-1).cpu(), source_ids.reshape(-1).cpu()
    if b.shape != s.shape:
        return 0
    differ = (b != s).nonzero()
    return int(differ[0]) if len(differ) else len(b)


def _is_local(lm, spec: dict, first: int = 0, length: int | None = None) -> bool:
    """Whether ``spec`` is a sender -> logits patch at every position that can differ:
    ``positions`` None, or covering every position from ``first`` (where base and source
    first differ: nothing before it can change) to the end."""
    receivers = list(spec.get("receivers", ("logits",)))
    positions = spec.get("positions")
    if positions is not None and (length is None or
                                  not set(range(first, length)) <= set(positions)):
        return False
    nodes = [parse_node(s, lm) for s in spec["senders"]]
    return receivers == ["logits"] and all(
        n.kind in ("a", "f") or (n.kind == "head" and n.qkv is None) for n in nodes)


def local_logits(lm, engine: Engine, specs: Sequence[dict], batch_size: int = 256
                 ) -> torch.Tensor:
    """Last-position logits (n_specs, vocab) of sender -> logits path patches, exactly, from
    the last position alone.

    From the lowest sender's layer up, every attention output is fixed: the base run's, or at
    a sender's layer the base heads with the senders' heads from the source (a sender ``a{l}``:
    the source's whole output). Nothing then carries information between positions, so the
    last position's stream is its base value entering the lowest sender's block plus those
    attention outputs, with each MLP recomputed on it (``freeze="attention"``), frozen at the
    base (``"all"``) or from the source (a sender ``f{l}``); then the final norm and the
    unembedding. Cost: one clean capture of each run, then per row an MLP per layer on one
    token. Equal to the engine's rows within float error (``tests/test_path_patching.py``)."""
    spec_arch, model = lm.spec, lm.model
    blocks = spec_arch.blocks(model)
    n_layers = lm.n_layers
    last = engine.contexts[0].length - 1
    kinds = ("resid_pre", "head_out", "attn_add", "mlp_add")
    sites = [site_name(k, l) for l in range(n_layers) for k in kinds]
    base, source = (engine.clean_readout(c, Capture(sites, positions=(last,))) for c in (0, 1))
    plans = []
    for spec in specs:
        freeze = spec.get("freeze", "attention")
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"unknown freeze policy {freeze!r}; use one of {FREEZE_POLICIES}")
        heads, attn, mlp, low = _sender_groups([parse_node(n, lm) for n in spec["senders"]],
                                               n_layers)
        plans.append((low, freeze, heads, attn, mlp))

    def post(norm_path, x, layer):
        return x if norm_path is None else blocks[layer].get_submodule(norm_path)(x)

    out = []
    with torch.no_grad():
        for start in range(0, len(plans), batch_size):
            chunk = plans[start:start + batch_size]
            low = min(p[0] for p in chunk)
            x = base[site_name("resid_pre", low)][0].expand(len(chunk), -1).clone()
            for layer in range(low, n_layers):
                block = blocks[layer]
                active = [i for i, p in enumerate(chunk) if p[0] <= layer]
                if layer > low:   # rows starting here: their base stream entering the block
                    for i, p in enumerate(chunk):
                        if p[0] == layer:
                            x[i] = base[site_name("resid_pre", layer)][0]
                add = base[site_name("attn_add", layer)][0].expand(len(chunk), -1).clone()
                for i in active:
                    _, _, heads, attn, _ = chunk[i]
                    if layer in attn:
                        add[i] = source[site_name("attn_add", layer)][0]
                    elif layer in heads:
                        z = base[site_name("head_out", layer)][0].clone()
                        hs = heads[layer]
                        z[hs] = source[site_name("head_out", layer)][0][hs]
                        o = block.get_submodule(spec_arch.o_proj)(z.reshape(1, -1))
                        add[i] = post(spec_arch.attn_post_norm, o, layer)[0]
                rows = torch.tensor(active, dtype=torch.long)
                x[rows] = x[rows] + add[rows]
                recompute = [i for i in active if chunk[i][1] == "attention"
                             and layer not in chunk[i][4]]
                frozen = [i for i in active if i not in recompute]
                new = x.clone()
                if recompute:
                    r = torch.tensor(recompute, dtype=torch.long)
                    h = block.get_submodule(spec_arch.mlp_norm)(x[r][:, None])
                    m = post(spec_arch.mlp_post_norm, block.get_submodule(spec_arch.mlp)(h),
                             layer)
                    new[r] = x[r] + m[:, 0]
                for i in frozen:
                    run = source if layer in chunk[i][4] else base
                    new[i] = x[i] + run[site_name("mlp_add", layer)][0]
                x = new
            h = model.get_submodule(spec_arch.final_norm_path)(x[:, None])
            logits = model.get_output_embeddings()(h)[:, 0]
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(logits.float())
    return torch.cat(out)


# --- 3. edge patching -----------------------------------------------------------------------------

def _sender_site(node: Node, lm) -> str:
    if node.kind == "emb":
        return site_name("resid_pre", 0)
    if node.kind == "a":
        return site_name("attn_add", node.layer)
    if node.kind == "f":
        return site_name("mlp_add", node.layer)
    if node.kind == "head" and node.qkv is None:
        if lm.spec.attn_post_norm is not None:
            raise ValueError(f"sender {node.name!r}: on {lm.spec.family} a norm after the "
                             "attention output mixes the heads, so one head's contribution to "
                             "the residual stream is not additive; use the layer a<l> as the "
                             "sender (or sender -> receiver path patching)")
        return site_name("head_out", node.layer)
    raise ValueError(f"sender {node.name!r}: use emb, a<l>, f<l> or a head a<l>.h<h>")


def _order(node: Node) -> float:
    """Position of a node in the forward order (senders' outputs, receivers' inputs)."""
    if node.kind == "emb":
        return -1
    if node.kind == "logits":
        return 10 ** 9
    return node.layer + (0.5 if node.kind == "f" else 0.0)


def _head_weight(lm, layer: int, head: int) -> torch.Tensor:
    """(d_head, d_model): head ``head``'s rows of the output projection, z_h @ W."""
    mod = lm.spec.blocks(lm.model)[layer].get_submodule(lm.spec.o_proj)
    dh = lm.d_head
    cols = slice(head * dh, (head + 1) * dh)
    return mod.weight[cols, :] if lm.spec.fused_qkv else mod.weight[:, cols].T


def check_edge(lm, sender: str, receiver: str) -> tuple[Node, Node]:
    s, r = parse_node(sender, lm), parse_node(receiver, lm)
    _sender_site(s, lm)
    _receiver_site(r, lm)
    if _order(s) >= _order(r):
        raise ValueError(f"edge {sender} -> {receiver}: the receiver must read the residual "
                         "stream after the sender writes it")
    return s, r


class _EdgeRow:
    """The function interventions of one edge set: recorders at its senders' output sites
    (this pass's ``current`` value) and adders at its receivers' input sites."""

    def __init__(self, lm, edges, source_out: dict):
        self.lm, self.live = lm, {}
        self.by_receiver: dict[str, list] = {}
        seen = set()
        for sender, receiver in edges:
            s, r = check_edge(lm, sender, receiver)
            site, heads = _receiver_site(r, lm)
            # under grouped-query attention a0.h1 -> a1.h0.k and -> a1.h1.k are one edge
            if (s, site, heads) not in seen:
                seen.add((s, site, heads))
                self.by_receiver.setdefault(site, []).append((s, r))
        self.source_out = source_out

    def _delta(self, s: Node) -> torch.Tensor:
        site = _sender_site(s, self.lm)
        cur, src = self.live[site], self.source_out[site].to(self.live[site].dtype)
        if s.kind == "head":
            w = _head_weight(self.lm, s.layer, s.head).to(cur.dtype)
            return (src[:, :, s.head] - cur[:, :, s.head]) @ w
        return src - cur

    def recorder(self, site):
        def record(x):
            self.live[site] = x
            return x
        return record

    def adder(self, site):
        def add(x):
            x = x.clone()
            for s, r in self.by_receiver[site]:
                delta = self._delta(s)
                if r.kind == "head":
                    h = _receiver_site(r, self.lm)[1][0]
                    x[:, :, h] = x[:, :, h] + delta
                else:
                    x = x + delta
            return x
        return add

    def interventions(self) -> list[Intervention]:
        senders = {}
        for pairs in self.by_receiver.values():
            for s, _ in pairs:
                senders[_sender_site(s, self.lm)] = True
        ivs = [Intervention(site, kind="function", fn=self.recorder(site), source="edge sender")
               for site in senders]
        ivs += [Intervention(site, kind="function", fn=self.adder(site), source="edge receiver")
                for site in self.by_receiver]
        return ivs


def edge_sender_sites(lm, edge_sets) -> list[str]:
    sites = {}
    for edges in edge_sets:
        for sender, receiver in edges:
            s, _ = check_edge(lm, sender, receiver)
            sites[_sender_site(s, lm)] = True
    return list(sites)


def edge_rows(lm, edge_sets, source_out: dict, base: int = 0) -> list[Row]:
    return [Row(base, _EdgeRow(lm, edges, source_out).interventions()) for edges in edge_sets]


def edge_patch(lm, base_ids, source_ids, edge_sets, readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False):
    """Readouts of the base run with each edge set patched (one row per set, batched): every
    edge ``(sender, receiver)`` carries the sender's source-run output instead of its output in
    this pass. The source run's sender outputs are read once."""
    contexts = [Context(base_ids, name="base"), Context(source_ids, name="source")]
    engine = engine or Engine(lm, contexts, batch_size=batch_size)
    edge_sets = [list(e) for e in edge_sets]
    sites = edge_sender_sites(lm, edge_sets)
    source_out = {}
    if sites:
        got = engine.clean_readout(1, Capture(tuple(sites)))
        source_out = {s: v[None] for s, v in got.items()}
    rows = edge_rows(lm, edge_sets, source_out)
    if naive:
        return run_naive(lm, contexts, rows, readout)
    return engine.run(rows, readout)


def node_edges(lm, layers: Sequence[int] | None = None) -> list[tuple[str, str]]:
    """Every edge between whole nodes (emb, a<l>, f<l> -> a<l>, f<l>, logits) of ``layers``."""
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    senders = ["emb"] + [f"{k}{l}" for l in layers for k in "af"]
    receivers = [f"{k}{l}" for l in layers for k in "af"] + ["logits"]
    return [(s, r) for s in senders for r in receivers
            if _order(parse_node(s)) < _order(parse_node(r))]


# --- edge attribution patching ---------------------------------------------------------------------

def eap(lm, base_ids, source_ids, edges, metric: Callable[[torch.Tensor], torch.Tensor]):
    """Edge attribution patching (Syed et al. 2023): for each edge ``(s, r)`` the estimate
    ``(source_out(s) - base_out(s)) . d metric / d input(r)`` at the base run, from one forward
    and one backward pass on the base (plus the source's stored run). Returns ``(scores,
    clean)``; receivers are whole nodes or logits (a head's q/k/v inputs have no gradient
    site here)."""
    contexts = [Context(base_ids, name="base"), Context(source_ids, name="source")]
    engine = Engine(lm, contexts)
    pairs = [check_edge(lm, s, r) for s, r in edges]
    if any(r.kind == "head" for _, r in pairs):
        raise ValueError("eap: receivers must be a<l>, f<l> or logits")
    ssites = list(dict.fromkeys(_sender_site(s, lm) for s, _ in pairs))
    rsites = list(dict.fromkeys(_receiver_site(r, lm)[0] for _, r in pairs))
    src = engine.clean_readout(1, Capture(tuple(ssites)))
    bas = engine.clean_readout(0, Capture(tuple(ssites)))
    leaves = {}

    def probe(site):
        def fn(x):
            leaves[site] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[site]
        return fn
    row = Row(0, [Intervention(s, kind="function", fn=probe(s)) for s in rsites])
    logits = engine.run([row], grad=True)[0]
    value = metric(logits)
    grads = torch.autograd.grad(value, [leaves[s] for s in rsites])
    grad = {s: g[0] for s, g in zip(rsites, grads)}
    scores = []
    with torch.no_grad():
        for s, r in pairs:
            site = _sender_site(s, lm)
            delta = src[site] - bas[site]
            if s.kind == "head":
                delta = delta[:, s.head] @ _head_weight(lm, s.layer, s.head)
            scores.append(float((delta * grad[_receiver_site(r, lm)[0]]).sum()))
    return scores, float(value.detach())


# --- the studies of notebook 07 (JSON-ready payloads) -----------------------------------------------

def _probs(token_ids):
    def readout(logits):
        return logits.float().softmax(-1)[..., token_ids]
    return readout


def capital_study(lm, base_ids, source_ids, tokens: Sequence[str], token_ids: Sequence[int],
                  cumulative_positions: Sequence[int], batch_size: int = 32) -> dict:
    """nano's two experiments: every node x position patch (``records``) and the cumulative
    direct-path patch at ``cumulative_positions`` (``cumulative``), p(token) at the last
    position; one engine for all (distinct lineages computed once)."""
    T = base_ids.shape[1]
    nodes = node_order(lm.n_layers)
    engine = Engine(lm, [Context(base_ids, name="base"), Context(source_ids, name="source")],
                    batch_size=batch_size)
    readout = _probs(list(token_ids))
    cells = [(n, p) for n in nodes for p in range(T)]
    patches = [(lambda path: 0, lambda path: False) if n == "none" else
               node_position_patch(n, p) for n, p in cells]
    out = tree_patch(lm, [base_ids, source_ids], patches, readout, engine=engine)
    records = [{"node": n, "position": p, "token": t, "prob": float(r.readout[j])}
               for (n, p), r in zip(cells, out) for j, t in enumerate(tokens)]
    cum_cells = [(i, p) for p in cumulative_positions for i in range(len(nodes))]
    patches = [cumulative_patch(nodes[1:i + 1], p) for i, p in cum_cells]
    out = tree_patch(lm, [base_ids, source_ids], patches, readout, engine=engine)
    cumulative = [{"node": nodes[i], "position": p, "token": t, "prob": float(r.readout[j])}
                  for (i, p), r in zip(cum_cells, out) for j, t in enumerate(tokens)]
    return {"nodes": nodes, "records": records, "cumulative": cumulative,
            "engine_stats": dict(engine.stats)}


def ioi_head_study(lm, pairs: Sequence[dict], receivers_of: int = 3,
                   batch_size: int = 32, policies: Sequence[str] = FREEZE_POLICIES) -> dict:
    """Wang et al.'s path patching on IOI pairs (from :func:`lib.ioi.aligned_pairs`): every
    head -> logits under each freeze policy (mean change of the logit difference over pairs),
    then every earlier head -> the queries of the ``receivers_of`` heads with the largest
    |change| under the first policy. Patches cover positions from the first one where base and
    source differ (exact: nothing earlier differs)."""
    from lib.ioi import logit_diff

    heads = all_heads(lm)
    sums: dict[tuple, float] = {}
    clean = []

    def run_specs(specs_for):
        for pair in pairs:
            pos = tuple(range(pair["first_diff"], pair["base_ids"].shape[1]))
            specs = specs_for(pos)
            engine = Engine(lm, [Context(pair["base_ids"]), Context(pair["source_ids"])],
                            batch_size=batch_size)
            ld = lambda logits, p=pair: logit_diff(logits, p["io_id"], p["s_id"])  # noqa: E731
            base_ld = float(ld(engine.clean_readout(0)))
            got = path_patch(lm, pair["base_ids"], pair["source_ids"],
                             [s for _, s in specs], ld, engine=engine)
            for (key, _), v in zip(specs, got.tolist()):
                sums[key] = sums.get(key, 0.0) + (v - base_ld) / len(pairs)
            yield base_ld

    clean = list(run_specs(lambda pos: [((h, f, "logits"), dict(senders=[h], freeze=f,
                                                                 positions=pos))
                                        for h in heads for f in policies]))
    to_logits = [{"sender": h, "layer": parse_node(h).layer, "head": parse_node(h).head,
                  "policy": f, "receiver": "logits", "delta": sums[(h, f, "logits")]}
                 for h in heads for f in policies]
    first = [r for r in to_logits if r["policy"] == policies[0]]
    strongest = [r["sender"] for r in sorted(first, key=lambda r: -abs(r["delta"]))
                 if r["layer"] > 0][:receivers_of]
    receivers = [f"{h}.q" for h in strongest]
    list(run_specs(lambda pos: [((h, f, r), dict(senders=[h], receivers=[r], freeze=f,
                                                 positions=pos))
                                for r in receivers for h in heads
                                if parse_node(h).layer < parse_node(r).layer
                                for f in policies]))
    to_queries = [{"sender": h, "layer": parse_node(h).layer, "head": parse_node(h).head,
                   "policy": f, "receiver": r, "delta": sums[(h, f, r)]}
                  for r in receivers for h in heads for f in policies if (h, f, r) in sums]
    diffs = {}
    for f in policies[1:]:
        a = torch.tensor([r["delta"] for r in to_logits if r["policy"] == policies[0]])
        b = torch.tensor([r["delta"] for r in to_logits if r["policy"] == f])
        diffs[f"{policies[0]}_vs_{f}"] = {"max_abs": float((a - b).abs().max()),
                                          "pearson": _corr(a, b)}
    return {"n_pairs": len(pairs), "clean_logit_diff": clean, "to_logits": to_logits,
            "strongest": strongest, "to_queries": to_queries, "policy_difference": diffs}


def eap_study(lm, pair: dict, layers: Sequence[int] | None = None, batch_size: int = 32) -> dict:
    """Exact edge patching of every node-level edge (one row each) beside edge attribution
    patching (one forward and one backward pass), on one IOI pair; Pearson and Spearman."""
    from lib.ioi import logit_diff

    edges = node_edges(lm, layers)
    ld = lambda logits: logit_diff(logits, pair["io_id"], pair["s_id"])  # noqa: E731
    est, clean = eap(lm, pair["base_ids"], pair["source_ids"], edges, ld)
    exact = edge_patch(lm, pair["base_ids"], pair["source_ids"], [[e] for e in edges], ld,
                       batch_size=batch_size) - clean
    a, b = torch.tensor(est), exact.double().float()
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    return {"records": [{"sender": s, "receiver": r, "exact": float(x), "estimate": float(y)}
                        for (s, r), x, y in zip(edges, b.tolist(), a.tolist())],
            "clean_logit_diff": clean,
            "pearson": _corr(a, b), "spearman": _corr(rank(a), rank(b))}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation; None when either side is constant."""
    if len(a) < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return None
    return float(torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1])
