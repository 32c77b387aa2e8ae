"""Batched last-token activations equal unbatched runs, for prompts of different lengths."""

import pytest
import torch

from lib.activations import (collect_last_token, collect_last_token_naive, right_padded_batch,
                             token_ids)
from lib.hooks import count_hooks
from lib.models import load_model

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


def test_right_padded_batch():
    ids, mask, last = right_padded_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert last.tolist() == [2, 0]


def test_errors_are_clear(lm):
    with pytest.raises(ValueError, match="no sites"):
        collect_last_token(lm, PROMPTS, [], progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        collect_last_token(lm, "one prompt", ["embed"], progress=False)
    with pytest.raises(ValueError, match="prompt 1"):
        collect_last_token(lm, ["ok", ""], ["embed"], progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        collect_last_token(lm, PROMPTS, ["blocks.0.nope"], progress=False)


def test_real_model_batched_equals_unbatched(smollm):
    """SmolLM2 (no BOS) on committed prompts of different lengths."""
    from lib.prompts import load_pairs

    pairs = load_pairs("cpp_python.json").head(5)
    prompts = list(pairs.a) + list(pairs.b)
    sites = ["blocks.0.attn_out", "blocks.15.mlp_out", "blocks.29.resid_post"]
    got = collect_last_token(smollm, prompts, sites, batch_size=4, progress=False)
    ref = collect_last_token_naive(smollm, prompts, sites)
    for site in sites:
        scale = ref[site].abs().max().item()
        torch.testing.assert_close(got[site], ref[site], atol=1e-4 * max(scale, 1.0), rtol=1e-3,
                                   msg=site)


@pytest.mark.slow
def test_gemma3_batched_equals_unbatched():
    """Gemma 3 (adds <bos>, sliding-window layers) with right padding."""
    from lib.prompts import load_pairs

    gemma = load_model("gemma3-270m")
    pairs = load_pairs("finance_medical.json").head(4)
    prompts = list(pairs.a) + list(pairs.b)
    assert gemma.tokenizer(prompts[0])["input_ids"][0] == gemma.tokenizer.bos_token_id
    sites = ["blocks.0.attn_out", "blocks.9.mlp_out", "blocks.17.resid_post"]
    got = collect_last_token(gemma, prompts, sites, batch_size=8, progress=False)
    ref = collect_last_token_naive(gemma, prompts, sites)
    for site in sites:
        scale = ref[site].abs().max().item()
        torch.testing.assert_close(got[site], ref[site], atol=1e-4 * max(scale, 1.0), rtol=1e-3,
                                   msg=site)
