"""DAS on a language model (lib.studies.das.arithmetic_das) on tiny random Llama and Gemma 3: the stored
residual streams equal a captured forward pass, the suffix runner from block l equals the full
model, rotated interventions through it (shared over positions and per position) equal
lib.core.engine's reference loop with the same function intervention, the full-dimension swap gives
the source's prediction, and a training run returns what the notebook stores."""

import pytest
import torch

from conftest import F32_ATOL
from lib.studies.das import arithmetic as ar
from lib.studies import das
from lib.studies.das import arithmetic_das as da
from lib.core import engine
from lib.core.engine import Context, Row, run_naive
from lib.core.hooks import run_with_cache
from lib.core.models import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-gemma3"])
def tuned(request):
    lm = load_model(request.param)
    ar.attach_classifier(lm, seed=0)
    tokens = ar.task_tokens(lm.tokenizer, "padded")
    return lm, tokens


def test_stored_states_equal_a_captured_forward(tuned):
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0, 1], chunk=300)
    assert states[0].shape == (1000, tokens.length, lm.d_model)
    ids = tokens.input_ids[[0, 457, 999]]
    _, cache = run_with_cache(lm, ids, ["blocks.0.resid_post", "blocks.1.resid_post"])
    for l in (0, 1):
        assert torch.allclose(states[l][[0, 457, 999]], cache[f"blocks.{l}.resid_post"],
                              atol=F32_ATOL)


def test_lazy_states_compute_once_on_first_use(tuned):
    lm, tokens = tuned
    lazy = da.LazyStates(lm, tokens, [1, 0])
    assert not lazy.computed and list(lazy) == [1, 0] and len(lazy) == 2
    eager = da.residual_states(lm, tokens, [0, 1])
    assert torch.equal(lazy[0], eager[0]) and lazy.computed
    assert lazy[1] is lazy[1]   # stored, not recomputed
    with pytest.raises(KeyError, match="not one of the stored layers"):
        lazy[2]


def test_suffix_from_every_layer_equals_the_full_model(tuned):
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0, 1])
    full = ar.class_logits(lm, tokens.input_ids[:50])
    for l in (0, 1):
        got = da.run_from(lm, l, states[l][:50])
        assert got.shape == (50, ar.N_CLASSES)
        assert torch.allclose(got, full, atol=1e-4)


@pytest.mark.parametrize("positions", [None, (9,), (1, 2, 9)])
def test_rotation_through_the_suffix_equals_the_engine_reference(tuned, positions):
    lm, tokens = tuned
    layer = 0
    states = da.residual_states(lm, tokens, [layer])[layer]
    module = da.AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, 8, seed=3),
                            positions)
    base, source = torch.tensor([0, 457, 999]), torch.tensor([12, 3, 640])
    data = da.StateInterchange(states, base, source, torch.zeros(3, dtype=torch.long))
    b, srcs, masks, _ = data.batch(torch.arange(3))
    with torch.no_grad():
        ours = da.run_from(lm, layer, module(b, srcs, masks))
    contexts = [Context(tokens.input_ids[int(i)]) for i in base]
    rows = []
    for r, s in enumerate(source):
        src = states[int(s)][None]
        iv = das.hooks_intervention(module.inner, f"blocks.{layer}.resid_post",
                                    src if positions is None else src[:, list(positions)],
                                    positions=positions)
        rows.append(Row(r, [iv]))
    ref = run_naive(lm, contexts, rows)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_full_dimension_swap_gives_the_source_prediction(tuned):
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [1])[1]
    preds = da.predictions(lm, tokens)
    pairs = ar.counterfactual_pairs(ar.causal_model(7), 300, seed=0)
    out = da.full_swap_check(lm, 1, states, pairs, preds)
    assert out["iia"] == pytest.approx(out["source_prediction_is_label"])
    pairs1 = ar.counterfactual_pairs(ar.causal_model(1), 300, seed=0)
    out1 = da.full_swap_check(lm, 1, states, pairs1, preds)
    assert out1["iia"] == pytest.approx(out1["source_prediction_is_label"])
    # M7's counterfactual label is the source's own sum
    assert out["source_sum_is_label"] == 1.0 and out1["source_sum_is_label"] < 1.0


