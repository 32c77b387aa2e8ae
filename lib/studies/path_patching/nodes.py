"""Path patching's node vocabulary (``emb``, ``a{l}``, ``f{l}``, heads and their q/k/v inputs,
``logits``) and the lineage tree's nodes; see :mod:`lib.studies.path_patching`.
"""

from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import dataclass

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


def check_tree_node(name: str, lm, parameter: str = "node") -> Node:
    """A node of the tree-patching vocabulary that ``lm`` has (``logits`` is a receiver, not a
    tree node); a clear error naming ``parameter`` otherwise."""
    try:
        node = parse_node(name, lm)
    except ValueError as err:
        raise ValueError(f"{parameter}: {err}") from None
    if node.kind == "logits":
        raise ValueError(f"{parameter}: logits is no node of the tree; use emb, a<l>, f<l> or "
                         "a head")
    return node
