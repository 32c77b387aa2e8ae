"""EAP-IG (lib.studies.path_patching.edges.eap with ig_steps), the multi-pair EAP study and the
IOI head roles (lib.studies.path_patching.roles) on the tiny random models, each against a
computation written here from the definitions (plain Hugging Face forward passes and autograd)."""

import pytest
import torch

from conftest import assert_f32_close
from lib.core.hooks import run_with_cache
from lib.core.sites import site_name
from lib.studies import path_patching as pp

BASE, SOURCE = "Mary and John went. John gave it to", "Anna and Pete went. Luke gave it to"


@pytest.fixture(scope="module")
def ioi_pair(lm):
    """An IOI-like pair on the byte tokenizer: IO 'M', S 'J' (first bytes of the names)."""
    b, s = lm.tokenize(BASE), lm.tokenize(SOURCE)
    assert b.shape == s.shape
    io_id, s_id = int(lm.tokenize("M")[0, -1]), int(lm.tokenize("J")[0, -1])
    diff = torch.nonzero(b[0] != s[0]).flatten()
    return {"base_ids": b, "source_ids": s, "io_id": io_id, "s_id": s_id, "io": "Mary",
            "s": "John", "first_diff": int(diff[0])}


def _metric(pair):
    return lambda logits: logits[..., pair["io_id"]] - logits[..., pair["s_id"]]


def test_one_ig_step_is_eap(lm, ioi_pair):
    edges = pp.node_edges(lm)
    args = (lm, ioi_pair["base_ids"], ioi_pair["source_ids"], edges, _metric(ioi_pair))
    eap, clean = pp.eap(*args)
    ig, clean_ig = pp.eap(*args, ig_steps=1)
    assert_f32_close(ig, eap)
    assert_f32_close(clean_ig, clean)


def test_eap_ig_equals_the_mean_gradient_over_interpolated_embeddings(llama, ioi_pair):
    """emb -> logits by hand: (e_source - e_base) . mean over k of d metric / d final residual
    at embeddings e_source + k/m (e_base - e_source), from plain forward passes."""
    lm, pair, m = llama, ioi_pair, 4
    got, _ = pp.eap(lm, pair["base_ids"], pair["source_ids"], [("emb", "logits")],
                    _metric(pair), ig_steps=m)
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        e_b, e_s = embed(pair["base_ids"]), embed(pair["source_ids"])
    final_norm = lm.model.get_submodule(lm.spec.final_norm_path)
    grads = []
    for k in range(1, m + 1):
        held = {}

        def keep(module, args):
            held["x"] = args[0]
            args[0].retain_grad()
        handle = final_norm.register_forward_pre_hook(keep)
        try:
            x = (e_s + k / m * (e_b - e_s)).requires_grad_(True)
            logits = lm.model(inputs_embeds=x).logits[0, -1]
            _metric(pair)(logits).backward()
        finally:
            handle.remove()
        grads.append(held["x"].grad)
    expected = float(((e_s - e_b) * torch.stack(grads).mean(0)).sum())
    assert_f32_close(got[0], expected)


@pytest.mark.parametrize("bad", [-1, True, 2.5, "5"])
def test_bad_ig_steps_are_refused_before_any_forward(llama, ioi_pair, bad, monkeypatch):
    from lib.core.engine import Engine

    monkeypatch.setattr(Engine, "run", lambda *a, **k: pytest.fail("a forward ran"))
    with pytest.raises(ValueError, match="ig_steps"):
        pp.eap(llama, ioi_pair["base_ids"], ioi_pair["source_ids"], [("emb", "logits")],
               _metric(ioi_pair), ig_steps=bad)