def test_das_run_trains_and_reports(tuned):
    lm, tokens = tuned
    split = ar.split_arrangements(0)
    states = da.residual_states(lm, tokens, [0])[0]
    m1_train = ar.causal_model(1, split["train"])
    m1_test = ar.causal_model(1, split["test"])
    train = ar.counterfactual_pairs(m1_train, 256, seed=1)
    test = ar.counterfactual_pairs(m1_test, 128, seed=2)
    module, res = da.das_run(lm, 0, 4, states, train, test, positions=(9,), epochs=2,
                             batch_size=64, lr=0.01, seed=0)
    assert res["steps"] == 8 and len(res["curve"]) == 2
    assert 0 <= res["iia"] <= 1 and 0 <= res["control_iia"] <= 1
    assert res["orthogonality_error"] < 1e-4
    assert res["trainable_parameters"] > 0 and res["positions"] == [9]
    other = da.iia_on(lm, 0, module, states,
                      ar.counterfactual_pairs(ar.causal_model(2, split["test"]), 64, seed=3))
    assert 0 <= other <= 1


def test_gpt2_and_bad_layers_are_refused():
    gpt2 = load_model("tiny-random-gpt2")
    with pytest.raises(ValueError, match="not exact"):
        da.head_at(gpt2, 0)
    llama = load_model("tiny-random-llama")
    with pytest.raises(ValueError, match="layer must be"):
        da.head_at(llama, 2)


def test_pairwise_graph_cells_are_the_right_pairs(tuned):
    """Would have caught the thesis' bug (column j written instead of i + 1 + j): every cell,
    also those with i + j >= n - 1, is checked against the two counterfactuals of its own
    pair, and the matrix is symmetric with a zero diagonal."""
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0])[0]
    pool = [0, 5, 17, 123, 456, 640, 777, 901, 999, 333]
    module = da.AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, 8, seed=1))
    model = ar.causal_model(1)
    W = da.pairwise_iia(lm, 0, module, states, model, pool, batch_size=7)
    n = len(pool)
    assert W.shape == (n, n) and torch.equal(W, W.T) and torch.all(W.diagonal() == 0)
    assert set(W.flatten().tolist()) <= {0.0, 0.5, 1.0}
    xyz = ar.arrangement_tensor()
    head = da.head_at(lm, 0)
    for a in range(n):
        for b in range(a + 1, n):
            hits = []
            for base, src in ((pool[a], pool[b]), (pool[b], pool[a])):
                label = ar.label_of(xyz[src][0], xyz[src][1], xyz[base][2])   # M1: X_s + Y_s + Z_b
                with torch.no_grad():
                    pred = head(module(states[[base]], [states[[src]]],
                                       torch.ones(1, 1, dtype=torch.bool))).argmax(-1)
                hits.append(float(pred == label))
            assert W[a, b] == sum(hits) / 2, (a, b)
    summary = da.graph_summary(W, min_clique=2)
    assert summary["n"] == n and abs(sum(summary["fraction"].values()) - 1) < 1e-6
    for clique in summary["cliques"]:
        assert all(W[u, v] == 1 for u in clique for v in clique if u != v)


def test_graph_summary_finds_planted_cliques():
    W = torch.full((12, 12), 0.5)
    for block in (range(0, 6), range(6, 11)):
        for u in block:
            for v in block:
                W[u, v] = 1.0
    W.fill_diagonal_(0)
    s = da.graph_summary(W)
    assert sorted(s["clique_sizes"]) == [5, 6] and s["nodes_in_cliques"] == 11
    assert s["fraction_of_edges_in_cliques"] == 1.0


