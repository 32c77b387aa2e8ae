"""Stacked DAS training (lib.studies.das.stacked) on tiny random Llama: k rotations (seeds,
causal models, ranks) trained in one pass per step end where each trained alone ends; one
member alone is today's das_run (bitwise at a shared rotation, within float32 rounding where
the base's clean prefix is computed once); bad stacks are refused before any training."""

import pytest
import torch

from conftest import F32_ATOL, F32_RTOL, assert_f32_close
from lib.studies import das
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_das as da
from lib.studies.das import stacked as st

torch.set_num_threads(1)
LAYER = 0


@pytest.fixture(scope="module")
def tuned(llama):
    ar.attach_classifier(llama, seed=0)
    tokens = ar.task_tokens(llama.tokenizer, "padded")
    states = da.residual_states(llama, tokens, [LAYER])[LAYER]
    return llama, states


def _members(n=96):
    split = ar.split_arrangements(0)
    pairs = {m: ar.counterfactual_pairs(ar.causal_model(m, split["train"]), n, seed=10 + m)
             for m in (1, 7)}
    return [st.Member(rank=4, seed=0, pairs=pairs[1]), st.Member(rank=8, seed=3, pairs=pairs[1]),
            st.Member(rank=6, seed=1, pairs=pairs[7])]


def _test_pairs():
    return ar.counterfactual_pairs(ar.causal_model(1, ar.split_arrangements(0)["test"]), 64,
                                   seed=2)


@pytest.mark.parametrize("positions", [None, (9,), (6, 7)])
def test_stacked_rotations_equal_each_trained_alone(tuned, positions):
    lm, states = tuned
    members = _members()
    ticks = []
    stacked, out = st.train_stacked(lm, LAYER, states, members, positions, epochs=2,
                                    batch_size=32, lr=0.01, on_step=lambda: ticks.append(1))
    assert len(ticks) == out["steps"] == 6 and out["start"] == (0 if positions is None else min(positions))
    for j, member in enumerate(members):
        alone, out1 = st.train_stacked(lm, LAYER, states, [member], positions, epochs=2,
                                       batch_size=32, lr=0.01)
        assert_f32_close(stacked[j].inner.R.detach(), alone[0].inner.R.detach(),
                         msg=f"member {j}")
        assert_f32_close([r["loss"] for r in out["curves"][j]],
                         [r["loss"] for r in out1["curves"][0]])
        # the rotations moved: the comparison is not of two starting points
        start = das.LowRankRotatedSpaceIntervention(lm.d_model, member.rank, seed=member.seed)
        assert float((alone[0].inner.R - start.R).abs().max()) > 100 * F32_ATOL


def test_one_member_shared_over_positions_is_todays_das_run(tuned):
    """k = 1 at a rotation shared over all positions runs today's computation: the same
    rotation bitwise, the same result."""
    lm, states = tuned
    member = _members()[0]
    test = _test_pairs()
    module, res = da.das_run(lm, LAYER, member.rank, states, member.pairs, test, None,
                             epochs=2, batch_size=32, lr=0.01, seed=member.seed)
    [(mod_s, res_s)] = st.das_runs_stacked(lm, LAYER, states, [member], [test], None,
                                           epochs=2, batch_size=32, lr=0.01)
    assert torch.equal(mod_s.inner.R, module.inner.R)
    for k in ("iia", "control_iia", "steps", "trainable_parameters", "n_train", "n_test",
              "positions", "rank", "layer"):
        assert res_s[k] == res[k], k
    assert [r["loss"] for r in res_s["curve"]] == [r["loss"] for r in res["curve"]]


def test_one_member_at_a_slot_without_the_prefix_is_todays_das_run(tuned):
    lm, states = tuned
    member = _members()[2]
    test = _test_pairs()
    module, res = da.das_run(lm, LAYER, member.rank, states, member.pairs, test, (9,),
                             epochs=2, batch_size=32, lr=0.01, seed=member.seed)
    [(mod_s, res_s)] = st.das_runs_stacked(lm, LAYER, states, [member], [test], (9,),
                                           epochs=2, batch_size=32, lr=0.01, use_prefix=False)
    assert torch.equal(mod_s.inner.R, module.inner.R)
    assert res_s["iia"] == res["iia"] and res_s["control_iia"] == res["control_iia"]


