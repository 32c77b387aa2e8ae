"""Model loading by name: errors, device/dtype rules, tiny models; the embedded models (slow)."""

import time

import pytest
import torch

from lib.core import models


def test_unknown_name_lists_known_models():
    with pytest.raises(models.ModelNotFoundError) as err:
        models.load_model("smollm-135")
    for name in ("smollm2-135m", "gemma3-270m", "tiny-random", "llama-3.2-1b"):
        assert name in str(err.value)


def test_hub_model_offline_fails_at_once_naming_embedded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError) as err:
        models.load_model("llama-3.2-1b")
    assert time.perf_counter() - started < 10
    assert "smollm2-135m" in str(err.value) and "gemma3-270m" in str(err.value)
    assert "meta-llama/Llama-3.2-1B-Instruct" in str(err.value)


def test_device_and_dtype_rules():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("float8")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    assert models.resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_tiny_models_are_seeded_and_described(name):
    a, b = models.load_model(name, seed=1), models.load_model(name, seed=1)
    ids = a.tokenize("hello")
    assert ids[0, 0].item() == a.tokenizer.bos_token_id
    assert torch.equal(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)
    assert a.n_layers == 2 and a.d_model == 64 and a.n_heads * a.d_head == 64
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.source["kind"] == "tiny-random"


def test_dtype_override_on_tiny():
    lm = models.load_model("tiny-random", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_token_helpers_give_clear_errors():
    lm = models.load_model("tiny-random")
    with pytest.raises(ValueError, match="different lengths"):
        lm.tokenize(["ab", "abc"])
    with pytest.raises(ValueError, match="is 3 tokens"):
        lm.token_id("abc")
    assert lm.token_strings(lm.tokenize("hi")[0])[1:] == ["h", "i"]


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(smollm):
    ids = smollm.tokenize("The capital of Spain is")
    assert smollm.token_strings(ids[0]) == ["The", " capital", " of", " Spain", " is"]
    probs = smollm.model(input_ids=ids).logits[0, -1].softmax(-1)
    assert probs.argmax().item() == smollm.token_id(" Madrid")
    assert smollm.n_layers == 30 and smollm.d_model == 576
    assert len(smollm.source["sha256"]) == 64


@pytest.mark.slow
def test_gemma3_tokenizer_is_whole_words():
    lm = models.load_model("gemma3-270m")
    ids = lm.tokenize("The capital of Spain is")
    assert ids.shape[1] == 6  # <bos> + five whole words
    assert lm.n_layers == 18


def test_tokenizer_guard_keeps_the_tokenizer_and_knows_the_context():
    from transformers import PreTrainedTokenizerBase

    from lib.core.models import PromptError

    lm = models.load_model("tiny-random-gpt2")
    assert lm.max_tokens == 256
    assert isinstance(lm.tokenizer, PreTrainedTokenizerBase)
    assert lm.tokenizer("a" * 255)["input_ids"][-1] == lm.tokenizer("a")["input_ids"][-1]
    with pytest.raises(PromptError, match="257 tokens, longer than the context"):
        lm.tokenizer("a" * 256)  # BOS + 256 bytes
    assert lm.tokenizer(" ", add_special_tokens=False)["input_ids"]  # a space token is fine
