"""The intervention engine (lib.core.engine): planning without a model, and the engine against the
one-forward-per-row reference loop on tiny random Llama, Gemma 3 and GPT-2 for the rows of
every study (swaps, grid cells, noise plus restoration, severed, multi-site, references)."""

import warnings

import pytest
import torch

from conftest import F32_ATOL
from lib.core.engine import (Batch, Capture, Context, Engine, Ref, Row, merge_interventions, plan,
                        row_start, run, run_naive)
from lib.core.interventions import Intervention
from lib.core.hooks import NonFiniteError, allow_nonfinite, count_hooks
from lib.core.models import load_model

ARCHS = ["tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2"]
KINDS = ["resid_pre", "attn_in", "head_out", "attn_out", "mlp_in", "mlp_out", "resid_post"]


# --- planning, no model ---------------------------------------------------------------------------

def test_row_start_is_the_first_position_and_layer():
    ivs = [Intervention("blocks.3.mlp_out", positions=(4, 6), kind="zero"),
           Intervention("blocks.1.attn_in", positions=(5,), kind="zero")]
    assert row_start(ivs, 8) == (4, 1)
    assert row_start([Intervention("embed", positions=(2,), kind="zero")], 8) == (2, -1)
    assert row_start([Intervention("blocks.0.mlp_out", kind="zero")], 8) == (0, 0)
    assert row_start([], 8) == (7, 10 ** 9)


def test_plan_groups_by_length_and_position_orders_by_layer_and_covers_every_row_once():
    starts = [(3, 5), (3, 1), (0, 2), (3, 9), (3, 0), (2, 4), (3, 2)]
    lengths = [5, 5, 5, 5, 5, 7, 5]
    noop = [False, False, False, False, True, False, False]
    batches, skipped = plan(starts, lengths, batch_size=2, noop=noop)
    assert skipped == [4]
    covered = sorted(i for b in batches for i in b.rows)
    assert covered == [0, 1, 2, 3, 5, 6]
    for b in batches:
        assert {starts[i][0] for i in b.rows} == {b.start_pos}
        assert {lengths[i] for i in b.rows} == {b.length}
        assert b.start_layer == min(starts[i][1] for i in b.rows)
        assert len(b.rows) <= 2
    pos3 = [b for b in batches if b.length == 5 and b.start_pos == 3]
    assert [b.rows for b in pos3] == [(1, 6), (0, 3)]  # layer order 1, 2 | 5, 9
    assert pos3[1].start_layer == 5


def test_plan_lets_each_row_join_at_its_own_layer():
    starts = [(3, l) for l in (4, 0, 2, 2, 7)]
    batches, _ = plan(starts, [5] * 5, batch_size=8, n_layers=8)
    assert batches == [Batch(5, 3, 0, (1, 2, 3, 0, 4), (0, 2, 2, 4, 7))]
    # one start layer: nothing joins later, no entries
    batches, _ = plan([(3, 2), (3, 2)], [5, 5], batch_size=8, n_layers=8)
    assert batches == [Batch(5, 3, 2, (0, 1))]
    # without layer start every row runs from block 0
    batches, _ = plan(starts, [5] * 5, batch_size=8, layer_start=False, n_layers=8)
    assert batches == [Batch(5, 3, 0, (1, 2, 3, 0, 4))]


def test_plan_switches():
    starts = [(3, 5), (1, 2)]
    batches, _ = plan(starts, [5, 5], batch_size=8, prefix=False, layer_start=False)
    assert batches == [Batch(5, 0, 0, (1, 0))]  # still ordered by first layer
    batches, _ = plan([(4, 10 ** 9)], [5], n_layers=2)
    assert batches == [Batch(5, 4, 1, (0,))]
    with pytest.raises(ValueError, match="batch_size"):
        plan(starts, [5, 5], batch_size=0)


def test_merge_puts_one_sites_rows_into_one_op_and_keeps_each_rows_order():
    v = torch.zeros(1, 1, 4)
    per_row = [[Intervention("blocks.0.mlp_out", positions=(3,), value=v),
                Intervention("blocks.0.mlp_out", positions=(3,), kind="zero")],
               [Intervention("blocks.0.mlp_out", positions=(3,), value=v + 1)],
               [Intervention("blocks.0.mlp_out", positions=(2,), value=v)],
               [Intervention("blocks.1.attn_out", positions=(3,), kind="add", value=v)]]
    merged = merge_interventions(per_row, offset=2)
    stages = merged["blocks.0.mlp_out"]
    assert len(stages) == 2
    by_pos = {op.positions: op for op in stages[0]}
    assert by_pos[(1,)].rows == [0, 1] and len(by_pos[(1,)].values) == 2
    assert by_pos[(0,)].rows == [2]
    assert [(op.kind, op.rows) for op in stages[1]] == [("zero", [0])]
    assert [op.rows for op in merged["blocks.1.attn_out"][0]] == [[3]]


