"""Circuits from ranked edges and their faithfulness curves (lib.studies.path_patching.circuits)
on tiny random Llama, Gemma 3 and GPT-2: the curve's ends against the clean and corrupt runs,
the batched curve against the engine's reference loop, hand-computed summaries, the refusals
(before any forward pass), the result kind and the figures."""

import json

import pytest
import torch

from conftest import assert_f32_close
from lib.core.engine import Context, Engine
from lib.studies import path_patching as pp
from lib.studies.ioi import logit_diff, name_token

# short IOI-like pairs: the corruption close to the end, inside Gemma 3's sliding window
PROMPTS = [("Hello world", "Jello wormd"), ("Mary gave it to John", "Mary gave it to Paul"),
           ("the cat sat on", "the dog sat in")]


@pytest.fixture(scope="module")
def pairs(lm):
    out = []
    for base, source in PROMPTS:
        b, s = lm.tokenize(base), lm.tokenize(source)
        assert b.shape == s.shape
        out.append({"base_ids": b, "source_ids": s, "io_id": name_token(lm, "John"),
                    "s_id": name_token(lm, "Paul")})
    return out


def _ld(pair):
    return lambda logits: logit_diff(logits, pair["io_id"], pair["s_id"])


def _engine(lm, pair):
    return Engine(lm, [Context(pair["base_ids"]), Context(pair["source_ids"])])


