"""Batched last-token activations equal unbatched runs, for prompts of different lengths."""

import pytest
import torch

from conftest import assert_f32_close
from lib.core.activations import (collect_last_token, collect_last_token_naive, right_padded_batch,
                             token_ids)
from lib.core.hooks import count_hooks
from lib.core.models import load_model

PROMPTS = ["Write a C++ function.", "Hi", "How do I sort a list of integers in Python?",
           "abc", "The quick brown fox jumps over the lazy dog, twice.", "Hi there", "x y z"]


def test_prompts_really_have_different_lengths(lm):
    lengths = {len(x) for x in token_ids(lm, PROMPTS)}
    assert len(lengths) >= 5


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_unbatched(lm, batch_size):
    sites = ["embed", "blocks.0.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post",
             "blocks.0.head_out"]
    got = collect_last_token(lm, PROMPTS, sites, batch_size=batch_size, progress=False)
    ref = collect_last_token_naive(lm, PROMPTS, sites)
    assert count_hooks(lm.model) == 0
    for site in sites:
        assert got[site].dtype == torch.float32 and got[site].device.type == "cpu"
        assert got[site].shape == ref[site].shape
        assert got[site].shape[0] == len(PROMPTS)
        torch.testing.assert_close(got[site], ref[site], atol=1e-4, rtol=1e-4, msg=site)
    assert got["blocks.1.resid_post"].shape == (len(PROMPTS), lm.d_model)


def test_last_token_is_the_true_last_token(lm):
    """Rows must differ between prompts whose last real token differs (a padding-position read
    would give the same vector for every short prompt)."""
    got = collect_last_token(lm, PROMPTS, ["embed"], batch_size=8, progress=False)["embed"]
    emb = lm.model.get_input_embeddings()
    ids = token_ids(lm, PROMPTS)
    with torch.no_grad():
        expected = torch.stack([emb(torch.tensor([x[-1]]))[0] for x in ids]).float()
    torch.testing.assert_close(got, expected)


def test_order_of_prompts_is_kept(lm):
    sites = ["blocks.1.resid_post"]
    fwd = collect_last_token(lm, PROMPTS, sites, batch_size=2, progress=False)[sites[0]]
    rev = collect_last_token(lm, PROMPTS[::-1], sites, batch_size=2, progress=False)[sites[0]]
    torch.testing.assert_close(fwd, rev.flip(0), atol=1e-4, rtol=1e-4)


def test_right_padded_batch(llama):
    ids, mask, last = right_padded_batch(llama.tokenizer, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]   # 0 is the byte tokenizer's <pad>
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert last.tolist() == [2, 0]


def hand_padded_batch(ids, pad_id):
    """The hand-written right padding that the tokenizer's own ``pad`` replaced."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return input_ids, mask, torch.tensor([len(x) for x in ids]) - 1


def test_tokenizer_padding_equals_hand_padding_whatever_the_tokenizer_defaults(llama):
    """Same tensors as before, so the same activations bit for bit; a tokenizer that pads on
    the left by default (Gemma's) or has no padding token is padded on the right, with EOS,
    and left as it was."""
    ids = token_ids(llama, PROMPTS)
    tok = llama.tokenizer
    for padding_side, pad in (("right", "<pad>"), ("left", "<pad>"), ("right", None)):
        saved = tok.padding_side, tok.pad_token
        tok.padding_side, tok.pad_token = padding_side, pad
        try:
            got = right_padded_batch(tok, ids)
            assert (tok.padding_side, tok.pad_token) == (padding_side, pad)
        finally:
            tok.padding_side, tok.pad_token = saved
        pad_id = tok.pad_token_id if pad else tok.eos_token_id
        for a, b in zip(got, hand_padded_batch(ids, pad_id)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least one token"):
        right_padded_batch(tok, [[5], []])


def test_activations_are_unchanged_by_the_tokenizer_padding(lm):
    """collect_last_token equals the same batches padded by hand (bit for bit on the CPUs seen
    so far; asserted within the float32 tolerance)."""
    from lib.core.hooks import capture

    sites = ["blocks.0.attn_out", "blocks.1.resid_post"]
    got = collect_last_token(lm, PROMPTS, sites, batch_size=16, progress=False)
    ids = token_ids(lm, PROMPTS)
    input_ids, mask, last = hand_padded_batch(ids, lm.tokenizer.pad_token_id)
    with torch.no_grad(), capture(lm, sites) as cache:
        lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    rows = torch.arange(len(ids))
    for site in sites:
        # one batch holds every prompt, only in another row order (rows of a matmul may round
        # differently by position on some kernels)
        assert_f32_close(got[site], cache[site][rows, last].float(), msg=site)


def test_errors_are_clear(lm):
    with pytest.raises(ValueError, match="no sites"):
        collect_last_token(lm, PROMPTS, [], progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        collect_last_token(lm, "one prompt", ["embed"], progress=False)
    with pytest.raises(ValueError, match="prompt 1"):
        collect_last_token(lm, ["ok", ""], ["embed"], progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        collect_last_token(lm, PROMPTS, ["blocks.0.nope"], progress=False)


def _assert_batched_equals_unbatched(lm, prompts, sites, batch_size):
    got = collect_last_token(lm, prompts, sites, batch_size=batch_size, progress=False)
    ref = collect_last_token_naive(lm, prompts, sites)
    for site in sites:
        scale = ref[site].abs().max().item()
        torch.testing.assert_close(got[site], ref[site], atol=1e-4 * max(scale, 1.0), rtol=1e-3,
                                   msg=site)


def test_real_model_batched_equals_unbatched(smollm):
    """SmolLM2 (no BOS) on committed prompts of different lengths."""
    from lib.core.prompts import load_pairs

    pairs = load_pairs("cpp_python.json").head(5)
    prompts = list(pairs.a) + list(pairs.b)
    sites = ["blocks.0.attn_out", "blocks.15.mlp_out", "blocks.29.resid_post"]
    _assert_batched_equals_unbatched(smollm, prompts, sites, batch_size=4)


@pytest.mark.slow
def test_gemma3_batched_equals_unbatched():
    """Gemma 3 (adds <bos>, sliding-window layers) with right padding."""
    from lib.core.prompts import load_pairs

    gemma = load_model("gemma3-270m")
    pairs = load_pairs("finance_medical.json").head(4)
    prompts = list(pairs.a) + list(pairs.b)
    assert gemma.tokenizer(prompts[0])["input_ids"][0] == gemma.tokenizer.bos_token_id
    sites = ["blocks.0.attn_out", "blocks.9.mlp_out", "blocks.17.resid_post"]
    _assert_batched_equals_unbatched(gemma, prompts, sites, batch_size=8)