# --- the engine against the reference loop ------------------------------------------------------

@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    torch.set_num_threads(1)
    return load_model(request.param)


def _study_rows(lm):
    """Contexts and rows shaped like every study's."""
    gen = torch.Generator().manual_seed(0)
    base = lm.tokenize("The capital of Spain is")
    source = lm.tokenize("The capital of Italy is")
    other = lm.tokenize("A short one")
    T = base.shape[1]
    noise = [Intervention("embed", positions=(1, 2), kind="add",
                          value=torch.randn(1, 2, lm.d_model, generator=gen), source=f"noise {s}")
             for s in range(2)]
    contexts = [Context(base, name="base"), Context(source, name="source"),
                Context(base, [noise[0]], name="noisy 0"), Context(base, [noise[1]], name="noisy 1"),
                Context(other, name="other")]
    rows = []
    # grid cells (05): every site kind, layer and some positions, from the source run
    for layer in range(lm.n_layers):
        for kind in KINDS:
            for pos in (0, 3, T - 1):
                rows.append(Row(0, [Intervention(f"blocks.{layer}.{kind}", positions=(pos,),
                                                 value=Ref(1, f"blocks.{layer}.{kind}"))]))
    rows.append(Row(0, [Intervention("embed", positions=(3,), value=Ref(1, "embed"))]))
    # heads
    rows.append(Row(0, [Intervention("blocks.1.head_out", positions=(2, 3), heads=(0,),
                                     value=Ref(1, "blocks.1.head_out"))]))
    # last-token swaps, zero ablation, injection (01/02)
    for layer in range(lm.n_layers):
        for kind in ("attn_out", "mlp_out"):
            site = f"blocks.{layer}.{kind}"
            rows.append(Row(1, [Intervention(site, positions=(T - 1,), value=Ref(0, site))]))
            rows.append(Row(4, [Intervention(site, positions=(other.shape[1] - 1,), kind="zero")]))
            rows.append(Row(4, [Intervention(site, positions=(other.shape[1] - 1,), kind="add",
                                             value=torch.randn(lm.d_model, generator=gen))]))
    # noise plus restoration, windows and severed (06)
    for ctx in (2, 3):
        for layer in range(lm.n_layers):
            for tok in (1, 2, T - 1):
                rows.append(Row(ctx, [Intervention(f"blocks.{layer}.resid_post", positions=(tok,),
                                                   value=Ref(0, f"blocks.{layer}.resid_post"))]))
        rows.append(Row(ctx, [Intervention(f"blocks.{l}.mlp_out", positions=(2,),
                                           value=Ref(0, f"blocks.{l}.mlp_out"))
                              for l in range(lm.n_layers)]))
        rows.append(Row(ctx, [Intervention("blocks.0.resid_post", positions=(2,),
                                           value=Ref(0, "blocks.0.resid_post"))]
                        + [Intervention(f"blocks.{l}.mlp_out", positions=(2,),
                                        value=Ref(ctx, f"blocks.{l}.mlp_out"))
                           for l in range(lm.n_layers)]))
    # multi-site with a function, and a nested reference (path-patching style)
    rows.append(Row(0, [Intervention("blocks.0.mlp_out", positions=(4,), kind="zero"),
                        Intervention("blocks.1.attn_in", positions=(3, 4), kind="function",
                                     fn=lambda x: 0.5 * x)]))
    inner = Ref(1, "blocks.0.attn_out")
    nested = Ref(0, "blocks.1.mlp_in", interventions=(
        Intervention("blocks.0.attn_out", positions=(3,), value=inner),))
    rows.append(Row(0, [Intervention("blocks.1.mlp_in", positions=(3, 4), value=nested)]))
    rows.append(Row(2))  # nothing patched: the context's clean readout
    return contexts, rows


@pytest.fixture(scope="module")
def study(tiny):
    contexts, rows = _study_rows(tiny)
    return tiny, contexts, rows, run_naive(tiny, contexts, rows)


@pytest.mark.parametrize("prefix,layer_start", [(True, True), (True, False), (False, True),
                                                (False, False)])
