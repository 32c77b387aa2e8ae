"""Path patching (lib.studies.path_patching) on tiny random Llama, Gemma 3 and GPT-2: the checks of
issue 8, each against an independent computation (lib.core.hooks, notebook 05's grid, a plain
two-pass edge implementation, the engine's reference loop)."""

import copy
import re
import zlib

import pytest
import torch

from conftest import F32_ATOL, assert_f32_close
from lib.studies import path_patching as pp
from lib.core.engine import Context, Engine
from lib.core.interventions import Intervention
from lib.core.hooks import _Hooks, _hook_point, n_kv_heads, patch, run_with_cache
from lib.studies.interchange import grid_cells, sweep_interchange
from lib.core.sites import site_name

BASE, SOURCE = "Hello world", "Jello wormd"


@pytest.fixture(scope="module")
def pair(lm):
    b, s = lm.tokenize(BASE), lm.tokenize(SOURCE)
    engine = Engine(lm, [Context(b), Context(s), Context(b.clone())])
    return b, s, engine


def test_which_constant_gives_base_and_source(lm, pair):
    """Bit for bit on the CPUs seen so far; rows batched apart from the clean runs may round
    differently on other kernels, so asserted within the float32 tolerance."""
    b, s, engine = pair
    base, source = engine.clean_readout(0), engine.clean_readout(1)
    patches = [(lambda p: 0, lambda p: False), (lambda p: 1, lambda p: False),
               (lambda p: 0, lambda p: True),
               (lambda p: 1, lambda p: "heads" if p[-1].endswith(".head") else True)]
    out = pp.tree_patch(lm, [b, s, b], patches, engine=engine, allow_noop=True)
    for row, want in zip(out, (base, source, base, source)):
        assert_f32_close(row.readout, want)


def test_a_patch_that_changes_nothing_is_refused_and_numpy_indices_are_accepted(lm, pair):
    """A which written for nano-causal-interventions names heads a1.head2 (here a1.h2): it
    never matches, so the patch is the base run; that is refused, naming the spelling."""
    import numpy as np

    b, s, engine = pair
    nano_spelling = (lambda p: 1 if "a1.head2" in p else 0, lambda p: True)
    with pytest.raises(ValueError, match=r"changes nothing.*a<l>\.h<h>"):
        pp.tree_patch(lm, [b, s], nano_spelling, engine=engine)
    [out] = pp.tree_patch(lm, [b, s], (lambda p: np.int64(1), lambda p: False), engine=engine)
    assert_f32_close(out.readout, engine.clean_readout(1))
    with pytest.raises(ValueError, match="must be an input index"):
        pp.tree_patch(lm, [b, s], (lambda p: True, lambda p: False), engine=engine)


@pytest.mark.parametrize("how", [True, "positions", "heads"])
def test_branching_everywhere_with_base_inputs_changes_nothing(lm, pair, how):
    """Every node split (sub-layers whole, per position, or per head with q/k/v split too),
    paths alternating between two identical copies of the base, so that every split really
    computes its references: the output is the base's."""
    b, s, engine = pair
    base = engine.clean_readout(0)

    def branch(path):
        last = path[-1]
        if last.endswith(".head"):
            return how
        return True

    group = lm.n_heads // n_kv_heads(lm)

    def which(path):
        # heads sharing a key/value head (grouped-query attention) get one lineage for their
        # keys and values; queries may differ per head
        last_q = max([i for i, x in enumerate(path) if x.endswith(".q")], default=-1)
        path = path[:last_q + 1] + [re.sub(r"\.h(\d+)", lambda m: f".g{int(m.group(1)) // group}",
                                           x) for x in path[last_q + 1:]]
        return 0 if zlib.crc32(" ".join(path).encode()) % 2 else 2
    [out] = pp.tree_patch(lm, [b, s, b], (which, branch), engine=engine)
    assert len(out.row.interventions) > 0
    assert torch.allclose(out.readout, base, atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1])
