"""Interchange intervention grid and attribution patching (lib.studies.interchange, lib.studies.attribution) on
tiny random models."""

import warnings

import pytest
import torch

from conftest import F32_ATOL
from lib.studies.attribution import attribution_patching, correlations
from lib.core.interventions import Intervention
from lib.core.hooks import patch, run_with_cache
from lib.studies.interchange import (ATTRIBUTION_KEYS, RECORD_KEYS, TokenizationMismatchError,
                             align_prompts, grid_cells, interchange_rows,
                             node_order, run_interchange, strongest_cells, sweep_interchange)
from lib.core.io import params_key, provenance, read_current, read_json, write_json
from lib.core.models import load_model
from lib.plots.interchange import (plot_attribution, plot_attribution_scatter, plot_heatmap,
                                   plot_layer_bars)
from lib.core.sites import site_name

BASE = "The cat sat on the mat"
SOURCE = "A dog ran in the parks"   # same byte length as BASE
SHARED = "The cat sat on the map"   # shares BASE's first 21 bytes
TOKENS = ["x", "y"]                 # one byte each: single tokens for the byte tokenizer
KINDS = ["mlp_out", "attn_in", "resid_pre", "head_out", "attn_out", "embed"]


def _grid(lm, base, source, kinds=KINDS):
    base_ids, source_ids = align_prompts(lm, base, source)
    cells = grid_cells(kinds, list(range(lm.n_layers)), list(range(base_ids.shape[1])))
    return base_ids, source_ids, cells


@pytest.fixture(scope="module")
def grid(lm):
    """A short prompt pair that differs at some positions and not at others, every kind of
    site, and the naive loop's logits (computed once per model)."""
    base_ids, source_ids, cells = _grid(lm, "cat sat on", "cat ran in")
    naive, _ = sweep_interchange(lm, base_ids, source_ids, cells, engine="naive")
    return base_ids, source_ids, cells, naive


@pytest.mark.parametrize("skip_noops", [True, False])
def test_grid_equals_naive_loop(lm, grid, skip_noops):
    base_ids, source_ids, cells, naive = grid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2 warns that it cannot start mid-stack
        fast, clean = sweep_interchange(lm, base_ids, source_ids, cells, batch_size=7,
                                        skip_noops=skip_noops)
    assert fast.shape == naive.shape
    assert (fast - naive).abs().max().item() <= F32_ATOL
    assert (fast.softmax(-1) - naive.softmax(-1)).abs().max().item() <= F32_ATOL
    # the grid is not trivial: some cells move the output
    assert (naive - clean["base"]).abs().max().item() > 1e-2


def test_results_come_back_in_row_order(llama):
    base_ids, source_ids, cells = _grid(llama, BASE, SOURCE, ["mlp_out", "attn_in"])
    order = list(range(len(cells)))[::-1]
    fwd, _ = sweep_interchange(llama, base_ids, source_ids, cells, batch_size=5)
    rev, _ = sweep_interchange(llama, base_ids, source_ids, [cells[i] for i in order],
                               batch_size=5)
    assert torch.allclose(rev, fwd[order], atol=F32_ATOL)


def test_patching_base_own_activations_returns_clean(lm):
    base_ids, source_ids, cells = _grid(lm, BASE, BASE)
    clean = lm.model(input_ids=base_ids).logits[0, -1].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = sweep_interchange(lm, base_ids, source_ids, cells, batch_size=8,
                                   skip_noops=False)
    assert (got - clean).abs().max().item() <= F32_ATOL
    # and through the whole experiment: every record is the clean probability
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = run_interchange(lm, BASE, BASE, TOKENS, ["mlp_out", "attn_in"], "all", "all",
                                  attribution=False, progress=False)
    p_clean = {a["token"]: a["p_base"] for a in payload["answers"]}
    assert all(abs(r["prob"] - p_clean[r["token"]]) <= 1e-6 for r in payload["records"])


def test_noop_rows_are_detected_exactly(llama):
    """Positions before the first differing token patch in the base's own values: the engine
    answers them with the clean run, bit for bit, without running them."""
    from lib.core.engine import Engine
    from lib.studies.interchange import grid_contexts

    base_ids, source_ids, cells = _grid(llama, BASE, SHARED, ["mlp_out", "attn_in"])
    engine = Engine(llama, grid_contexts(base_ids, source_ids))
    out = engine.run(interchange_rows(cells))
    differs = int((base_ids != source_ids)[0].nonzero()[0])
    assert engine.stats["rows_noop"] == 2 * llama.n_layers * differs
    clean = engine.clean_readout(0)
    same = [i for i, c in enumerate(cells) if c[2] < differs]
    assert torch.equal(out[same], clean.expand(len(same), -1))