def test_engine_equals_naive_on_every_studys_rows(study, prefix, layer_start):
    lm, contexts, rows, naive = study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's layer-start self-check warns and falls back
        engine = Engine(lm, contexts, batch_size=7, prefix=prefix, layer_start=layer_start)
    got = engine.run(rows)
    assert got.shape == naive.shape
    assert float((got - naive).abs().max()) <= F32_ATOL
    # every row ran exactly once or was a no-op, and nothing was left hooked
    assert engine.stats["rows_run"] + engine.stats["rows_noop"] == len(rows)
    assert count_hooks(lm.model) == 0


def test_rows_joining_a_pass_at_their_own_block_equal_naive(tiny):
    """One batch whose rows start at different blocks (each joins at its own, from the stored
    residual stream and key/value prefix), on a prompt short enough for Gemma 3's sliding
    window to keep every key: with context noise, several site kinds and a capture readout."""
    base, source = tiny.tokenize("ab cd"), tiny.tokenize("ab ce")
    T = base.shape[1]
    assert T == source.shape[1] and T <= 8
    gen = torch.Generator().manual_seed(1)
    noise = Intervention("embed", positions=(1,), kind="add",
                         value=torch.randn(1, 1, tiny.d_model, generator=gen))
    contexts = [Context(base), Context(source), Context(base, [noise])]
    rows = []
    for ctx in (0, 2):
        for layer in range(tiny.n_layers):
            for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
                site = f"blocks.{layer}.{kind}"
                rows.append(Row(ctx, [Intervention(site, positions=(T - 2, T - 1),
                                                   value=Ref(1, site))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine(tiny, contexts, batch_size=64)
    got = engine.run(rows)
    assert float((got - run_naive(tiny, contexts, rows)).abs().max()) <= F32_ATOL
    assert (engine.stats["joined"] > 0) == engine.layer_start
    site = f"blocks.{tiny.n_layers - 1}.resid_post"
    cap = engine.run(rows, Capture((site,)))[site]
    ref = run_naive(tiny, contexts, rows, Capture((site,)))[site]
    assert float((cap - ref).abs().max()) <= F32_ATOL
    assert count_hooks(tiny.model) == 0


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-gemma3"])
def test_rows_joining_several_blocks_up_equal_naive(arch):
    """A deeper tiny model (6 blocks), so that rows join a pass several blocks above its first
    and blocks in between see only the rows already in (their masks cut to match): causal
    tracing's noisy contexts, restorations at every block and token after the subject."""
    from lib.core import models

    torch.manual_seed(0)
    model, tokenizer, source = models._build_tiny(arch, 0, n_layers=6)
    lm = models._describe(arch, model.eval().requires_grad_(False), tokenizer,
                          torch.device("cpu"), torch.float32, source)
    base = lm.tokenize("ab cd")
    T = base.shape[1]
    gen = torch.Generator().manual_seed(2)
    contexts = [Context(base)] + [
        Context(base, [Intervention("embed", positions=(0, 1), kind="add",
                                    value=torch.randn(1, 2, lm.d_model, generator=gen))])
        for _ in range(2)]
    rows = [Row(ctx, [Intervention(f"blocks.{layer}.resid_pre", positions=(tok,),
                                   value=Ref(0, f"blocks.{layer}.resid_pre"))])
            for ctx in (1, 2) for layer in (0, 3, 5) for tok in range(1, T)]
    engine = Engine(lm, contexts, batch_size=64)
    got = engine.run(rows)
    assert engine.layer_start and engine.stats["joined"] > 0
    assert float((got - run_naive(lm, contexts, rows)).abs().max()) <= F32_ATOL


def test_results_come_back_in_row_order(study):
    lm, contexts, rows, naive = study
    order = list(range(len(rows)))[::-1]
    got = run(lm, contexts, [rows[i] for i in order], batch_size=5)
    assert float((got - naive[order]).abs().max()) <= F32_ATOL


def test_own_activation_patches_change_nothing(tiny):
    base = tiny.tokenize("The capital of Spain is")
    contexts = [Context(base)]
    rows = [Row(0, [Intervention(f"blocks.{l}.{k}", positions=(p,), value=Ref(0, f"blocks.{l}.{k}"))])
            for l in range(tiny.n_layers) for k in KINDS for p in range(base.shape[1])]
    engine = Engine(tiny, contexts)
    got = engine.run(rows)
    clean = engine.clean_readout(0)
    assert engine.stats["rows_noop"] == len(rows)   # detected bit for bit, not run
    assert torch.equal(got, clean.expand_as(got))
    ran = run(tiny, contexts, rows, skip_noops=False)   # and running them changes nothing either
    assert float((ran - clean).abs().max()) <= F32_ATOL


def test_capture_readout_equals_naive(tiny):
    contexts, rows = _study_rows(tiny)
    sites = ("blocks.1.mlp_out", "blocks.0.resid_pre")
    got = run(tiny, contexts, rows[-8:], Capture(sites))
    want = run_naive(tiny, contexts, rows[-8:], Capture(sites))
    for s in sites:
        assert got[s].shape == want[s].shape
        assert float((got[s] - want[s]).abs().max()) <= F32_ATOL


def test_a_function_readout_is_applied_per_row(tiny):
    contexts, rows = _study_rows(tiny)
    probs = run(tiny, contexts, rows[:20], lambda z: z.softmax(-1)[:, [3, 7]])
    full = run_naive(tiny, contexts, rows[:20]).softmax(-1)[:, [3, 7]]
    assert probs.shape == (20, 2) and float((probs - full).abs().max()) <= F32_ATOL


def test_gradients_reach_an_interventions_parameters(tiny):
    base = tiny.tokenize("The capital of Spain is")
    scale = torch.nn.Parameter(torch.tensor(0.7))
    T = base.shape[1]  # near the end: tiny Gemma 3's sliding window is short
    iv = Intervention("blocks.1.resid_pre", positions=(T - 2, T - 1), kind="function",
                      fn=lambda x: scale * x)
    grads = []
    for runner in (run, run_naive):
        scale.grad = None
        out = runner(tiny, [Context(base)], [Row(0, [iv])], grad=True)
        out[0, 5].backward()
        grads.append(float(scale.grad))
    assert grads[0] != 0 and abs(grads[0] - grads[1]) <= 1e-4 * max(1, abs(grads[1]))


def test_nan_from_an_intervention_names_the_site_and_row(tiny):
    base = tiny.tokenize("The capital of Spain is")
    bad = Intervention("blocks.0.mlp_out", positions=(2,), kind="add",
                       value=torch.full((tiny.d_model,), float("nan")))
    with pytest.raises(NonFiniteError, match=r"blocks\.0\.mlp_out.*rows \['row 1'\].*allow_nonfinite"):
        run(tiny, [Context(base)], [Row(0), Row(0, [bad])])
    out = run(tiny, [Context(base)], [Row(0, [bad])], check_finite=False)
    assert torch.isnan(out).all()
    with allow_nonfinite():   # the one switch of lib.core.hooks holds for the engine too
        assert torch.isnan(run(tiny, [Context(base)], [Row(0, [bad])])).all()


def test_bad_rows_give_clear_errors(tiny):
    base = tiny.tokenize("The capital of Spain is")
    with pytest.raises(IndexError, match="context 3 does not exist"):
        run(tiny, [Context(base)], [Row(3)])
    wrong = Intervention("blocks.0.mlp_out", positions=(2,), value=torch.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        run(tiny, [Context(base)], [Row(0, [wrong])])
    none_fn = Intervention("blocks.0.mlp_out", positions=(2,), kind="function", fn=lambda x: None)
    with pytest.raises(ValueError, match="returned NoneType"):
        run(tiny, [Context(base)], [Row(0, [none_fn])])
    with pytest.raises(ValueError, match="one non-empty prompt"):
        Context(torch.zeros(2, 3, dtype=torch.long))
    assert count_hooks(tiny.model) == 0


def test_patches_nothing_reads_are_noops(tiny):
    """In the last block, what comes after attention at an earlier position reaches no later
    position: the last position's logits are the clean ones exactly, without running."""
    base, other = tiny.tokenize("The capital of Spain is"), tiny.tokenize("The capital of Italy is")
    last = tiny.n_layers - 1
    p = int((base != other)[0].nonzero()[0])  # the first token where the prompts differ
    rows = [Row(0, [Intervention(f"blocks.{last}.{k}", positions=(p,), value=Ref(1, f"blocks.{last}.{k}"))])
            for k in ("attn_out", "mlp_in", "mlp_out", "resid_post", "head_out")]
    reads = Row(0, [Intervention(f"blocks.{last}.attn_in", positions=(p,),
                                 value=Ref(1, f"blocks.{last}.attn_in"))])  # attention reads it
    engine = Engine(tiny, [Context(base), Context(other)])
    got = engine.run(rows + [reads])
    assert engine.stats["rows_noop"] == len(rows) and engine.stats["rows_run"] == 1
    assert torch.equal(got[:-1], engine.clean_readout(0).expand(len(rows), -1))
    naive = run_naive(tiny, [Context(base), Context(other)], rows + [reads])
    assert float((got - naive).abs().max()) <= F32_ATOL