def test_branch_at_attention_equals_patching_its_output(lm, pair, layer):
    """nano's README example: branch at a{l}, which = 1 on the paths through it, equals
    replacing that layer's attention output by the source's with lib.core.hooks."""
    b, s, engine = pair
    node = f"a{layer}"
    [out] = pp.tree_patch(lm, [b, s], (lambda p: 1 if node in p else 0,
                                        lambda p: p[-1] == node), engine=engine)
    site = site_name("attn_out", layer)
    _, cs = run_with_cache(lm, s, [site])
    with torch.no_grad(), patch(lm, [Intervention(site, value=cs[site])]):
        ref = lm.model(input_ids=b).logits[0, -1].float()
    assert torch.allclose(out.readout, ref, atol=F32_ATOL, rtol=0)
    assert not torch.allclose(out.readout, engine.clean_readout(0), atol=1e-4)
    assert out.lineage.name == "ln_final"


def test_node_position_sweep_equals_notebook_05_attention_input_grid(lm, pair):
    b, s, _ = pair
    T = b.shape[1]
    cells = grid_cells(["attn_in"], range(lm.n_layers), range(T))
    grid, _ = sweep_interchange(lm, b, s, cells)
    patches = [pp.node_position_patch(f"a{l}", p) for _, l, p in cells]
    out = torch.stack([x.readout for x in pp.tree_patch(lm, [b, s], patches)])
    assert torch.allclose(out, grid, atol=F32_ATOL, rtol=0)


def test_distinct_lineages_computed_once(llama):
    """Sweeping every node x position in one call computes each distinct reference once:
    the engine's reference rows are no more than the distinct patched runs."""
    b, s = llama.tokenize(BASE), llama.tokenize(SOURCE)
    engine = Engine(llama, [Context(b), Context(s)])
    nodes = [n for n in pp.node_order(llama.n_layers) if n != "none"]
    patches = [pp.node_position_patch(n, p) for n in nodes for p in range(b.shape[1])]
    pp.tree_patch(llama, [b, s], patches * 2, engine=engine)   # every patch asked twice
    assert engine.stats["ref_run"] + engine.stats["ref_noop"] == 0   # plain refs: stored runs
    assert engine.stats["rows_run"] + engine.stats["rows_noop"] == 2 * len(patches)


def test_lineage_tree_merges_identical_sub_lineages(llama):
    b, s = llama.tokenize(BASE), llama.tokenize(SOURCE)
    [out] = pp.tree_patch(llama, [b, s], (lambda p: 1 if "a1" in p else 0,
                                          lambda p: p[-1] == "a1"))
    labels, edges = pp.lineage_edges(out.lineage)
    assert "input 0" in labels.values() and "input 1" in labels.values()
    assert any(v.startswith("a1.resid") for v in labels.values())
    full, _ = pp.lineage_edges(out.lineage, collapse=False)
    assert len(full) == pp.count_lineages(out.lineage) + 2   # + the two input leaves


def test_grouped_query_heads_must_share_key_inputs(llama):
    b, s = llama.tokenize(BASE), llama.tokenize(SOURCE)

    def branch(path):
        return "heads" if path[-1] == "a1.head" else path[-1] in ("a1", "a1.h0")
    with pytest.raises(ValueError, match="grouped-query"):
        pp.tree_patch(llama, [b, s], (lambda p: 1 if "a1.h0.k" in p else 0, branch))


# --- sender -> receiver ---------------------------------------------------------------------------

def test_path_patching_batched_equals_reference_loop(lm, pair):
    b, s, _ = pair
    specs = [dict(senders=[h], freeze=f) for h in pp.all_heads(lm)[:lm.n_heads]
             for f in pp.FREEZE_POLICIES]
    specs += [dict(senders=["a0.h1"], receivers=["a1.h0.q"]),
              dict(senders=["a0.h1", "f0"], receivers=["a1.h2.k", "a1.h3.v"], freeze="all"),
              dict(senders=["a0"], receivers=["f1"])]
    got = pp.path_patch(lm, b, s, specs)
    ref = pp.path_patch(lm, b, s, specs, naive=True)
    assert torch.allclose(got, ref, atol=F32_ATOL, rtol=0)


