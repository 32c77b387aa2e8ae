"""Figures of circuit discovery (notebook 07): faithfulness curves of ranked-edge circuits
(:func:`lib.studies.path_patching.faithfulness_curve`) and one circuit drawn as a layered graph
(networkx positions, matplotlib drawing; no graphviz). Plot functions return a figure; the
notebook shows it and saves it with :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lib.studies.path_patching.nodes import parse_node

#: the faithfulness levels marked on the curves (dashed lines)
LEVELS = (0.8, 0.9, 1.0)


def _curve_frame(curves: Sequence[Mapping]):
    """One row per (curve, k): ranking, direction, k, k + 1, faithfulness and its interval."""
    import pandas as pd

    rows = []
    for c in curves:
        for k, f, low, high in zip(c["ks"], c["faithfulness"], c["ci_low"], c["ci_high"]):
            rows.append({"ranking": c["ranking"], "direction": c["direction"], "k": k,
                         "k_plus_1": k + 1, "faithfulness": f,
                         "ci_low": float("nan") if low is None else low,
                         "ci_high": float("nan") if high is None else high})
    return pd.DataFrame(rows)


def faithfulness_plot(curves: Sequence[Mapping], title: str = ""):
    """Faithfulness against circuit size, one colour per ranking, one facet (and line type) per
    direction ("keep": the circuit clean, the rest corrupt; "remove": the circuit corrupt),
    95 % bootstrap ribbons, dashed lines at 0.8, 0.9 and 1. The x axis is log-scaled and shows
    k + 1 (k = 0, the empty circuit, sits at 1)."""
    from plotnine import (aes, facet_wrap, geom_hline, geom_line, geom_point, geom_ribbon,
                          ggplot, labs, scale_x_log10, theme_bw)

    df = _curve_frame(curves)
    return (ggplot(df, aes("k_plus_1", "faithfulness", colour="ranking", fill="ranking"))
            + geom_ribbon(aes(ymin="ci_low", ymax="ci_high"), alpha=0.2, colour="none")
            + geom_line(aes(linetype="direction")) + geom_point(size=0.8)
            + geom_hline(yintercept=list(LEVELS), linetype="dashed", colour="grey", size=0.4)
            + facet_wrap("~direction") + scale_x_log10()
            + labs(x="circuit size k + 1 (edges, log scale)", y="faithfulness", title=title)
            + theme_bw())


def _position(name: str, n_layers: int) -> tuple[float, float]:
    """Fixed place of a node: height by forward order (emb at the bottom, a<l> then f<l> per
    layer, logits on top), attention to the left, MLPs to the right, heads spread further
    left (their q/k/v inputs slightly below the head)."""
    node = parse_node(name)
    if node.kind == "emb":
        return 0.0, 0.0
    if node.kind == "logits":
        return 0.0, 2.0 * n_layers + 1
    assert node.layer is not None   # every other node has a layer
    if node.kind == "f":
        return 1.0, 2.0 * node.layer + 2
    if node.kind == "a":
        return -1.0, 2.0 * node.layer + 1
    assert node.head is not None
    drop = {"q": 0.45, "k": 0.3, "v": 0.15}.get(node.qkv or "", 0.0)
    return -2.0 - 0.6 * node.head, 2.0 * node.layer + 1 - drop


def circuit_graph(edges: Sequence[Sequence[str]], title: str = "",
                  scores: Sequence[float] | None = None):
    """The circuit ``edges`` (sender, receiver) as a layered graph with fixed positions (not a
    spring layout): emb at the bottom, logits at the top, a<l> and f<l> by layer. With
    ``scores`` (one per edge) an edge's width grows with |score| and its colour is its sign
    (red positive, blue negative)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx

    if scores is not None and len(scores) != len(edges):
        raise ValueError(f"scores has {len(scores)} values for {len(edges)} edges")
    g = nx.DiGraph()
    g.add_edges_from((s, r) for s, r in edges)
    layers = [parse_node(n).layer for n in g.nodes]
    n_layers = max([layer for layer in layers if layer is not None], default=-1) + 1
    pos = {n: _position(n, n_layers) for n in g.nodes}
    fig, ax = plt.subplots(figsize=(6, max(4.0, 0.45 * (2 * n_layers + 2))))
    ordered = [(s, r) for s, r in edges]
    if scores is None:
        widths: list[float] = [1.0] * len(ordered)
        colours = ["#555555"] * len(ordered)
    else:
        top = max(abs(float(v)) for v in scores) or 1.0
        widths = [0.5 + 3.0 * abs(float(v)) / top for v in scores]
        colours = ["#b2182b" if float(v) >= 0 else "#2166ac" for v in scores]
    nx.draw_networkx_edges(g, pos, edgelist=ordered, width=widths, edge_color=colours, ax=ax,
                           arrows=True, arrowsize=8, connectionstyle="arc3,rad=0.15",
                           node_size=500)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=500, node_shape="s", node_color="#d7e3f4")
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=6)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    plt.close(fig)
    return fig


def circuit_table(payload: Mapping):
    """One row per ranking and direction of a circuit study: the smallest k reaching 80 % and
    90 % (for "remove": leaving at most 20 % / 10 %), CPR and CMD with their 95 % intervals
    over pairs (:func:`lib.studies.path_patching.circuits.area_intervals`; a DataFrame)."""
    import pandas as pd

    from lib.studies.path_patching.circuits import area_difference, area_intervals

    n = len(payload["edges"])
    # each direction's first ranking is the reference of the paired CPR differences
    first = {c["direction"]: c for c in reversed(payload["curves"])}
    rows = []
    for c in payload["curves"]:
        ci = area_intervals(c)
        base = first[c["direction"]]
        diff = area_difference(c, base)["cpr"] if base is not c else None
        rows.append({"ranking": c["ranking"], "direction": c["direction"],
                     "k 80 %": c["summary"]["k_80"], "k 90 %": c["summary"]["k_90"],
                     "CPR": c["summary"]["cpr"], "CPR 95 %": "{:.3f}–{:.3f}".format(*ci["cpr"]),
                     "CMD": c["summary"]["cmd"], "CMD 95 %": "{:.3f}–{:.3f}".format(*ci["cmd"]),
                     f"CPR − {base['ranking']} (paired 95 %)":
                         "" if diff is None else "{:+.3f} to {:+.3f}".format(*diff),
                     "edges": n, "pairs": c["n_pairs"]})
    return pd.DataFrame(rows).round(3)
