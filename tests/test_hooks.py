"""Invariants of the hook module on tiny random models of each architecture."""

import pytest
import torch

from conftest import F32_ATOL
from lib.core.interventions import Intervention
from lib.core.hooks import SiteError, capture, count_hooks, patch, run_with_cache
from lib.core.sites import LAYER_SITES, all_sites, parse_site, site_name

BASE = "The cat sat on the mat"
SOURCE = "A dog ran in the parks"  # same byte length as BASE, so same token count


@pytest.fixture(scope="module")
def ids(lm):
    base, source = lm.tokenize(BASE), lm.tokenize(SOURCE)
    assert base.shape == source.shape
    return base, source


def logits_of(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_every_site_resolves_with_documented_shape(lm, ids):
    base, _ = ids
    sites = all_sites(lm.n_layers)
    logits, cache = run_with_cache(lm, base, sites)
    assert set(cache) == set(sites)
    batch, pos = base.shape
    for site in sites:
        kind, _ = parse_site(site)
        expected = (batch, pos, lm.n_heads, lm.d_head) if kind == "head_out" else \
            (batch, pos, lm.d_model)
        assert tuple(cache[site].shape) == expected, site
    # resid_post of the last block feeds the final norm: re-applying it gives the logits.
    final_norm = lm.model.get_submodule(lm.spec.final_norm_path)
    with torch.no_grad():
        head = lm.model.get_output_embeddings()
        rebuilt = head(final_norm(cache[site_name("resid_post", lm.n_layers - 1)]))
    assert torch.allclose(rebuilt, logits, atol=F32_ATOL)
    # resid_post of layer l is resid_pre of layer l + 1
    for layer in range(lm.n_layers - 1):
        assert torch.equal(cache[f"blocks.{layer}.resid_post"], cache[f"blocks.{layer + 1}.resid_pre"])


def test_capture_positions_selects_tokens(lm, ids):
    base, _ = ids
    with capture(lm, ["blocks.0.mlp_out"]) as full, torch.no_grad():
        lm.model(input_ids=base)
    with capture(lm, ["blocks.0.mlp_out"], positions=[0, 3]) as part, torch.no_grad():
        lm.model(input_ids=base)
    assert torch.equal(part["blocks.0.mlp_out"], full["blocks.0.mlp_out"][:, [0, 3]])


@pytest.mark.parametrize("kind", LAYER_SITES)
def test_patching_own_activations_changes_nothing(lm, ids, kind):
    base, _ = ids
    clean = logits_of(lm, base)
    for layer in range(lm.n_layers):
        site = site_name(kind, layer)
        _, cache = run_with_cache(lm, base, [site])
        with patch(lm, [Intervention(site, value=cache[site], source="self")]):
            patched = logits_of(lm, base)
        assert (patched - clean).abs().max().item() == 0.0, site


def test_resid_pre_layer0_all_positions_equals_source_run(lm, ids):
    base, source = ids
    _, cache = run_with_cache(lm, source, ["blocks.0.resid_pre"])
    with patch(lm, [Intervention("blocks.0.resid_pre", value=cache["blocks.0.resid_pre"])]):
        patched = logits_of(lm, base)
    assert torch.allclose(patched, logits_of(lm, source), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["resid_pre", "attn_in", "attn_out", "mlp_out", "resid_post"])
def test_last_position_patch_leaves_earlier_logits_bitwise(lm, ids, kind):
    base, source = ids
    last = base.shape[1] - 1
    site = site_name(kind, 0)
    _, cache = run_with_cache(lm, source, [site], positions=[last])
    clean = logits_of(lm, base)
    with patch(lm, [Intervention(site, positions=(last,), value=cache[site])]):
        patched = logits_of(lm, base)
    assert torch.equal(patched[:, :last], clean[:, :last])
    assert not torch.equal(patched[:, last], clean[:, last])


def _sweep_rows(lm, source_cache, seq_len):
    rows = []
    for layer in range(lm.n_layers):
        for kind in ("attn_in", "mlp_out", "resid_pre", "head_out"):
            site = site_name(kind, layer)
            for pos in range(seq_len):
                rows.append([Intervention(site, positions=(pos,),
                                          value=source_cache[site][:, [pos]])])
    return rows


def test_different_interventions_per_row(lm, ids):
    base, source = ids
    two = torch.cat([base, base])
    _, cache = run_with_cache(lm, source, ["blocks.0.mlp_out"])
    ivs = [Intervention("blocks.0.mlp_out", rows=(1,), positions=(2,),
                        value=cache["blocks.0.mlp_out"][:, [2]])]
    with patch(lm, ivs):
        out = logits_of(lm, two)
    clean = logits_of(lm, base)
    assert torch.equal(out[0], clean[0])
    assert not torch.equal(out[1], clean[0])


def test_all_heads_equals_whole_attention_before_projection(lm, ids):
    base, source = ids
    layer = lm.n_layers - 1
    site = site_name("head_out", layer)
    _, cache = run_with_cache(lm, source, [site])
    src = cache[site]
    per_head = [Intervention(site, heads=(h,), value=src[:, :, [h]]) for h in range(lm.n_heads)]
    with patch(lm, per_head):
        by_heads = logits_of(lm, base)
    with patch(lm, [Intervention(site, value=src)]):
        whole = logits_of(lm, base)
    assert torch.equal(by_heads, whole)
    # Patching the whole pre-projection output equals patching attn_out with the source's.
    _, out_cache = run_with_cache(lm, source, [site_name("attn_out", layer)])
    with patch(lm, [Intervention(site_name("attn_out", layer),
                                 value=out_cache[site_name("attn_out", layer)])]):
        via_out = logits_of(lm, base)
    assert torch.allclose(whole, via_out, atol=F32_ATOL)


def test_add_zero_function_kinds(lm, ids):
    base, _ = ids
    _, cache = run_with_cache(lm, base, ["blocks.0.mlp_out"])
    x = cache["blocks.0.mlp_out"]
    added = Intervention("blocks.0.mlp_out", positions=(1,), kind="add",
                         value=torch.ones(lm.d_model)).apply(x)
    assert torch.allclose(added[:, 1] - x[:, 1], torch.ones(lm.d_model))
    assert torch.equal(added[:, 0], x[:, 0])
    zeroed = Intervention("blocks.0.mlp_out", kind="zero").apply(x)
    assert zeroed.abs().sum() == 0
    doubled = Intervention("blocks.0.mlp_out", kind="function", fn=lambda t: 2 * t).apply(x)
    assert torch.allclose(doubled, 2 * x)


def test_no_hook_remains_after_block_or_exception(lm, ids):
    base, _ = ids
    assert count_hooks(lm.model) == 0
    sites = all_sites(lm.n_layers)
    with capture(lm, sites), patch(lm, [Intervention("blocks.0.mlp_out", kind="zero")]):
        assert count_hooks(lm.model) == len(sites) + 1
        logits_of(lm, base)
    assert count_hooks(lm.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture(lm, sites), patch(lm, [Intervention("embed", kind="zero")]):
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0
    # an error raised by a hook during the forward pass also cleans up
    bad = Intervention("blocks.0.mlp_out", positions=(999,), kind="zero")
    with pytest.raises(SiteError, match="positions"):
        with patch(lm, [bad]):
            logits_of(lm, base)
    assert count_hooks(lm.model) == 0


def test_out_of_range_and_unknown_sites_are_clear(lm, ids):
    with pytest.raises(SiteError, match=f"layer {lm.n_layers} is out of range"):
        with capture(lm, [site_name("mlp_out", lm.n_layers)]):
            pass
    with pytest.raises(ValueError, match="unknown site"):
        Intervention("blocks.0.mlp_output", kind="zero")
    with pytest.raises(ValueError, match="unknown site kind"):
        site_name("attention_input", 0)
    with pytest.raises(ValueError, match="heads only apply"):
        Intervention("blocks.0.mlp_out", kind="zero", heads=(0,))
    with pytest.raises(ValueError, match="needs a value"):
        Intervention("blocks.0.mlp_out", kind="replace")
    assert count_hooks(lm.model) == 0


def test_intervention_json_round_trip():
    iv = Intervention("blocks.2.head_out", positions=[3], rows=[0, 1], heads=[1], kind="replace",
                      value=torch.zeros(1), source="run:source")
    data = iv.to_dict()
    assert data == {"site": "blocks.2.head_out", "positions": [3], "kind": "replace",
                    "rows": [0, 1], "heads": [1], "source": "run:source"}
    assert Intervention.from_dict(data, value=torch.zeros(1)) == iv


def test_capture_without_detach_gives_gradients_at_every_site(lm, ids):
    """Attribution patching needs d(output)/d(activation) at each captured site."""
    base, _ = ids
    sites = ["embed"] + [site_name(k, 0) for k in LAYER_SITES]
    grads = {}
    with capture(lm, sites, detach=False) as cache:
        embed = lm.model.get_input_embeddings()(base).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=embed).logits
    for site in sites[1:]:  # embed is bypassed by inputs_embeds
        cache[site].register_hook(lambda g, site=site: grads.__setitem__(site, g))
    logits[0, -1].max().backward()
    for site in sites[1:]:
        assert site in grads and grads[site].abs().sum() > 0, site
        assert grads[site].shape == cache[site].shape


# --- path-patching sites (lib.core.sites.PATH_SITES) ----------------------------------------------

def test_path_sites_shapes_and_self_patch_exact(lm):
    """Every path-patching site resolves with its documented shape, and patching a run with its
    own activations there changes the logits by exactly 0."""
    from lib.core.hooks import n_kv_heads
    from lib.core.sites import PATH_SITES

    ids = lm.tokenize("Hello world")
    sites = [site_name(k, l) for l in range(lm.n_layers) for k in PATH_SITES]
    base, cache = run_with_cache(lm, ids, sites)
    for s in sites:
        kind = parse_site(s)[0]
        heads = {"q_in": lm.n_heads, "k_in": n_kv_heads(lm), "v_in": n_kv_heads(lm)}.get(kind)
        expected = (1, ids.shape[1]) + ((heads,) if heads else ()) + (lm.d_model,)
        assert tuple(cache[s].shape) == expected, s
        with patch(lm, [Intervention(s, value=cache[s])]):
            out = lm.model(input_ids=ids).logits.float()
        assert torch.equal(out, base), s


def test_per_head_inputs_compose_to_the_attention_input(lm):
    """Patching every head's q, k and v input with the source's equals patching the attention's
    pre-norm input (GPT-2's fused c_attn included); one head's query alone changes the output;
    patching the pre-norm input leaves the residual stream (the next block's input minus the
    attention's addition) unchanged."""
    ids, src = lm.tokenize("Hello world"), lm.tokenize("Jello world")
    sites = [site_name(k, 1) for k in ("attn_norm_in", "q_in", "k_in", "v_in")]
    base, _ = run_with_cache(lm, ids, [])
    _, cs = run_with_cache(lm, src, sites)
    with patch(lm, [Intervention(sites[0], value=cs[sites[0]])]):
        whole = lm.model(input_ids=ids).logits
    with patch(lm, [Intervention(s, value=cs[s]) for s in sites[1:]]):
        per_head = lm.model(input_ids=ids).logits
    assert torch.equal(whole, per_head)
    assert not torch.equal(whole.float(), base)
    q = Intervention(sites[1], heads=(1,), value=cs[sites[1]][:, :, [1]])
    with patch(lm, [q]):
        one = lm.model(input_ids=ids).logits.float()
    assert not torch.equal(one, base)
    _, clean = run_with_cache(lm, ids, [site_name("resid_pre", 1)])
    with patch(lm, [Intervention(sites[0], value=cs[sites[0]])]), \
            capture(lm, [site_name("resid_pre", 1), site_name("mlp_norm_in", 1),
                         site_name("attn_add", 1)]) as got:
        lm.model(input_ids=ids)
    assert torch.equal(got[site_name("resid_pre", 1)], clean[site_name("resid_pre", 1)])
    assert torch.allclose(got[site_name("mlp_norm_in", 1)],
                          clean[site_name("resid_pre", 1)] + got[site_name("attn_add", 1)],
                          atol=F32_ATOL)


def test_one_meaning_in_patch_and_in_the_engine(llama):
    """An Intervention becomes one Op (lib.core.hooks.apply_ops is the only writer); positions stay
    absolute through an offset; `rows` selects batch rows in patch and is refused by the engine,
    where a row's interventions apply to that row alone."""
    from lib.core.engine import Context, Engine, Row
    from lib.core.interventions import Op

    iv = Intervention("blocks.0.mlp_out", positions=(5, 6), kind="zero", rows=(1,))
    op = iv.to_op(offset=4)
    assert isinstance(op, Op) and op.positions == (1, 2) and op.rows == [1] and op.offset == 4
    x = torch.ones(2, 3, llama.d_model)
    out = iv.apply(x, offset=4)
    assert out[1, 1:].abs().sum() == 0 and torch.equal(out[0], x[0]) and torch.equal(out[1, 0], x[1, 0])
    with pytest.raises(SiteError, match=r"positions \[7\] are outside this run .* 4 to 6"):
        Intervention("blocks.0.mlp_out", positions=(7,), kind="zero").apply(x, offset=4)
    ids = llama.tokenize("abcdef")
    engine = Engine(llama, [Context(ids)])
    with pytest.raises(ValueError, match="rows selects batch rows in lib.core.hooks.patch"):
        engine.run([Row(0, [Intervention("blocks.0.mlp_out", kind="zero", rows=(0,))])])
