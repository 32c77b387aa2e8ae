"""Causal tracing (lib.studies.tracing) on tiny random models: the window rule, the two ends of a trace
(restore everything -> p_clean, restore nothing -> p_corrupt), common random numbers, batched
rows equal to one forward per row, the severed variant, noise rules and clear errors."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import F32_ATOL
from lib.studies import tracing as tr
from lib.studies import tracing_facts as tf
from lib.core.hooks import count_hooks
from lib.core.io import UnitStore, dumps
from lib.core.models import load_model
from lib.core.prompts import load_facts
from lib.plots import tracing as tp

# Byte-level tokenizer: 1 token per byte plus <bos> (12 tokens). Short enough that the tiny
# Gemma's sliding window (8) lets the last token's first layer see the subject, long enough that
# restorations at positions 9-11 continue from a cache that the sliding window has truncated.
PROMPT = "Rome is big"
SUBJECT = "Rome"
SAMPLES = 3


@pytest.fixture(scope="module")
def tracer(lm):
    t = tr.CausalTracer(lm, PROMPT, SUBJECT, noise=tr.noise_level(lm, "auto"), samples=SAMPLES,
                        seed=1)
    # the corruption must move the output, or the tests below prove nothing
    assert abs(t.p_clean - t.p_corrupt) > 1e-3
    return t


def all_hidden(lm, n_tokens):
    return tr.Restoration(restore=tuple(("resid_post", l, t) for l in range(lm.n_layers)
                                        for t in range(n_tokens)))


# --- rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 2, 12, 30, 48])
@pytest.mark.parametrize("window", [1, 2, 3, 9, 10, 11])
def test_window_rule_matches_formula(n_layers, window):
    for layer in range(n_layers):
        expected = list(range(max(0, layer - window // 2),
                              min(n_layers, layer + math.ceil(window / 2))))
        got = tr.window_layers(layer, window, n_layers)
        assert got == expected
        assert layer in got and len(got) <= window


def test_window_rule_known_cases():
    assert tr.window_layers(15, 10, 30) == list(range(10, 20))   # L-5 .. L+4 (ROME's code)
    assert tr.window_layers(0, 10, 30) == [0, 1, 2, 3, 4]
    assert tr.window_layers(29, 10, 30) == list(range(24, 30))
    assert tr.window_layers(7, 1, 30) == [7]
    with pytest.raises(ValueError, match="window"):
        tr.window_layers(0, 0, 30)
    with pytest.raises(ValueError, match="outside"):
        tr.window_layers(30, 10, 30)


def test_make_noise_is_romes_random_state():
    draws = tr.make_noise(4, 3, 5, seed=1)
    assert np.array_equal(draws, np.random.RandomState(1).randn(4, 3, 5))
    assert np.array_equal(draws, tr.make_noise(4, 3, 5, seed=1))
    assert not np.array_equal(draws, tr.make_noise(4, 3, 5, seed=2))


def test_subject_range_is_last_occurrence_and_skips_bos(llama):
    lm = llama
    # token 0 is <bos>; byte i of the prompt is token i + 1
    assert tr.subject_token_range(lm, "ab cd ab", "ab") == (7, 9)
    assert tr.subject_token_range(lm, PROMPT, SUBJECT) == (1, 5)
    assert tr.subject_token_range(lm, PROMPT, "big") == (9, 12)


def test_subject_not_in_prompt_is_a_clear_error(llama):
    lm = llama
    with pytest.raises(tr.SubjectNotFoundError, match="does not occur in prompt"):
        tr.subject_token_range(lm, PROMPT, "Paris")
    with pytest.raises(tr.SubjectNotFoundError, match="exact substring"):
        tr.CausalTracer(lm, PROMPT, "rome", noise=0.1, samples=1)
    with pytest.raises(tr.SubjectNotFoundError, match="empty"):
        tr.subject_token_range(lm, PROMPT, "")


@pytest.mark.slow
def test_subject_range_on_real_tokenizers(smollm):
    prompt = "The Eiffel Tower is located in the city of"
    s0, s1 = tr.subject_token_range(smollm, prompt, "The Eiffel Tower")
    pieces = smollm.token_strings(smollm.tokenize(prompt)[0])
    assert "".join(pieces[s0:s1]).strip() == "The Eiffel Tower"
    s0, s1 = tr.subject_token_range(smollm, prompt, "city")
    assert [p.strip() for p in pieces[s0:s1]] == ["city"]


# --- noise rules -----------------------------------------------------------------------------

def test_noise_rule_auto_is_three_std_of_embedding_output(lm):
    module = lm.model.get_submodule(lm.spec.embed_path)
    weight = module.weight.detach().double()
    scale = math.sqrt(lm.d_model) if lm.spec.family.startswith("gemma") else 1.0
    expected = 3 * float(weight.std()) * scale
    assert tr.noise_level(lm, "auto") == pytest.approx(expected, rel=1e-9)
    # the same as the std of the module's actual output over the whole vocabulary
    with torch.no_grad():
        out = module(torch.arange(weight.shape[0])).double()
    assert tr.noise_level(lm, "auto") == pytest.approx(3 * float(out.std()), rel=1e-6)


def test_noise_rule_subject_and_numbers(lm):
    ids = lm.tokenize(PROMPT)
    with torch.no_grad():
        emb = lm.model.get_submodule(lm.spec.embed_path)(ids)[0, 1:5].double()
    assert tr.noise_level(lm, "subject", pairs=[(PROMPT, SUBJECT)]) == pytest.approx(
        3 * float(emb.std()), rel=1e-9)
    assert tr.noise_level(lm, "subject", pairs=[(PROMPT, SUBJECT)], multiplier=1) == \
        pytest.approx(float(emb.std()), rel=1e-9)
    assert tr.noise_level(lm, 0.25) == 0.25
    assert tr.noise_level(lm, "0.25") == 0.25
    with pytest.raises(ValueError, match="unknown noise rule"):
        tr.noise_level(lm, "loud")
    with pytest.raises(ValueError, match=">= 0"):
        tr.noise_level(lm, -1.0)
    with pytest.raises(ValueError, match="at least one"):
        tr.noise_level(lm, "subject", pairs=[])


def test_noise_is_added_at_the_subject_embeddings_only(tracer, lm):
    noise = tracer.noise_draws
    assert tuple(noise.shape) == (SAMPLES, 4, lm.d_model)
    expected = torch.from_numpy(tr.make_noise(SAMPLES, 4, lm.d_model, 1) * tracer.noise)
    assert torch.allclose(noise.double(), expected, atol=F32_ATOL)
    clean = tracer.clean["blocks.0.resid_post"]
    corrupt = tracer.corrupted["blocks.0.resid_post"]
    # positions before the subject are untouched in every sample; the subject's are not
    assert torch.allclose(corrupt[:, :1], clean[None, :1].expand(SAMPLES, -1, -1), atol=F32_ATOL)
    assert (corrupt[:, 1:5] - clean[None, 1:5]).abs().amax() > 1e-3


# --- the two ends of a trace -------------------------------------------------------------------

def test_restoring_every_hidden_state_gives_p_clean(tracer, lm):
    p = tracer.scores([all_hidden(lm, tracer.n_tokens)])[0]
    assert p == pytest.approx(tracer.p_clean, abs=F32_ATOL)
    # so does the last layer's residual stream at the last token alone
    last = tr.Restoration(restore=(("resid_post", lm.n_layers - 1, tracer.n_tokens - 1),))
    assert tracer.scores([last])[0] == pytest.approx(tracer.p_clean, abs=F32_ATOL)
    assert count_hooks(lm.model) == 0


def test_no_restoration_gives_p_corrupt(tracer, lm):
    assert tracer.scores([tr.Restoration()])[0] == tracer.p_corrupt
    assert tracer.scores_naive([tr.Restoration()])[0] == pytest.approx(tracer.p_corrupt,
                                                                         abs=F32_ATOL)
    # restoring before the subject changes nothing (why trace() skips those rows)
    before = tr.Restoration(restore=tuple(("resid_post", l, 0) for l in range(lm.n_layers)))
    assert tracer.scores([before])[0] == pytest.approx(tracer.p_corrupt, abs=F32_ATOL)


def test_trace_grid_shape_prefix_rows_and_round_trip(tracer, lm):
    res = tracer.trace("hidden")
    assert res.scores.shape == (tracer.n_tokens, lm.n_layers)
    assert res.prefix_rows == [0] and np.all(res.scores[0] == tracer.p_corrupt)
    assert not np.isnan(res.scores).any()
    # the last layer at the last token restores the clean output
    assert res.scores[-1, -1] == pytest.approx(tracer.p_clean, abs=F32_ATOL)
    part = tracer.trace("mlp", window=1, tokens=[4], layers=[1])
    assert np.isnan(part.scores[3, 1]) and not np.isnan(part.scores[4, 1])
    data = json.loads(dumps(part.to_dict()))
    back = tr.TraceResult.from_dict(data)
    assert np.array_equal(np.isnan(back.scores), np.isnan(part.scores))
    assert back.scores[4, 1] == part.scores[4, 1] and back.subject_range == part.subject_range


# --- common random numbers and batching ----------------------------------------------------------

def test_same_seed_gives_identical_results(lm):
    nu = tr.noise_level(lm, "auto")
    a = tr.CausalTracer(lm, PROMPT, SUBJECT, noise=nu, samples=SAMPLES, seed=7)
    b = tr.CausalTracer(lm, PROMPT, SUBJECT, noise=nu, samples=SAMPLES, seed=7)
    c = tr.CausalTracer(lm, PROMPT, SUBJECT, noise=nu, samples=SAMPLES, seed=8)
    ra, rb, rc = (t.trace("mlp", window=2, batch_size=5).scores for t in (a, b, c))
    assert np.array_equal(ra, rb)
    assert a.p_corrupt == b.p_corrupt
    assert not np.array_equal(ra, rc)


@pytest.mark.parametrize("kind", tr.TRACE_KINDS)
def test_batched_equals_naive(tracer, lm, kind):
    tokens = list(range(tracer.n_tokens))  # also the rows before the subject
    jobs = tr.grid_restorations(kind, lm.n_layers, tokens, range(lm.n_layers),
                                tr.DEFAULT_WINDOW[kind] if kind == "hidden" else 2)
    batched = tracer.scores(jobs, batch_size=7)
    naive = tracer.scores_naive(jobs)
    assert np.abs(batched - naive).max() <= F32_ATOL
    # the grid really varies (restorations do something)
    assert batched.max() - batched.min() > 1e-5  # float noise is ~1e-9
    # batch size does not change the result beyond float noise
    assert np.abs(tracer.scores(jobs, batch_size=1) - batched).max() <= F32_ATOL
    assert count_hooks(lm.model) == 0


# --- severed ---------------------------------------------------------------------------------

def test_severed_with_nothing_frozen_equals_ordinary(tracer, lm):
    token = tracer.subject_range[1] - 1
    layers = range(lm.n_layers)
    plain = tr.severed_restorations(token, lm.n_layers, layers, None)
    assert plain == tr.grid_restorations("hidden", lm.n_layers, [token], layers, 1)
    curves = tracer.severed(token)
    # equal up to float rounding: the engine batches these rows with the severed ones
    assert np.abs(np.array(curves["ordinary"])
                  - tracer.trace("hidden", tokens=[token]).scores[token]).max() <= 1e-7
    assert set(curves) >= {"ordinary", "mlp_severed", "attention_severed", "layers", "token"}


def test_severed_freezes_at_corrupted_values_with_the_same_noise(tracer, lm):
    # At the last token the frozen MLP / attention outputs feed the logits directly.
    last = tracer.n_tokens - 1
    for sever in tr.SEVER_KINDS:
        jobs = tr.severed_restorations(last, lm.n_layers, [0], sever)
        assert all(len(j.freeze) == lm.n_layers for j in jobs)
        batched, naive = tracer.scores(jobs), tracer.scores_naive(jobs)
        assert np.abs(batched - naive).max() <= F32_ATOL
        ordinary = tracer.scores(tr.severed_restorations(last, lm.n_layers, [0], None))
        assert abs(batched[0] - ordinary[0]) > 1e-5  # float noise is ~1e-9
    # freezing everything at its corrupted value, with nothing restored, is the corrupted run
    freeze_all = tr.Restoration(freeze=tuple(("mlp_out", l, t) for l in range(lm.n_layers)
                                             for t in range(tracer.n_tokens)))
    assert tracer.scores([freeze_all])[0] == pytest.approx(tracer.p_corrupt, abs=F32_ATOL)


def test_restoration_validation(tracer):
    with pytest.raises(ValueError, match="both restored and frozen"):
        tr.Restoration(restore=(("mlp_out", 0, 1),), freeze=(("mlp_out", 0, 1),))
    with pytest.raises(ValueError, match="not recorded"):
        tracer.scores([tr.Restoration(restore=(("mlp_in", 0, 1),))])
    with pytest.raises(ValueError, match="outside the prompt"):
        tracer.scores([tr.Restoration(restore=(("mlp_out", 0, 99),))])
    with pytest.raises(ValueError, match="unknown trace kind"):
        tr.grid_restorations("mlp_out", 2, [0], [0], 1)


# --- answers ---------------------------------------------------------------------------------

def test_answer_override(lm, tracer):
    other = " x" if tracer.top_token != " x" else " y"
    t = tr.CausalTracer(lm, PROMPT, SUBJECT, answer=other, noise=tracer.noise, samples=SAMPLES)
    assert t.answer_id == lm.tokenizer(other, add_special_tokens=False)["input_ids"][0]
    assert t.answer_id != tracer.answer_id and not t.correct
    with torch.no_grad():
        probs = lm.model(input_ids=lm.tokenize(PROMPT)).logits[0, -1].float().softmax(-1)
    assert t.p_clean == pytest.approx(float(probs[t.answer_id]), abs=1e-7)
    assert tracer.answer_id == int(probs.argmax()) and tracer.correct
    with pytest.raises(ValueError, match="no token"):
        tr.answer_token_id(lm, "")


# --- fact averages and resumable units ----------------------------------------------------------

def _fake(p_clean, p_corrupt, curve, correct=True):
    return {"correct": correct, "p_clean": p_clean, "p_corrupt": p_corrupt,
            "scores": {"hidden": {"last": curve}}}


def test_average_effects_and_summary_by_hand():
    results = [_fake(0.8, 0.1, [0.1, 0.5]), _fake(0.6, 0.2, [0.4, 0.2]),
               _fake(0.9, 0.0, [0.9, 0.9], correct=False)]
    eff = tf.average_effects(results)
    row = eff[(eff["layer"] == 1)].iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.2)   # (0.4 + 0.0) / 2
    assert row["std"] == pytest.approx(0.2)
    assert row["hi"] - row["mean"] == pytest.approx(1.96 * 0.2 / math.sqrt(2))
    summary = tf.summarize_facts(results, eff)
    assert summary["n_correct"] == 2 and summary["n_facts"] == 3
    assert summary["ate"] == pytest.approx(0.55)
    assert summary["peaks"]["hidden"]["last"] == {"aie": pytest.approx(0.2), "layer": 1}
    with pytest.raises(ValueError, match="no correct facts"):
        tf.average_effects([_fake(0.5, 0.1, [0.1], correct=False)])
    tp.plot_average_effects(eff).draw()


def test_trace_facts_resumes_from_units(tmp_path, monkeypatch):
    lm = load_model("tiny-random-llama")
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "answer": ""},
             {"prompt": "Oslo is cold", "subject": "Oslo", "answer": "zzz"}]
    top = tr.CausalTracer(lm, PROMPT, SUBJECT, noise=0.1, samples=1).top_token
    facts[0]["answer"] = top
    store = UnitStore(tmp_path, {"n": 1})
    first = tf.trace_facts(lm, facts, store, noise=0.5, samples=2, window=2, progress=False)
    assert first[0]["correct"] and not first[1]["correct"]
    assert set(first[0]["scores"]) == {"hidden", "mlp", "attention", "hidden_mlp_severed",
                                       "hidden_attention_severed"}
    assert len(first[0]["scores"]["mlp"]["last"]) == lm.n_layers
    assert first[0]["scores"]["hidden"]["last"][-1] == pytest.approx(first[0]["p_clean"],
                                                                     abs=F32_ATOL)
    assert len(list(tmp_path.glob("fact_*.json"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("a finished fact was recomputed")
    monkeypatch.setattr(tf, "trace_fact", boom)
    again = tf.trace_facts(lm, facts, store, noise=0.5, samples=2, window=2, progress=False)
    assert json.loads(dumps(again)) == json.loads(dumps(first))


def test_load_facts_checks_shape(tmp_path):
    facts = load_facts(tr.__file__.replace("lib/studies/tracing.py", "prompt_set/facts.json"))
    assert len(facts) >= 20 and all(f["subject"] in f["prompt"] for f in facts)
    assert len(load_facts(tr.__file__.replace("lib/studies/tracing.py", "prompt_set/facts.json"),
                             n=3)) == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a b", "subject": "c", "answer": " d"}]))
    with pytest.raises(ValueError, match="is not in its prompt"):
        load_facts(bad)
    bad.write_text(json.dumps([{"prompt": "a b"}]))
    with pytest.raises(ValueError, match="lacks"):
        load_facts(bad)


def test_plots_build(tracer):
    res = tracer.trace("attention", window=2)
    for fig in (tp.plot_trace_heatmap(res), tp.plot_trace_heatmap(res.to_dict()),
                tp.plot_severed(tracer.severed())):
        assert hasattr(fig, "draw")
    fig = tp.plot_trace_heatmap(res)
    fig.draw()