def test_position_local_logits_equal_the_engine_rows(lm, pair):
    """Sender -> logits patches run position-locally (last position, MLPs only) equal the
    engine's full rows: single heads of every layer, several heads across layers, whole
    sub-layers, both freeze policies; specs with positions fall back to the engine."""
    b, s, engine = pair
    heads = pp.all_heads(lm)
    specs = [dict(senders=[h], freeze=f) for h in heads[::3] for f in pp.FREEZE_POLICIES]
    specs += [dict(senders=[heads[1], heads[-1]], freeze="attention"),
              dict(senders=["a0", "f1"], freeze="all"), dict(senders=["f0"]),
              dict(senders=[heads[lm.n_heads], "f0"], freeze="all")]
    local = pp.path_patch(lm, b, s, specs, batch_size=4)
    rows = pp.path_patch(lm, b, s, specs, local=False)
    assert torch.allclose(local, rows, atol=F32_ATOL, rtol=0)
    assert (local - engine.clean_readout(0)).abs().max() > 1e-3   # the patches do something
    assert not pp._is_local(lm, dict(senders=[heads[0]], positions=[0]))
    n = b.shape[1]
    first = pp._first_difference(b, s)
    suffix = dict(senders=[heads[1]], positions=list(range(first, n)))
    assert pp._is_local(lm, suffix, first, n) and not pp._is_local(lm, suffix, first - 1, n)
    logit0 = lambda logits: logits[:, 0]   # noqa: E731  (a readout of the logits)
    got = pp.path_patch(lm, b, s, [suffix], logit0)
    assert torch.allclose(got, pp.path_patch(lm, b, s, [suffix], logit0, local=False),
                          atol=F32_ATOL, rtol=0)
    assert not pp._is_local(lm, dict(senders=["emb"]))
    assert not pp._is_local(lm, dict(senders=[heads[0]], receivers=["a1.h0.q"]))


def test_all_senders_of_a_layer_to_logits_equals_patching_it(lm, pair):
    """Every head of layer 0 as senders, every later component frozen or not: under "all"
    (everything later frozen) the logits move by exactly layer 0's direct effect; sending a
    whole sub-layer with no freezing between it and the output equals plain activation
    patching."""
    b, s, engine = pair
    heads = [f"a0.h{h}" for h in range(lm.n_heads)]
    got = pp.path_patch(lm, b, s, [dict(senders=heads, freeze="attention"),
                                   dict(senders=["a1"], freeze="attention")])
    site0, site1 = site_name("attn_out", 0), site_name("attn_out", 1)
    _, cs = run_with_cache(lm, s, [site0, site1])
    _, cb = run_with_cache(lm, b, [site1])
    with torch.no_grad(), patch(lm, [Intervention(site0, value=cs[site0]),
                                     Intervention(site1, value=cb[site1])]):
        ref0 = lm.model(input_ids=b).logits[0, -1].float()
    with torch.no_grad(), patch(lm, [Intervention(site1, value=cs[site1])]):
        ref1 = lm.model(input_ids=b).logits[0, -1].float()
    assert torch.allclose(got[0], ref0, atol=F32_ATOL, rtol=0)
    assert torch.allclose(got[1], ref1, atol=F32_ATOL, rtol=0)


def _zero_mlps(lm):
    quiet = copy.copy(lm)
    quiet.model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for block in quiet.spec.blocks(quiet.model):
            for p in block.get_submodule(quiet.spec.mlp).parameters():
                p.zero_()
    return quiet


def test_freeze_policies_differ_exactly_by_the_mlp_paths(lm, pair):
    """A constructed case. Sender a0.h1 -> logits. Under "attention" (Wang et al.) the MLPs
    recompute, so the effect also flows sender -> MLP -> logits; under "all" (pyvene) the MLPs
    are frozen and only the direct path and nothing else is left. On the tiny model the two
    differ; on a copy whose MLPs are zeroed (no MLP path exists) they agree; and under "all"
    the result is the single edge a0.h1 -> logits (Llama, GPT-2: a head's share of the
    residual stream is additive there)."""
    b, s, _ = pair
    specs = [dict(senders=["a0.h1"], freeze=f) for f in ("attention", "all")]
    att, allf = pp.path_patch(lm, b, s, specs)
    assert (att - allf).abs().max() > 1e-3
    quiet = _zero_mlps(lm)
    q_att, q_all = pp.path_patch(quiet, b, s, specs)
    assert torch.allclose(q_att, q_all, atol=F32_ATOL, rtol=0)
    if lm.spec.attn_post_norm is None:
        [edge] = pp.edge_patch(lm, b, s, [[("a0.h1", "logits")]])
        assert torch.allclose(allf, edge, atol=F32_ATOL, rtol=0)