def test_length_mismatch_error_shows_both_tokenizations(llama):
    with pytest.raises(TokenizationMismatchError) as err:
        align_prompts(llama, "The cat", "The cats")
    msg = str(err.value)
    assert "same length" in msg
    assert str(llama.token_strings(llama.tokenizer("The cat")["input_ids"])) in msg
    assert str(llama.token_strings(llama.tokenizer("The cats")["input_ids"])) in msg
    with pytest.raises(TokenizationMismatchError):
        run_interchange(llama, "The cat", "The cats", TOKENS, progress=False)


def test_answer_token_must_be_one_token(llama):
    with pytest.raises(ValueError, match="2 tokens"):
        run_interchange(llama, BASE, SOURCE, ["xy", "z"], progress=False)


def test_node_order():  # parameter parsing: tests/test_params.py
    assert node_order(["mlp_out", "attn_in"], [0, 1]) == ["a0", "f0", "a1", "f1"]
    assert node_order(["resid_pre", "embed"], [2]) == ["embed", "resid_pre2"]


@pytest.mark.parametrize("flavour,rel", [("tiny-random-gpt2", 1e-6), ("tiny-random-llama", 5e-3)])
def test_attribution_matches_finite_differences(flavour, rel):
    """(a_s - a_b) . dm/da equals d/de m(a_b + e (a_s - a_b)) at e = 0. In float64; Llama's
    RMSNorm computes in float32 even then, hence its looser tolerance."""
    lm = load_model(flavour)
    lm.model.double()
    lm.dtype = torch.float64
    base_ids, source_ids = align_prompts(lm, BASE, SOURCE)
    target = 120
    metrics = {"logit": lambda z: z[target], "prob": lambda z: z.softmax(-1)[target]}
    sites = ["embed", site_name("attn_in", 0), site_name("mlp_out", 0),
             site_name("resid_pre", 1), site_name("head_out", 1), site_name("mlp_out", 1)]
    est, delta_norm, clean = attribution_patching(lm, base_ids, source_ids, sites, metrics)
    _, base_cache = run_with_cache(lm, base_ids, sites)
    _, src_cache = run_with_cache(lm, source_ids, sites)

    def metric_at(site, pos, eps, name):
        a_b, a_s = base_cache[site][:, [pos]], src_cache[site][:, [pos]]
        value = (a_b + eps * (a_s - a_b)).to(torch.float64)
        with patch(lm, [Intervention(site, positions=(pos,), value=value)]), torch.no_grad():
            z = lm.model(input_ids=base_ids).logits[0, -1]
        return float(metrics[name](z))

    eps = 1e-5 if rel < 1e-4 else 1e-3
    checked = 0
    for name in metrics:
        for site in sites:
            for pos in (0, 4, base_ids.shape[1] - 1):
                fd = (metric_at(site, pos, eps, name) - metric_at(site, pos, -eps, name)) / (2 * eps)
                got = float(est[name][site][pos])
                assert got == pytest.approx(fd, rel=rel, abs=1e-9), (name, site, pos)
                checked += abs(fd) > 1e-6
    assert checked > 10  # the estimates are not all zero
    assert clean["logit"] == pytest.approx(
        float(lm.model(input_ids=base_ids).logits[0, -1, target]), abs=1e-9)
    # no-op positions (same activation in base and source) get exactly 0
    est2, dn2, _ = attribution_patching(lm, base_ids, base_ids, sites, metrics)
    assert all(float(est2[m][s].abs().max()) == 0.0 for m in metrics for s in sites)
    assert all(float(dn2[s].abs().max()) == 0.0 for s in sites)


def test_attribution_is_exact_for_the_logit_at_a_linear_site():
    """Without the final norm, the logits are linear in the last block's output, so the
    estimate of a resid_post patch on a logit equals the exact patching effect."""
    lm = load_model("tiny-random-llama")
    lm.model.double()
    lm.dtype = torch.float64
    norm_path = lm.spec.final_norm_path.split(".")
    parent = lm.model.get_submodule(".".join(norm_path[:-1]))
    saved = getattr(parent, norm_path[-1])
    setattr(parent, norm_path[-1], torch.nn.Identity())
    try:
        base_ids, source_ids = align_prompts(lm, BASE, SOURCE)
        site = site_name("resid_post", lm.n_layers - 1)
        metrics = {"logit": lambda z: z[120] - z[77]}
        est, _, clean = attribution_patching(lm, base_ids, source_ids, [site], metrics)
        _, src = run_with_cache(lm, source_ids, [site])
        last = base_ids.shape[1] - 1
        with patch(lm, [Intervention(site, positions=(last,), value=src[site][:, [last]])]), \
                torch.no_grad():
            z = lm.model(input_ids=base_ids).logits[0, -1]
        exact = float(metrics["logit"](z)) - clean["logit"]
        assert abs(exact) > 1e-3
        assert float(est["logit"][site][last]) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    finally:
        setattr(parent, norm_path[-1], saved)