def test_graph_intervals_resample_nodes_without_self_pairs():
    # every off-diagonal weight is 1: a resample that paired a node with its own copy would
    # read the zero diagonal and fall below 1
    W = torch.ones(10, 10)
    W.fill_diagonal_(0)
    got = da.graph_intervals(W, n_resamples=200, seed=0)
    assert got["mean_weight_ci"] == [1.0, 1.0] and got["fraction_weight1_ci"] == [1.0, 1.0]
    # two halves of weight-1 edges, 0 between them: the full mean lies inside the interval,
    # which is wide because resampling nodes changes the halves' sizes
    W = torch.zeros(20, 20)
    W[:10, :10] = 1
    W[10:, 10:] = 1
    W.fill_diagonal_(0)
    mean = float(W[~torch.eye(20, dtype=torch.bool)].mean())
    got = da.graph_intervals(W, n_resamples=500, seed=1)
    low, high = got["mean_weight_ci"]
    assert low < mean < high and high - low > 0.02
    assert got["fraction_weight1_ci"] == got["mean_weight_ci"]  # weights are 0 or 1 only


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-gemma3"])
def test_stream_continues_from_a_shared_prefix(arch):
    """lib.core.engine.run_stream: blocks above layer l run on a prefix once (keys and values kept)
    and then on the later positions of several runs continuing it (rows mapping runs to
    prefixes) equal one run of the whole stream, at every layer of a 6-block model; a prefix
    longer than a sliding window keeps whole is refused."""
    from lib.core import engine, models

    torch.manual_seed(0)
    model, tokenizer, source = models._build_tiny(arch, 0, n_layers=6)
    lm = models._describe(arch, model.eval().requires_grad_(False), tokenizer,
                          torch.device("cpu"), torch.float32, source)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(4, 7, lm.d_model, generator=gen)
    h[2:, :5] = h[:2, :5]            # runs 2, 3 share their first 5 positions with runs 0, 1
    rows = torch.tensor([0, 1, 0, 1])
    for layer in range(lm.n_layers):
        whole = engine.run_stream(lm, layer, h)
        _, kept = engine.run_stream(lm, layer, h[:2, :5], keep_prefix=True)
        assert kept.length == 5 and len(kept.keys) == lm.n_layers - 1 - layer
        got = engine.run_stream(lm, layer, h[:, 5:], kept, rows)
        assert torch.allclose(got, whole, atol=F32_ATOL), layer
        # a prefix continued in two steps (positions 0-2, then 3-4) is the same prefix
        _, first = engine.run_stream(lm, layer, h[:2, :3], keep_prefix=True)
        _, both = engine.run_stream(lm, layer, h[:2, 3:5], first, keep_prefix=True)
        assert torch.allclose(engine.run_stream(lm, layer, h[:, 5:], both, rows), whole,
                              atol=F32_ATOL)
    limit = engine.prefix_limit(lm)
    if limit is not None:
        assert arch == "tiny-random-gemma3"
        long = torch.randn(1, limit + 1, lm.d_model, generator=gen)
        with pytest.raises(ValueError, match="longer than the key/value cache keeps whole"):
            engine.run_stream(lm, 0, long, keep_prefix=True)


def test_shared_prefix_split_of_the_full_graph():
    """On the padded prompts of all 1,000 arrangements (labels from token prefixes, as the
    stored states give them), the split that runs fewest positions keeps everything before
    Z's last digit shared: 40,000 prefix pairs (less the 100 (u, u) pairs of a prefix only
    one arrangement has, Z = 10) and two positions of their own per run."""
    from lib.core.models import load_model

    tokens = ar.task_tokens(load_model("tiny-random-llama").tokenizer, "padded")
    ids = tokens.input_ids
    n = len(ids)
    groups = [torch.unique(ids[:, :s], dim=0, return_inverse=True)[1] if s else
              torch.zeros(n, dtype=torch.long) for s in range(ids.shape[1])]
    a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    off = a != b
    split, shared = engine.shared_prefix_split(groups, a[off], b[off])
    assert split == ids.shape[1] - 2 and int(shared.max()) + 1 == 39_900
    for k in torch.randint(0, len(shared), (200,), generator=torch.Generator().manual_seed(0)):
        same = shared == shared[k]   # one label pair: base and source prefixes agree
        assert torch.all(ids[a[off][same], :split] == ids[a[off][k], :split])
        assert torch.all(ids[b[off][same], :split] == ids[b[off][k], :split])
    split, _ = engine.shared_prefix_split(groups, a[off], b[off], limit=4)
    assert split <= 4


