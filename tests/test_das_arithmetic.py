"""DAS on a language model (lib.das_arithmetic) on tiny random Llama and Gemma 3: the stored
residual streams equal a captured forward pass, the suffix runner from block l equals the full
model, rotated interventions through it (shared over positions and per position) equal
lib.engine's reference loop with the same function intervention, the full-dimension swap gives
the source's prediction, and a training run returns what the notebook stores."""

import pytest
import torch

from lib import arithmetic as ar
from lib import das
from lib import das_arithmetic as da
from lib.engine import Context, Row, run_naive
from lib.hooks import run_with_cache
from lib.models import load_model

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
                              atol=1e-5)


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