def test_correlations():
    c = correlations([1, 2, 3, 4], [2, 4, 6, 9])
    assert c["n"] == 4 and c["pearson"] > 0.98 and c["spearman"] == pytest.approx(1.0)
    assert correlations([0, 0, 0], [1, 2, 3])["pearson"] is None
    with pytest.raises(ValueError, match="differ in length"):
        correlations([1, 2], [1])


@pytest.fixture(scope="module")
def payload(llama):
    return run_interchange(llama, BASE, SHARED, TOKENS, "mlp_out,attn_in", "all", "all",
                           batch_size=6, progress=False)


def test_records_schema_and_json_round_trip(llama, payload, tmp_path):
    n_pos = len(payload["base"]["tokens"])
    assert payload["positions"] == list(range(n_pos))
    assert len(payload["records"]) == 2 * llama.n_layers * n_pos * len(TOKENS)
    for rec in payload["records"]:
        assert set(rec) == set(RECORD_KEYS)
        assert 0.0 <= rec["prob"] <= 1.0
        assert rec["node"] == ("a" if rec["component"] == "attn_in" else "f") + str(rec["layer"])
    cells = {(r["component"], r["layer"], r["position"], r["token"]) for r in payload["records"]}
    assert len(cells) == len(payload["records"])
    assert payload["nodes"] == ["a0", "f0", "a1", "f1"]
    for side in ("base", "source"):
        top = payload[side]["top"]
        assert [t["rank"] for t in top] == list(range(1, 11))
        assert all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))
    assert [a["token"] for a in payload["answers"]] == TOKENS
    att = payload["attribution"]
    assert set(att["metrics"]) == {"p(x)", "p(y)", "logit_diff"}
    assert len(att["records"]) == 2 * llama.n_layers * n_pos * 3
    assert all(set(r) == set(ATTRIBUTION_KEYS) for r in att["records"])
    for corr in att["correlation"].values():
        assert set(corr) == {"all_cells", "changed_cells"}
        assert corr["all_cells"]["n"] == 2 * llama.n_layers * n_pos
    # exact effects are the grid's probabilities minus the clean ones
    p_clean = {a["token"]: a["p_base"] for a in payload["answers"]}
    by_cell = {(r["component"], r["layer"], r["position"], r["token"]): r["prob"]
               for r in payload["records"]}
    for r in att["records"]:
        if r["metric"] == "p(y)":
            key = (r["component"], r["layer"], r["position"], "y")
            assert r["exact"] == pytest.approx(by_cell[key] - p_clean["y"], abs=1e-7)
    # written with provenance, read back, found again only under the same parameters
    path = tmp_path / "interchange_test.json"
    key = {"MODEL": "tiny-random-llama", "BASE": BASE}
    payload = dict(payload, params_key=params_key(key))
    write_json(path, payload, provenance(llama, key, 0))
    back = read_json(path)
    assert back["provenance"]["model"]["name"] == "tiny-random-llama"
    assert back["records"] == [dict(r) for r in payload["records"]]
    assert read_current(path, key) is not None
    assert read_current(path, {**key, "BASE": "other"}) is None
    assert read_current(path, key, force=True) is None
    assert read_current(tmp_path / "missing.json", key) is None


def test_same_inputs_give_identical_results(llama, payload):
    again = run_interchange(llama, BASE, SHARED, TOKENS, "mlp_out,attn_in", "all", "all",
                            batch_size=6, progress=False)
    assert again == payload


def test_strongest_cells_and_figures(payload, tmp_path):
    from lib.plots import save_figure

    top = strongest_cells(payload, n=3)
    assert len(top) == 3 * len(TOKENS)
    assert abs(top[0]["change"]) >= abs(top[1]["change"]) >= abs(top[2]["change"])
    figures = {"heatmap": plot_heatmap(payload), "bars": plot_layer_bars(payload, -1),
               "attribution": plot_attribution(payload, "logit_diff"),
               "scatter": plot_attribution_scatter(payload)}
    for name, fig in figures.items():
        for path in save_figure(fig, name, "tiny", tmp_path, width=5, height=4, dpi=50):
            assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="unknown metric"):
        plot_attribution(payload, "nope")