def test_eap_study_over_pairs(lm, ioi_pair):
    pairs = [ioi_pair, dict(ioi_pair)]
    result = pp.eap_study(lm, pairs, ig_steps=2, exact_pairs=1, progress=False)
    pp.EAP_SCHEMA(result)
    edges = pp.node_edges(lm)
    assert [(r["sender"], r["receiver"]) for r in result["records"]] == edges
    assert result["n_pairs"] == 2 and result["exact_pairs"] == 1 and result["ig_steps"] == 2
    # the same pair twice: means over one or both pairs agree; exact is edge patching itself
    exact = pp.edge_patch(lm, ioi_pair["base_ids"], ioi_pair["source_ids"],
                          [[e] for e in edges], _metric(ioi_pair))
    clean = float(_metric(ioi_pair)(run_with_cache(lm, ioi_pair["base_ids"], [])[0][0, -1]))
    assert_f32_close([r["exact"] for r in result["records"]], (exact - clean).tolist())
    assert_f32_close([r["eap_all"] for r in result["records"]],
                     [r["estimate"] for r in result["records"]])
    for method in ("eap", "eap_ig"):
        out = result["agreement"][method]["outlier"]
        worst = max(result["records"], key=lambda r: abs(
            r["estimate" if method == "eap" else "estimate_ig"] - r["exact"]))
        assert (out["sender"], out["receiver"]) == (worst["sender"], worst["receiver"])
    with pytest.raises(ValueError, match="EAP_IG_STEPS"):
        pp.eap_study(lm, pairs, ig_steps=0, progress=False)
    with pytest.raises(ValueError, match="N_EXACT_PAIRS"):
        pp.eap_study(lm, pairs, exact_pairs=0, progress=False)


# --- head roles ---------------------------------------------------------------------------------

def test_frozen_norm_is_the_norm_at_its_point(lm):
    final_norm = lm.model.get_submodule(lm.spec.final_norm_path)
    x0 = torch.randn(3, lm.d_model)
    expected = final_norm(x0).detach()
    if isinstance(final_norm, torch.nn.LayerNorm):
        expected = expected - final_norm.bias.detach()
    got = torch.stack([pp.frozen_norm(final_norm, x)(x) for x in x0])
    assert_f32_close(got, expected)


def test_head_dla_sums_to_the_layer_attention_dla(lm, ioi_pair):
    """The direct logit attributions of every head of a layer add up to that of the layer's
    attention output (minus GPT-2's output bias), through the same frozen norms."""
    layer = lm.n_layers - 1
    heads = [f"a{layer}.h{h}" for h in range(lm.n_heads)]
    roles = pp.head_roles(lm, [ioi_pair], heads)
    pp.ROLES_SCHEMA(roles)
    total = sum(h["dla"]["io"]["mean"] for h in roles["heads"])
    last, attn = site_name("resid_post", lm.n_layers - 1), site_name("attn_out", layer)
    _, cache = run_with_cache(lm, ioi_pair["base_ids"], [last, attn])
    out = cache[attn][0, -1].float()
    block = lm.spec.blocks(lm.model)[layer]
    bias = getattr(block.get_submodule(lm.spec.o_proj), "bias", None)
    if bias is not None:
        out = out - bias.float()
    if lm.spec.attn_post_norm:
        out = pp.frozen_norm(block.get_submodule(lm.spec.attn_post_norm), cache[attn][0, -1])(out)
    final = pp.frozen_norm(lm.model.get_submodule(lm.spec.final_norm_path), cache[last][0, -1])
    unembed = lm.model.get_output_embeddings().weight.float()
    expected = float(final(out) @ unembed[ioi_pair["io_id"]])
    assert_f32_close(total, expected)
    for h in roles["heads"]:
        att = h["attention"]
        assert all(0 <= att[k]["mean"] <= 1 for k in ("io", "s1", "s2"))
        assert 0 <= h["copy_score"] <= 1 and h["role"] in pp.ROLES


def test_role_rules():
    att = {"io": 0.6, "s1": 0.1, "s2": 0.1}
    assert pp.role_of(att, 1.0, 0.2, 0.9, 0.0) == "name mover"
    assert pp.role_of(att, -1.0, 0.2, 0.0, 0.9) == "negative name mover"
    assert pp.role_of(att, 1.0, 0.2, 0.1, 0.0) == "other"          # attends IO, does not copy
    assert pp.role_of({"io": 0.05, "s1": 0.1, "s2": 0.6}, 0.0, -2.0, 0.0, 1.0) == \
        "subject suppression"
    assert pp.role_of({"io": 0.05, "s1": 0.1, "s2": 0.6}, 0.0, 2.0, 0.0, 1.0) == "other"
    assert pp.role_of({"io": 0.1, "s1": 0.1, "s2": 0.1}, 5.0, -5.0, 1.0, 1.0) == "other"


@pytest.mark.parametrize("bad", ["a1", "a1.h0.q", "f0"])
def test_head_roles_refuses_what_is_not_a_head(llama, ioi_pair, bad):
    with pytest.raises(ValueError, match="not a head"):
        pp.head_roles(llama, [ioi_pair], [bad])
    with pytest.raises(ValueError, match="no pairs"):
        pp.head_roles(llama, [], ["a1.h0"])