def test_pair_predictions_with_shared_prefixes_equal_one_run_per_pair(tuned, monkeypatch):
    """Arrangements 0-59 (X = 1, Y = 1..6) share long prefixes; every ordered pair's
    prediction computed with the shared part once equals the one of a whole run per pair."""
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0])[0]
    pool = list(range(60))
    module = da.AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, 8, seed=2))
    calls = []
    from lib.core.engine import stream
    real_split = stream.shared_prefix_split
    monkeypatch.setattr(stream, "shared_prefix_split",
                        lambda *a, **k: calls.append(real_split(*a, **k)) or calls[-1])
    shared = da.pair_predictions(lm, 0, module, states, pool, batch_size=128)
    assert calls[0][0] >= 5                               # a real split was used
    monkeypatch.setattr(stream, "shared_prefix_split",
                        lambda g, a, b, limit=None: (0, torch.arange(len(a))))
    whole = da.pair_predictions(lm, 0, module, states, pool, batch_size=128)
    assert torch.equal(shared, whole)
    assert torch.all(whole.diagonal() == -1) and len(whole.unique()) > 3


def test_shared_iia_equals_one_whole_run_per_counterfactual(tuned):
    """Evaluation shares the first positions of test counterfactuals whose prompts agree
    there; every prediction, and so the IIA, equals lib.studies.das.iia's one whole run each."""
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0])[0]
    split = ar.split_arrangements(0)
    pairs = ar.counterfactual_pairs(ar.causal_model(1, split["test"]), 400, seed=4)
    for positions in (None, (9,)):
        module = da.AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, 8, seed=3),
                                positions)
        got = da.counterfactual_predictions(lm, 0, module, states, pairs["base"],
                                            pairs["source"], batch_size=96)
        data = da.pairs_data(states, pairs)
        with torch.no_grad():
            h = module(*data.batch(slice(None))[:3])
            whole = da.run_from(lm, 0, h).argmax(-1)
        assert torch.equal(got, whole)
        assert da.shared_iia(lm, 0, module, states, pairs) == \
            das.iia(module, da.head_at(lm, 0), data, batch_size=250)
    with pytest.raises(ValueError, match="one length"):
        da.counterfactual_predictions(lm, 0, module, states, pairs["base"][:3],
                                      pairs["source"][:4])


def test_clique_search_may_recurse_past_pythons_default_limit():
    """Boppana-Halldorsson's ramsey_R2 recurses once per node it takes; on the dense full
    graph of M7 (1,000 arrangements) networkx's ran past Python's limit of 1,000 frames. The
    helper gives it a thread with a large stack and a limit for the graph's size, and restores
    the limit."""
    import sys

    def depth(k):
        return 0 if k == 0 else 1 + depth(k - 1)

    limit = sys.getrecursionlimit()
    with pytest.raises(RecursionError):
        depth(limit + 10)
    assert da._deeply_recursive(lambda k: depth(k), 3000, 1000) == 3000
    assert sys.getrecursionlimit() == limit
    with pytest.raises(ValueError, match="raised inside"):
        da._deeply_recursive(lambda g: (_ for _ in ()).throw(ValueError("raised inside")), 0, 10)


def _bitset_adjacency(graph, n):
    adj = [0] * n
    for u, v in graph.edges():
        adj[u] |= 1 << v
        adj[v] |= 1 << u
    return adj


@pytest.mark.parametrize("n", [5, 12, 40, 90])
def test_bitset_max_clique_is_networkx_max_clique(n, monkeypatch):
    """The bitset version is networkx's approximation.max_clique step for step. networkx
    takes an 'arbitrary element' first, which for subgraphs of under half the nodes follows
    Python's set order; with that pinned to the lowest node (ours) every result is equal."""
    import networkx as nx
    import networkx.algorithms.approximation.ramsey as ramsey
    from networkx.algorithms import approximation

    monkeypatch.setattr(ramsey, "arbitrary_element", lambda g: min(g))
    for seed, p in enumerate([0.05, 0.2, 0.5, 0.8, 0.95] * 4):
        graph = nx.gnp_random_graph(n, p, seed=seed)
        ours = da._max_clique(_bitset_adjacency(graph, n), (1 << n) - 1)
        assert da._bits(ours) == sorted(approximation.max_clique(graph)), (seed, p)
        left = (1 << n) - 1 & ~ours   # and on what remains once a clique is removed
        rest = graph.subgraph(da._bits(left)).copy()
        assert da._bits(da._max_clique(_bitset_adjacency(graph, n), left)) == \
            sorted(approximation.max_clique(rest))


