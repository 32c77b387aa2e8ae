"""Tree patching (nano-causal-interventions, A. Arora 2023; Goldowsky-Dill et al. 2023):
``branch(path)`` and ``which(path)`` become engine runs whose inputs reference the runs of their
sub-trees, each distinct lineage computed once; see :mod:`lib.studies.path_patching`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lib.core.engine import Context, Engine, Ref, Row, run_naive
from lib.core.interventions import Intervention
from lib.core.hooks import n_kv_heads
from lib.studies.path_patching.nodes import Lineage
from lib.core.sites import site_name


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
    def __init__(self, lm, n_inputs: int, length: int, which, branch, allow_noop: bool = False):
        self.lm, self.n_inputs, self.length = lm, n_inputs, length
        self.which, self.branch, self.allow_noop = which, branch, allow_noop
        self.clean: dict[int, _Run] = {}   # input index -> _Run
        self.memo: dict[tuple, _Run] = {}

    def _clean(self, k) -> _Run:
        # any integer type (numpy's too), never a bool
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) \
                or not 0 <= int(k) < self.n_inputs:
            raise ValueError(f"which(path) returned {k!r}; it must be an input index 0 to "
                             f"{self.n_inputs - 1}")
        return self.clean.setdefault(int(k), _Run(int(k)))

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
            self._check_unsplit_head(path, name)
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
            children = []
            groups: dict[int, tuple[_Run, list[int]]] = {}
            for p in range(self.length):
                lin_p, run_p = self.request(below, hpath + [f"{head}.pos{p}"])
                children.append(Lineage(f"{head}.pos{p}", (lin_p,)))
                groups.setdefault(id(run_p), (run_p, []))[1].append(p)
            for run_p, ps in groups.values():
                if run_p is not run_r:
                    ivs.append(Intervention(site, positions=tuple(ps),
                                            value=self._ref(run_p, read),
                                            source="tree"))
        else:
            lin_s, run_s = self.request(below, hpath)
            children = [lin_s]
            if run_s is not run_r:
                site = site_name("attn_norm_in" if kind == "a" else "mlp_norm_in", layer)
                read = site_name("resid_pre", layer) if kind == "a" else site
                ivs.append(Intervention(site,
                                        value=self._ref(run_s, read),
                                        source="tree"))
        lineage = Lineage(name, (Lineage(f"{name}.resid", (lin_r,)),
                                 Lineage(head, tuple(children))))
        if not ivs:
            return lineage, run_r
        key = lineage
        if key not in self.memo:
            self.memo[key] = _Run(run_r.context, run_r.ivs + tuple(ivs))
        return lineage, self.memo[key]

    def _check_unsplit_head(self, path: list[str], name: str) -> None:
        """Refuse a ``branch`` that asks to split ``name``'s sub-layer input (``"positions"``
        or ``"heads"`` at ``name.head``) while leaving ``name`` itself unsplit: the head is
        then never visited, so the request would silently change nothing."""
        if self.allow_noop:
            return
        how = self.branch(path + [f"{name}.head"])
        if isinstance(how, str) and how in ("positions", "heads"):
            raise ValueError(
                f"branch(path) returns {how!r} at {name}.head but is falsy at {name} itself "
                f"(path {path}), so {name} is not split and its head is never visited: the "
                f"{how} request would change nothing. Return True at {name} too (nano's "
                "node_position_patch does), or pass allow_noop=True")

    def _heads(self, layer: int, below, hpath, run_r):
        lm = self.lm
        n_kv = n_kv_heads(lm)
        group = lm.n_heads // n_kv
        children = []
        runs: dict[str, list[_Run]] = {"q": [], "k": [], "v": []}
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
            groups: dict[int, tuple[_Run, list[int]]] = {}
            for h, run in enumerate(per):
                if run is not run_r:
                    groups.setdefault(id(run), (run, []))[1].append(h)
            for run, hs in groups.values():
                ivs.append(Intervention(site, heads=tuple(hs),
                                        value=self._ref(run, site),
                                        source="tree"))
        return children, ivs

    def build(self) -> tuple[Lineage, _Run]:
        lin, run = self.request(("f", self.lm.n_layers - 1), ["ln_final"])
        return Lineage("ln_final", (lin,)), run


def tree_rows(lm, n_inputs: int, length: int, patches: Sequence[tuple[Callable, Callable]],
              allow_noop: bool = False) -> tuple[list[Row], list[Lineage]]:
    """Engine rows and lineage trees of ``patches``, a list of ``(which, branch)`` pairs. A
    patch that is the plain base run (``which`` chose input 0 on every path), and a ``branch``
    that asks for ``"positions"`` or ``"heads"`` at ``X.head`` of a node ``X`` it leaves unsplit
    (a request that would be silently ignored), are refused unless ``allow_noop``: either is
    almost always a node name spelled otherwise than here."""
    rows, lineages = [], []
    for i, (which, branch) in enumerate(patches):
        lin, run = _TreeBuilder(lm, n_inputs, length, which, branch, allow_noop).build()
        if run.context == 0 and not run.ivs and not allow_noop:
            raise ValueError(
                f"tree patch {i} changes nothing: which(path) chose input 0 (the base) on every "
                "path. Paths name nodes emb, a<l>, f<l>, a<l>.head, a<l>.h<h>, "
                "a<l>.h<h>.q/.k/.v and a<l>.head.pos<p> (nano-causal-interventions' a<l>.head<h> "
                "is a<l>.h<h> here); check the names your which and branch compare with")
        rows.append(Row(run.context, run.ivs))
        lineages.append(lin)
    return rows, lineages


def tree_patch(lm, inputs: Sequence[torch.Tensor], patches, readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False,
               allow_noop: bool = False) -> list[TreePatch]:
    """Run tree patches on ``inputs`` (token ids, all of one length): ``patches`` is one
    ``(which, branch)`` pair or a list of them, run batched on one engine (distinct lineages
    computed once over all of them). ``readout`` as :meth:`lib.core.engine.Engine.run` (last-position
    logits by default). ``naive=True`` runs the engine's reference loop instead; a patch that
    changes nothing is refused unless ``allow_noop`` (:func:`tree_rows`)."""
    if isinstance(patches, tuple) and len(patches) == 2 and callable(patches[0]):
        patches = [patches]
    inputs = [torch.as_tensor(x).reshape(1, -1) for x in inputs]
    lengths = {x.shape[1] for x in inputs}
    if len(lengths) != 1:
        raise ValueError(f"tree patching needs inputs of one length (positions are aligned); "
                         f"got lengths {[x.shape[1] for x in inputs]}")
    rows, lineages = tree_rows(lm, len(inputs), lengths.pop(), patches, allow_noop)
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
