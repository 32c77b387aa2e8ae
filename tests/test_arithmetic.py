"""The X+Y+Z= task: arrangements, tokenization layouts, disjoint splits, the causal models M1-M7
(labels computed by hand), greedy shipped accuracy and fine-tuning with its safetensors cache,
on the tiny random models (byte-level tokenizer: every digit is a token, as for SmolLM2 and
Gemma 3)."""

import itertools

import pytest
import torch

from lib.studies.das import arithmetic as ar
from lib.studies.das import tuning as tu

torch.set_num_threads(1)


def test_arrangements_are_the_product_order_with_x_slowest():
    assert len(ar.ARRANGEMENTS) == 1000
    assert list(ar.ARRANGEMENTS) == list(itertools.product(range(1, 11), repeat=3))
    assert ar.ARRANGEMENTS[0] == (1, 1, 1) and ar.ARRANGEMENTS[1] == (1, 1, 2)
    assert ar.ARRANGEMENTS[100] == (2, 1, 1) and ar.ARRANGEMENTS[999] == (10, 10, 10)
    for i in (0, 1, 10, 100, 457, 999):
        assert ar.arrangement_index(*ar.ARRANGEMENTS[i]) == i
    assert ar.label_of(1, 1, 1) == 0 and ar.label_of(10, 10, 10) == 27 == ar.N_CLASSES - 1
    assert ar.prompt(10, 3, 7) == "10+03+07=" and ar.prompt(10, 3, 7, "plain") == "10+3+7="


def test_padded_format_gives_one_layout_and_plain_is_refused(llama):
    tok = ar.task_tokens(llama.tokenizer, "padded")
    assert tok.input_ids.shape == (1000, 10)   # <bos> + 9 characters
    assert tok.offset == 1
    assert tok.slots == {"X": (1, 2), "plus1": (3,), "Y": (4, 5), "plus2": (6,), "Z": (7, 8),
                         "eq": (9,)}
    desc = tok.describe(llama.tokenizer)
    assert desc["prompt"] == "10+03+07=" and desc["tokens"][1:] == list("10+03+07=")
    with pytest.raises(ar.TaskError, match="different layouts.*padded"):
        ar.task_tokens(llama.tokenizer, "plain")
    with pytest.raises(ar.TaskError, match="format must be"):
        ar.task_tokens(llama.tokenizer, "spaced")


def test_a_token_spanning_two_slots_is_refused():
    class Merging:  # "+0" is one token: no position holds one slot
        def __call__(self, text, add_special_tokens=True):
            out, i = [], 0
            while i < len(text):
                if text[i:i + 2] == "+0":
                    out.append(100)
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return {"input_ids": out}

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    with pytest.raises(ar.TaskError, match="spans two slots"):
        ar.task_tokens(Merging(), "padded")


def test_split_is_disjoint_by_arrangement_seeded_and_complete():
    a = ar.split_arrangements(0)
    assert [len(a[k]) for k in ("train", "val", "test")] == [700, 100, 200]
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(range(1000))
    assert ar.split_arrangements(0) == a and ar.split_arrangements(1) != a
    with pytest.raises(ar.TaskError, match="no training"):
        ar.split_arrangements(0, n_val=500, n_test=500)


# base (1, 2, 3), source (10, 5, 7): the counterfactual sums, by hand
HAND = {1: 10 + 5 + 3, 2: 10 + 7 + 2, 3: 5 + 7 + 1, 4: 10 + 2 + 3, 5: 5 + 1 + 3, 6: 7 + 1 + 2,
        7: 10 + 5 + 7}


@pytest.mark.parametrize("model_id", ar.MODEL_IDS)
def test_causal_model_counterfactual_labels_by_hand(model_id):
    m = ar.causal_model(model_id)
    base = {"X": torch.tensor([1]), "Y": torch.tensor([2]), "Z": torch.tensor([3])}
    src = {"X": torch.tensor([10]), "Y": torch.tensor([5]), "Z": torch.tensor([7])}
    assert int(m.run_forward(base)["O"]) == 6
    out = m.run_interchange(base, {"P": src})["O"]
    assert int(out) == HAND[model_id]
    assert int(m.label(out)) == HAND[model_id] - 3
    assert m.intermediates == ["P"] and m.outputs == ["O"]


def test_value_sets_are_not_shared_between_models():
    """Thesis bug 9: one shared dict, P reset to 3..30 for M7, changed M4-M6 too."""
    models = ar.causal_models()
    assert models[4].values["P"] == list(range(1, 11))
    assert models[1].values["P"] == list(range(2, 21))
    assert models[7].values["P"] == list(range(3, 31))
    objects = [id(models[i].values[v]) for i in models for v in ("X", "Y", "Z", "P", "O")]
    assert len(set(objects)) == len(objects)
    models[7].values["P"].append(99)
    assert 99 not in models[4].values["P"] and 99 not in ar.causal_model(7).values["P"]


def test_counterfactual_pairs_stay_in_their_pool_and_follow_the_model():
    pool = ar.split_arrangements(0)["test"]
    for model_id in ar.MODEL_IDS:
        pairs = ar.counterfactual_pairs(ar.causal_model(model_id, pool), 500, seed=3)
        assert set(pairs["base"].tolist()) <= set(pool)
        assert set(pairs["source"].tolist()) <= set(pool)
        xyz = ar.arrangement_tensor()
        b, s = xyz[pairs["base"]], xyz[pairs["source"]]
        expect = {1: s[:, 0] + s[:, 1] + b[:, 2], 2: s[:, 0] + s[:, 2] + b[:, 1],
                  3: s[:, 1] + s[:, 2] + b[:, 0], 4: s[:, 0] + b[:, 1] + b[:, 2],
                  5: s[:, 1] + b[:, 0] + b[:, 2], 6: s[:, 2] + b[:, 0] + b[:, 1],
                  7: s.sum(1)}[model_id]
        assert torch.equal(pairs["label"], expect - 3)
        assert torch.equal(pairs["base_label"], b.sum(1) - 3)
    with pytest.raises(ar.TaskError, match="M1..M7"):
        ar.causal_model(8)