def test_graph_summary_of_a_dense_1000_node_graph_is_quick_and_finds_cliques():
    """networkx's max_clique took more than half an hour on one sparse 1,000-node graph (it
    copies the graph at every step); the bitset version takes seconds on a dense one."""
    g = torch.Generator().manual_seed(0)
    r = torch.triu(torch.rand(1000, 1000, generator=g), 1)
    W = torch.where(r + r.T < 0.8, 1.0, 0.5)
    W.fill_diagonal_(0)
    s = da.graph_summary(W)
    assert len(s["cliques"]) > 10 and min(s["clique_sizes"]) >= 5
    for clique in s["cliques"][:3]:
        assert all(W[u, v] == 1 for u in clique for v in clique if u != v)
    assert sum(s["clique_sizes"]) == s["nodes_in_cliques"]   # removed cliques are disjoint


@pytest.mark.parametrize("layer, rank, n_train, fragment", [
    (2, 4, 8, "layer must be an int from 0 to 1"),
    (-1, 4, 8, "layer must be an int from 0 to 1"),
    (0, 0, 8, "rank must be an int from 1 to d"),
    (0, 10_000, 8, "rank must be an int from 1 to d"),
    (0, 4, 0, "budget of training counterfactuals"),
])
def test_das_run_refuses_a_layer_rank_or_budget_outside_the_model_before_training(
        tuned, layer, rank, n_train, fragment, monkeypatch):
    """A layer or rank the model cannot have, or no training counterfactuals, is refused
    naming it before any step (09 refuses them earlier still, before the fine-tune:
    test_bad_inputs)."""
    lm, tokens = tuned
    states = da.residual_states(lm, tokens, [0])[0]
    pairs = ar.counterfactual_pairs(ar.causal_model(1), 8, seed=0)
    train = {k: v[:n_train] for k, v in pairs.items()}
    steps = []
    monkeypatch.setattr(da, "run_from", lambda *a: steps.append(a))
    with pytest.raises(ValueError, match=fragment):
        da.das_run(lm, layer, rank, states, train, pairs, epochs=1, batch_size=4)
    assert not steps


def test_graph_pool_is_held_out_by_default_and_the_in_sample_pool_is_unchanged():
    """GRAPH_POOL="test": the arrangements come from the test split only, seeded; "all": the
    same pool as before the parameter existed (so those results stay current)."""
    from lib.core.params import ParameterError
    from lib.studies.das import arithmetic as ar
    from lib.studies.das.arithmetic_graphs import graph_pool

    split = ar.split_arrangements(0, 100, 200)
    pool = graph_pool(40, 0, split["test"])
    assert len(pool) == 40 == len(set(pool)) and pool == sorted(pool)
    assert set(pool) <= set(split["test"]) and not set(pool) & set(split["train"])
    assert graph_pool(40, 0, split["test"]) == pool != graph_pool(40, 1, split["test"])
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert graph_pool(40, 0) == sorted(perm[:40].tolist())
    assert graph_pool(1000, 0) == list(range(1000))
    with pytest.raises(ParameterError, match="GRAPH_POOL='all'"):
        graph_pool(201, 0, split["test"])


def test_thesis_column_says_how_many_times_our_counterfactuals_it_trained_on():
    """The thesis trained each rotation on 800 x 1,280 counterfactuals: 100x 09's 160 steps of
    64, 800x the old 20-step runs; the heading follows the result's own parameters."""
    from lib.studies.das.arithmetic_tables import graphs_table

    graph = {"model": 7, "layer": 22, "mean_weight": 0.9, "mean_weight_ci": [0.8, 1.0],
             "fraction": {"1.0": 0.9}, "thesis_mean_weight_gpt2_layer7_rank256": 0.9758,
             "mean_weight1_degree": 30.0, "clique_sizes": [36]}
    for n_train, times in ((10240, "100x"), (1280, "800x")):
        result = {"graphs": [graph], "pool": "test (held out)",
                  "provenance": {"parameters": {"DAS_N_TRAIN": n_train, "DAS_EPOCHS": 1}}}
        [heading] = [c for c in graphs_table(result).columns if c.startswith("thesis")]
        assert heading == f"thesis (in-sample, GPT-2 layer 7 of 12, {times} our counterfactuals)"
        assert graphs_table(result)[heading].tolist() == [0.9758]