def _ranking(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()


# --- the curve's ends are the clean and corrupt runs ---------------------------------------------

def test_patching_every_edge_is_the_corrupt_run(lm, pairs):
    """Every receiver's input is the sum of its senders' outputs, so with every node-level edge
    patched each receiver reads the corrupt run's residual stream: the whole output is the
    corrupt run's (Gemma 3 too: its post-norms sit inside the sub-layers' outputs, which are
    the senders)."""
    edges = pp.node_edges(lm)
    for pair in pairs:
        [got] = pp.edge_patch(lm, pair["base_ids"], pair["source_ids"], [edges])
        assert_f32_close(got, _engine(lm, pair).clean_readout(1))


def test_patching_no_edge_is_the_clean_run_bit_for_bit(lm, pairs):
    """An empty edge set is a row without interventions: the engine gives it the clean run's
    stored readout (copied, not recomputed), so equality is exact."""
    for pair in pairs:
        [got] = pp.edge_patch(lm, pair["base_ids"], pair["source_ids"], [[]], _ld(pair))
        assert torch.equal(got, _engine(lm, pair).clean_readout(0, _ld(pair)))


def test_keep_and_remove_curves_run_from_corrupt_to_clean_and_back(lm, pairs):
    edges = pp.node_edges(lm)
    ranking = _ranking(len(edges))
    ks = pp.k_grid(len(edges), 6)
    keep = pp.faithfulness_curve(lm, pairs, edges, ranking, ks, "keep", progress=False)
    remove = pp.faithfulness_curve(lm, pairs, edges, ranking, ks, "remove", progress=False)
    for curve, everything, nothing in ((keep, 0, -1), (remove, -1, 0)):
        assert curve["ks"] == ks and curve["n_pairs"] == len(pairs)
        assert curve["n_edges"] == len(edges)
        # every edge patched: the corrupt run (another computation: within tolerance)
        assert_f32_close([row[everything] for row in curve["ld"]], curve["corrupt_ld"])
        assert abs(curve["faithfulness"][everything]) < 1e-4
        # no edge patched: the clean run itself, so faithfulness is exactly 1
        assert [row[nothing] for row in curve["ld"]] == curve["clean_ld"]
        assert curve["faithfulness"][nothing] == 1.0
        for f, low, high in zip(curve["faithfulness"], curve["ci_low"], curve["ci_high"]):
            assert low is not None and high is not None and low - 1e-9 <= f <= high + 1e-9
    # the mirror: at each k, remove patches exactly the edges keep leaves clean
    for k, kept, removed in zip(ks, pp.patched_sets(edges, ranking, ks, "keep"),
                                pp.patched_sets(edges, ranking, ks, "remove")):
        assert set(removed) == set(pp.circuit_at(edges, ranking, k))
        assert set(kept) | set(removed) == set(edges) and not set(kept) & set(removed)


def test_the_batched_curve_equals_the_reference_loop(lm, pairs):
    edges = pp.node_edges(lm)
    ranking = _ranking(len(edges), seed=1)
    ks = pp.k_grid(len(edges), 8)
    for direction in pp.DIRECTIONS:
        curve = pp.faithfulness_curve(lm, pairs, edges, ranking, ks, direction, batch_size=3,
                                      progress=False)
        sets = pp.patched_sets(edges, ranking, ks, direction)
        for pair, got in zip(pairs, curve["ld"]):
            naive = pp.edge_patch(lm, pair["base_ids"], pair["source_ids"], sets, _ld(pair),
                                  naive=True)
            assert_f32_close(got, naive)


def test_faithfulness_is_a_ratio_of_means_over_pairs(llama):
    pairs = [{"base_ids": llama.tokenize(b), "source_ids": llama.tokenize(s), "io_id": 74,
              "s_id": 80} for b, s in PROMPTS]
    edges = pp.node_edges(llama)
    curve = pp.faithfulness_curve(llama, pairs, edges, _ranking(len(edges)), [0, 3, 15],
                                  progress=False)
    c, r = torch.tensor(curve["clean_ld"]), torch.tensor(curve["corrupt_ld"])
    x = torch.tensor(curve["ld"])
    want = (x - r[:, None]).mean(0) / (c - r).mean()
    assert_f32_close(curve["faithfulness"], want)
    assert curve["clean_ld_mean"] == pytest.approx(float(c.mean()))


# --- rankings, grids and summaries ------------------------------------------------------------------

def test_circuits_rank_by_absolute_score_ties_in_edge_order():
    edges = [("emb", "a0"), ("emb", "f0"), ("a0", "f0"), ("emb", "logits")]
    ranking = [0.5, -2.0, 0.5, 1.0]
    assert pp.edge_order(ranking) == [1, 3, 0, 2]
    assert pp.circuit_at(edges, ranking, 3) == [("emb", "f0"), ("emb", "logits"), ("emb", "a0")]
    assert pp.circuit_at(edges, ranking, 0) == []
    assert pp.patched_sets(edges, ranking, [1], "keep") == [[edges[0], edges[2], edges[3]]]
    assert pp.patched_sets(edges, ranking, [1], "remove") == [[edges[1]]]


@pytest.mark.parametrize("n_edges", [1, 2, 5, 24, 25, 26, 100, 1891])
def test_k_grid_is_distinct_increasing_and_log_spaced(n_edges):
    grid = pp.k_grid(n_edges)
    assert grid[0] == 0 and grid[-1] == n_edges
    assert all(b > a for a, b in zip(grid, grid[1:]))
    assert len(grid) == min(25, n_edges + 1)
    assert all(isinstance(k, int) for k in grid)
    if n_edges == 1891:   # geometric: later steps are ratios, not differences
        ratios = [b / a for a, b in zip(grid[8:], grid[9:])]
        assert max(ratios) / min(ratios) < 1.1
    assert pp.k_grid(n_edges, 2) == [0, n_edges]
    with pytest.raises(ValueError, match="n_points"):
        pp.k_grid(n_edges, 1)
    with pytest.raises(ValueError, match="n_edges"):
        pp.k_grid(0)


def test_curve_summary_on_a_hand_made_curve():
    keep = {"ks": [0, 1, 2, 4], "faithfulness": [0.0, 0.5, 0.85, 1.0], "n_edges": 4,
            "direction": "keep"}
    got = pp.curve_summary(keep)
    # x = 0, .25, .5, 1: (0 + .5)/2 * .25 + (.5 + .85)/2 * .25 + (.85 + 1)/2 * .5
    assert got["cpr"] == pytest.approx(0.0625 + 0.16875 + 0.4625)
    # |1 - f| = 1, .5, .15, 0: (1 + .5)/2 * .25 + (.5 + .15)/2 * .25 + .15/2 * .5
    assert got["cmd"] == pytest.approx(0.1875 + 0.08125 + 0.0375)
    assert (got["k_80"], got["k_90"]) == (2, 4)
    remove = dict(keep, faithfulness=[1.0, 0.5, 0.15, 0.05], direction="remove")
    got = pp.curve_summary(remove)
    assert (got["k_80"], got["k_90"]) == (2, 4)
    assert got["cpr"] == pytest.approx((1.5 / 2 + .65 / 2) * .25 + .2 / 2 * .5)
    never = pp.curve_summary(dict(keep, faithfulness=[0.0, 0.1, 0.2, 0.85]))
    assert (never["k_80"], never["k_90"]) == (4, None)
    with pytest.raises(ValueError, match="increase"):
        pp.curve_summary(dict(keep, ks=[0, 2, 1, 4]))


# --- refusals, before any forward pass ----------------------------------------------------------------

@pytest.fixture
def no_forward(llama, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was checked")
    monkeypatch.setattr(llama.model, "forward", fail)
    return llama


BAD = [
    ("edges", dict(edges=[("emb", "a0"), ("a7", "logits")]), r"edges: a7 -> logits"),
    ("edges order", dict(edges=[("f1", "a0")]), r"edges: f1 -> a0"),
    ("edges twice", dict(edges=[("emb", "a0"), ("emb", "a0")]), "given twice"),
    ("k < 0", dict(ks=[0, -1]), "ks: circuit size -1"),
    ("k > n", dict(ks=[0, 16]), "ks: circuit size 16"),
    ("ranking length", dict(ranking=[1.0] * 14), "ranking has 14 scores"),
    ("ranking nan", dict(ranking=[1.0] * 14 + [float("nan")]), "non-finite"),
    ("direction", dict(direction="ablate"), "direction must be one of"),
    ("empty pairs", dict(pairs=[]), "pairs is empty"),
    ("pair keys", dict(pairs=[{"base_ids": torch.ones(1, 3)}]), r"pairs\[0\] lacks"),
]


@pytest.mark.parametrize("case, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_any_forward_pass(no_forward, case, change, message):
    lm = no_forward
    ids = torch.tensor([[72, 101, 108, 108]])
    args = dict(pairs=[{"base_ids": ids, "source_ids": ids + 1, "io_id": 1, "s_id": 2}],
                edges=pp.node_edges(lm), ranking=[1.0] * 15, ks=[0, 15], direction="keep")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        pp.faithfulness_curve(lm, args["pairs"], args["edges"], args["ranking"], args["ks"],
                              args["direction"], progress=False)
    if case.startswith(("ranking", "edges", "direction", "empty")):
        rankings = {"eap": args["ranking"]}
        with pytest.raises(ValueError, match=message):
            pp.circuit_study(lm, args["pairs"], args["edges"], rankings,
                             directions=(args["direction"],), progress=False)


def test_circuit_at_refuses_a_size_outside_the_graph():
    edges = [("emb", "a0"), ("emb", "f0")]
    with pytest.raises(ValueError, match="ks: circuit size 3"):
        pp.circuit_at(edges, [1.0, 2.0], 3)
    with pytest.raises(ValueError, match="ranking has 1 scores"):
        pp.circuit_at(edges, [1.0], 1)


# --- the result kind and the figures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(llama):
    pairs = [{"base_ids": llama.tokenize(b), "source_ids": llama.tokenize(s), "io_id": 74,
              "s_id": 80} for b, s in PROMPTS]
    edges = pp.node_edges(llama)
    rankings = {"eap": _ranking(len(edges)), "exact": _ranking(len(edges), seed=2)}
    return pp.circuit_study(llama, pairs, edges, rankings, n_points=6, exact_pairs=2,
                            progress=False)


def test_the_kind_accepts_circuit_study_and_refuses_lengths_that_disagree(study):
    payload = json.loads(json.dumps(study))
    pp.CIRCUIT_SCHEMA(payload)
    assert len(payload["curves"]) == 4 and payload["exact_pairs"] == 2
    assert {(c["ranking"], c["direction"]) for c in payload["curves"]} == {
        (r, d) for r in ("eap", "exact") for d in ("keep", "remove")}
    assert set(payload["curves"][0]["summary"]) == {"k_80", "k_90", "cpr", "cmd"}
    payload["rankings"]["eap"].pop()
    with pytest.raises(ValueError, match="ranking 'eap' has 14 scores for 15 edges"):
        pp.CIRCUIT_SCHEMA(payload)


def test_plots_return_figures(study):
    import matplotlib
    matplotlib.use("Agg")
    from lib.plots import circuits as cp

    fig = cp.faithfulness_plot(study["curves"], "tiny llama")
    fig.draw()
    edges = pp.circuit_at(study["edges"], study["rankings"]["eap"], 6)
    scores = sorted(study["rankings"]["eap"], key=lambda v: -abs(v))[:6]
    for s in (None, scores):
        g = cp.circuit_graph(edges, "top 6 edges", scores=s)
        assert g.axes


def test_smallest_circuit_picks_the_first_ranking_reaching_the_threshold():
    edges = [["emb", "a0"], ["a0", "logits"], ["emb", "logits"]]
    curve = lambda name, k80: {"ranking": name, "direction": "keep",  # noqa: E731
                                "summary": {"k_80": k80, "k_90": None}}
    payload = {"edges": edges, "rankings": {"a": [0.1, -3.0, 2.0], "b": [5.0, 0.0, 1.0]},
               "curves": [curve("a", 2), curve("b", 1),
                          {"ranking": "a", "direction": "remove",
                           "summary": {"k_80": 0, "k_90": 0}}]}
    best = pp.smallest_circuit(payload, 0.8)
    assert best == {"ranking": "b", "k": 1, "edges": [["emb", "a0"]], "scores": [5.0]}
    assert pp.smallest_circuit(payload, 0.9) is None
    with pytest.raises(ValueError, match="threshold"):
        pp.smallest_circuit(payload, 0.7)


def test_area_intervals_and_paired_differences():
    """Identical pairs: every resample is the curve itself, so the intervals collapse to the
    areas of curve_summary; a curve against itself differs by exactly 0; mismatched curves are
    refused."""
    ks = [0, 1, 2, 4]
    faith = [0.0, 0.5, 0.75, 1.0]
    curve = {"ks": ks, "n_edges": 4, "direction": "keep", "faithfulness": faith,
             "clean_ld": [2.0] * 5, "corrupt_ld": [0.0] * 5,
             "ld": [[2.0 * f for f in faith]] * 5}
    summary = pp.curve_summary(curve)
    got = pp.area_intervals(curve)
    assert got["cpr"] == pytest.approx([summary["cpr"]] * 2)
    assert got["cmd"] == pytest.approx([summary["cmd"]] * 2)
    assert pp.area_difference(curve, curve) == {"cpr": [0.0, 0.0], "cmd": [0.0, 0.0]}
    with pytest.raises(ValueError, match="share their pairs and ks"):
        pp.area_difference(curve, {**curve, "ks": [0, 1, 3, 4]})