@pytest.mark.parametrize("positions", [(9,), (6, 7)])
def test_a_step_from_the_stored_prefix_equals_todays_step(tuned, positions):
    """At a slot, the stack runs positions from the slot on, continuing the base's stored
    prefix, where today's step runs all ten: the same loss and rotation gradient within
    float32 rounding. (Rotations after several Adam steps are not compared here: Adam divides
    each gradient entry by its own running size, so an entry that is zero up to rounding
    moves by a full learning-rate step either way.)"""
    lm, states = tuned
    member = _members()[2]
    b, s, y = (member.pairs[k][:32] for k in ("base", "source", "label"))
    stack = st.Stack(lm, LAYER, states, [member.rank], [member.seed], positions)
    assert stack.start == min(positions) and stack.prefix is not None
    [loss], _, _ = stack.losses([(b, s, y)])
    [grad] = torch.autograd.grad(loss, stack.parameters()[0])
    today = da.AtPositions(das.LowRankRotatedSpaceIntervention(lm.d_model, member.rank,
                                                               seed=member.seed), positions)
    data = da.pairs_data(states, {"base": b, "source": s, "label": y})
    logits, labels = das.rotation._logits(today, da.head_at(lm, LAYER), data, slice(None))
    ref = torch.nn.functional.cross_entropy(logits, labels)
    [ref_grad] = torch.autograd.grad(ref, [p for p in today.parameters() if p.requires_grad])
    assert_f32_close(loss.detach(), ref.detach())
    assert_f32_close(grad, ref_grad)
    assert float(grad.abs().max()) > 1e-3


def test_base_prefix_continues_to_the_whole_run(tuned):
    lm, states = tuned
    prefix = st.base_prefix(lm, LAYER, states[:40], 9, chunk=16)
    rows = torch.tensor([3, 3, 17, 39])
    with torch.no_grad():
        got = da.run_stream(lm, LAYER, states[rows, 9:], prefix, rows)
        whole = da.run_from(lm, LAYER, states[rows])
    torch.testing.assert_close(got, whole, atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.parametrize("change, fragment", [
    ({"layer": 2}, "layer must be"),
    ({"layer": -1}, "layer must be"),
    ({"rank": 0}, "rank must be an int from 1 to d_model"),
    ({"rank": 10_000}, "rank must be an int from 1 to d_model"),
    ({"n": 0}, "budget of training pairs"),
    ({"epochs": 0}, "epochs must be a positive int"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"positions": (10,)}, "positions must be"),
    ({"members": []}, "members is empty"),
])
def test_bad_stacks_are_refused_before_any_training(tuned, change, fragment, monkeypatch):
    lm, states = tuned
    calls = []
    monkeypatch.setattr(st, "run_stream", lambda *a, **k: calls.append(a))
    member = _members()[0]
    if "rank" in change:
        member = st.Member(change["rank"], 0, member.pairs)
    if "n" in change:
        member = st.Member(4, 0, {k: v[:0] for k, v in member.pairs.items()})
    kwargs = {k: change[k] for k in ("epochs", "batch_size", "lr", "positions") if k in change}
    members = change.get("members", [member])
    with pytest.raises(das.DASError if "layer" not in change else ValueError, match=fragment):
        st.train_stacked(lm, change.get("layer", LAYER), states, members, **kwargs)
    assert not calls


def test_members_of_unequal_budgets_are_refused(tuned):
    lm, states = tuned
    a, b, _ = _members()
    short = st.Member(b.rank, b.seed, {k: v[:50] for k, v in b.pairs.items()})
    with pytest.raises(das.DASError, match="same number of training counterfactuals"):
        st.train_stacked(lm, LAYER, states, [a, short])
