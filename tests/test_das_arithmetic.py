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