def test_bad_specs_are_refused(llama):
    with pytest.raises(ValueError, match="freeze policy"):
        pp.path_patch_row(llama, ["a0.h0"], freeze="mlp")
    with pytest.raises(ValueError, match="not above"):
        pp.path_patch_row(llama, ["a1.h0"], receivers=["a1.h2.q"])
    with pytest.raises(ValueError, match="unknown node"):
        pp.parse_node("attn3")


# --- edges -----------------------------------------------------------------------------------------

def _two_pass(lm, b, s, edges):
    """A plain implementation: pass 1 reads the source's sender outputs; pass 2 runs the base
    with raw hooks that keep each sender's current output and add source - current at each
    patched receiver (no engine)."""
    senders = {pp._sender_site(pp.parse_node(e[0]), lm) for e in edges}
    _, src = run_with_cache(lm, s, sorted(senders))
    cur = {}
    hooks = _Hooks(lm)

    def rec(site):
        def f(x):
            cur[site] = x.clone()
            return None
        return f

    def add(site, pairs):
        def f(x):
            x = x.clone()
            for sn, rn in pairs:
                ss = pp._sender_site(sn, lm)
                if sn.kind == "head":
                    w = pp._head_weight(lm, sn.layer, sn.head)
                    d = (src[ss][:, :, sn.head] - cur[ss][:, :, sn.head]) @ w
                else:
                    d = src[ss] - cur[ss]
                if rn.kind == "head":
                    h = pp._receiver_site(rn, lm)[1][0]
                    x[:, :, h] += d
                else:
                    x += d
            return x
        return f
    by, seen = {}, set()
    for e in edges:
        sn, rn = pp.parse_node(e[0]), pp.parse_node(e[1])
        key = (sn, pp._receiver_site(rn, lm))   # k/v heads shared under grouped-query attention
        if key not in seen:
            seen.add(key)
            by.setdefault(key[1][0], []).append((sn, rn))
    try:
        for site in senders:
            hooks.add(_hook_point(lm, site), rec(site))
        for site, pairs in by.items():
            hooks.add(_hook_point(lm, site), add(site, pairs))
        with torch.no_grad():
            return lm.model(input_ids=b).logits[0, -1].float()
    finally:
        hooks.close()