def test_parse_answer_and_shipped_accuracy_runs(llama):
    assert ar.parse_answer(" 17\n") == 17 and ar.parse_answer("x") is None
    out = ar.shipped_accuracy(llama, n=3, shots=2, fmt="plain", seed=0, max_new_tokens=2)
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert out["examples"][0]["prompt"].count("\n") == 2
    with pytest.raises(ar.TaskError, match="shots"):
        ar.shipped_accuracy(llama, n=3, shots=-1)


def test_greedy_batches_prompts_of_one_length_as_they_would_run_alone(llama):
    """Prompts of equal token length run as one batch (no padding); each continuation equals
    the prompt's own greedy run (one prompt, one forward per token)."""
    texts = ["1+2+3=", "4+5+6=", "10+1+1=", "7+8+9=\n2+2+2=", "3+3+3="]
    lengths = [llama.tokenize(t).shape[1] for t in texts]
    assert len(set(lengths)) < len(texts) < sum(lengths)    # some share a length
    batched = ar._greedy(llama, texts, 3)
    alone = []
    for t in texts:
        ids = llama.tokenize(t)
        for _ in range(3):
            with torch.no_grad():
                nxt = llama.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        alone.append(llama.tokenizer.decode(ids[0, -3:].tolist()))
    assert batched == alone


def test_finetune_learns_and_the_cache_round_trips(tmp_path):
    kwargs = dict(epochs=3, batch_size=64, lr=3e-3, seed=0, cache_dir=tmp_path)
    lm, tokens, split, info = tu.tuned_model("tiny-random-llama", **kwargs)
    assert not info["cached"] and len(info["curve"]) == 3
    assert info["curve"][-1]["train_loss"] < info["curve"][0]["train_loss"]
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("tiny-random-llama-")
    logits = ar.class_logits(lm, tokens.input_ids[:20])
    assert logits.shape == (20, 28)
    assert not any(p.requires_grad for p in lm.model.parameters())
    lm2, _, _, info2 = tu.tuned_model("tiny-random-llama", **kwargs)
    assert info2["cached"] and info2["test_accuracy"] == info["test_accuracy"]
    assert info2["weights_sha256"] == info["weights_sha256"] and len(info["weights_sha256"]) == 64
    assert torch.equal(ar.class_logits(lm2, tokens.input_ids[:20]), logits)
    # other settings: another file
    tu.tuned_model("tiny-random-llama", **{**kwargs, "epochs": 1})
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_lazy_tuned_model_loads_on_first_real_use(tmp_path):
    kwargs = dict(epochs=1, batch_size=64, lr=3e-3, seed=0, cache_dir=tmp_path)
    lazy = tu.LazyTuned("tiny-random-llama", **kwargs)
    assert lazy.n_layers == 2 and lazy.tokenizer is not None and lazy.spec.family == "llama"
    assert not lazy.loaded and not list(tmp_path.glob("*.safetensors"))   # nothing trained
    tokens = ar.task_tokens(lazy.tokenizer, "padded")
    with pytest.warns(UserWarning, match="name no tuned weights"):   # nothing to check against
        logits = ar.class_logits(lazy, tokens.input_ids[:4])   # lazy.model: now it trains
    assert lazy.loaded and logits.shape == (4, 28)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    eager, _, _, info = tu.tuned_model("tiny-random-llama", **kwargs)
    assert torch.equal(ar.class_logits(eager, tokens.input_ids[:4]), logits)
    # the weights the stored results were computed with load; other weights are refused
    same = tu.LazyTuned("tiny-random-llama", expected_sha256=info["weights_sha256"], **kwargs)
    assert same.n_layers == 2 and same.model is not None and same.loaded
    other = tu.LazyTuned("tiny-random-llama", expected_sha256="0" * 64, **kwargs)
    with pytest.raises(ar.TaskError, match="not the ones the stored results"):
        _ = other.model


def test_weights_fingerprint_sees_every_name_shape_and_bit():
    from lib.core.tensorfiles import tensors_sha256

    a = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    fp = tensors_sha256(a)
    assert fp == tensors_sha256({"b": torch.zeros(3), "w": torch.ones(2, 3)})
    bumped = a["w"].clone()
    bumped[1, 2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    for changed in ({**a, "w": bumped}, {**a, "w": torch.ones(3, 2)}, {"w2": a["w"], "b": a["b"]},
                    {**a, "b": torch.zeros(3, dtype=torch.float64)}):
        assert tensors_sha256(changed) != fp


def test_notebook_09_parameters_are_checked_before_running():
    from lib.core import paths
    from lib.core.params import ParameterError, check_params

    nb = paths.NOTEBOOKS / "09_das_arithmetic.ipynb"
    ok = check_params([nb], {"CAUSAL_MODELS": "1,7", "SITES": "all,eq", "RANKS": [8, 64]})
    assert ok[nb]["CAUSAL_MODELS"] == "1,7"
    for bad, match in (({"CAUSAL_MODELS": "1,8"}, "CAUSAL_MODELS"),
                       ({"SITES": "all,="}, "SITES"), ({"FORMAT": "spaced"}, "FORMAT"),
                       ({"RANKS": [0]}, "RANKS"), ({"FT_VAL_TARGET": 1.5}, "FT_VAL_TARGET")):
        with pytest.raises(ParameterError, match=match):
            check_params([nb], bad)