def _random_edge_sets(lm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    edges = pp.node_edges(lm)
    if lm.spec.attn_post_norm is None:
        edges += [(h, r) for h in pp.all_heads(lm) for r in ("logits", "f1", "a1.h0.q", "a1.h3.v")
                  if pp._order(pp.parse_node(h)) < pp._order(pp.parse_node(r))]
    sets = []
    for _ in range(n):
        mask = torch.rand(len(edges), generator=g) < 0.3
        sets.append([e for e, m in zip(edges, mask) if m])
    return sets


def test_edge_patching_equals_plain_two_pass(lm, pair):
    b, s, _ = pair
    sets = _random_edge_sets(lm, 12)
    got = pp.edge_patch(lm, b, s, sets, batch_size=5)
    for out, edges in zip(got, sets):
        assert torch.allclose(out, _two_pass(lm, b, s, edges), atol=F32_ATOL, rtol=0)
    assert torch.allclose(got, pp.edge_patch(lm, b, s, sets, naive=True), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("node", ["emb", "a0", "f0", "a1"])
def test_every_out_edge_of_a_node_equals_patching_its_output(lm, pair, node):
    b, s, _ = pair
    edges = [e for e in pp.node_edges(lm) if e[0] == node]
    [got] = pp.edge_patch(lm, b, s, [edges])
    site = pp._sender_site(pp.parse_node(node), lm)
    _, cs = run_with_cache(lm, s, [site])
    with torch.no_grad(), patch(lm, [Intervention(site, value=cs[site])]):
        ref = lm.model(input_ids=b).logits[0, -1].float()
    assert torch.allclose(got, ref, atol=F32_ATOL, rtol=0)


def test_every_out_edge_of_a_head_equals_patching_it(lm, pair):
    if lm.spec.attn_post_norm is not None:
        with pytest.raises(ValueError, match="not additive"):
            pp.edge_patch(lm, *pair[:2], [[("a0.h1", "logits")]])
        return
    b, s, _ = pair
    recv = [f"a1.h{h}.{x}" for h in range(lm.n_heads) for x in "qkv"] + ["f0", "f1", "logits"]
    [got] = pp.edge_patch(lm, b, s, [[("a0.h1", r) for r in recv]])
    site = site_name("head_out", 0)
    _, cs = run_with_cache(lm, s, [site])
    with torch.no_grad(), patch(lm, [Intervention(site, heads=(1,), value=cs[site][:, :, [1]])]):
        ref = lm.model(input_ids=b).logits[0, -1].float()
    assert torch.allclose(got, ref, atol=F32_ATOL, rtol=0)


def test_edge_attribution_patching_tracks_exact_scores(lm, pair):
    b, s, _ = pair
    edges = pp.node_edges(lm)
    t1, t2 = int(s[0, 1]), int(b[0, 1])
    metric = lambda logits: logits[..., t1] - logits[..., t2]   # noqa: E731
    scores, clean = pp.eap(lm, b, s, edges, metric)
    exact = pp.edge_patch(lm, b, s, [[e] for e in edges], metric) - clean
    assert len(scores) == len(edges)
    r = torch.corrcoef(torch.stack([torch.tensor(scores), exact.double()]).float())[0, 1]
    assert r > 0.3, r   # random weights scaled x4: far from linear; the real models in 07


# --- the IOI prompt set ----------------------------------------------------------------------------

def test_ioi_prompt_set_schema_and_alignment(tmp_path):
    import json

    from lib.studies import ioi
    from lib.core.models import load_model

    pairs = ioi.load_ioi()
    assert len(pairs) >= 50
    assert len({p["base"] for p in pairs}) == len(pairs)
    tiny = load_model("tiny-random")
    aligned = ioi.aligned_pairs(tiny, pairs)
    assert len(aligned) == len(pairs)   # replacement names keep each name's length in bytes
    bad = dict(pairs[0], s="Nobody")
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match="entry 0"):
        ioi.load_ioi(tmp_path / "bad.json")
    (tmp_path / "missing.json").write_text(json.dumps([{"base": "x"}]))
    with pytest.raises(ValueError, match="missing key"):
        ioi.load_ioi(tmp_path / "missing.json")


@pytest.mark.slow
def test_every_ioi_answer_name_is_a_token_of_its_prompt_on_the_real_tokenizer():
    """A name opening the sentence has no leading space, so " Paul" never occurred in the old
    template 5's prompts: refused, naming the pair; the committed prompt set aligns whole."""
    from lib.core.models import load_model
    from lib.studies import ioi

    lm = load_model("smollm2-135m")
    pairs = ioi.load_ioi()
    assert len(ioi.aligned_pairs(lm, pairs)) >= 55
    opening = dict(pairs[0], base="Paul and Grace went to the beach. Grace gave a towel to",
                   source="Anna and Sarah went to the beach. Alice gave a towel to",
                   io="Paul", s="Grace")
    with pytest.raises(ValueError, match="IOI pair 0: the io name 'Paul'"):
        ioi.aligned_pairs(lm, [opening])


@pytest.mark.parametrize("how", ["positions", "heads"])
def test_a_split_request_at_the_head_of_an_unsplit_node_is_refused(lm, pair, how):
    """``branch`` returning "positions" (or "heads") at a1.head while falsy at a1 itself: a1 is
    not split, a1.head is never visited, and the request used to change nothing in silence
    (the patch ran as the base run, or as whatever else the tree did). Refused, naming the
    node and the fix; allow_noop=True keeps the old behaviour."""
    b, s, engine = pair

    def which(path):   # a1's sub-layer input from the source, at every position or head
        return 1 if "a1.head" in path else 0

    def branch(path):   # forgets to split a1 itself
        return how if path[-1] == "a1.head" else False

    with pytest.raises(ValueError, match=rf"returns '{how}' at a1\.head but is falsy at a1 "
                                         r"itself.*Return True at a1 too.*allow_noop=True"):
        pp.tree_patch(lm, [b, s], (which, branch), engine=engine)
    [out] = pp.tree_patch(lm, [b, s], (which, branch), engine=engine, allow_noop=True)
    assert_f32_close(out.readout, engine.clean_readout(0))   # the silent no-op, when asked for

    def split(path):    # the same request with a1 split: it patches
        return True if path[-1] == "a1" else branch(path)

    [out] = pp.tree_patch(lm, [b, s], (which, split), engine=engine)
    assert out.row.interventions
