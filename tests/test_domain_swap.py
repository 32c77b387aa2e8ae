"""Last-token domain swaps, reverse intervention and token sets (lib.studies.domain_swap), plus the
figure functions (lib.plots.domain), on tiny random models."""

import json

import numpy as np
import pytest
import torch

from conftest import F32_ATOL
from lib.plots import domain as dp
from lib.studies import domain_swap as ds
from lib.core.interventions import Intervention
from lib.core.hooks import capture, patch
from lib.core.prompts import PromptPairs
from lib.core.sites import site_name

PAIRS = PromptPairs("code_prose", ("code", "prose"),
                    ("def f(x): return x", "int main() { return 0; }", "print(1)", "x = [i for i in y]"),
                    ("The river was calm", "A story about a dog.", "Hello there", "It rained all day long"))
TOKEN_IDS = ([ord(c) + 3 for c in "{}();"], [ord(c) + 3 for c in "aeiou"])  # byte ids + 3 specials


def test_swap_with_own_activation_changes_nothing(lm):
    same = PromptPairs("same", ("a", "b"), PAIRS.a, PAIRS.a)
    run = ds.run_pair(lm, same, range(lm.n_layers), token_ids=TOKEN_IDS, progress=False)
    for side in ds.SIDES:
        assert np.abs(run.swap[side]["kl"]).max() < F32_ATOL
        assert np.abs(run.delta("swap", side)).max() < F32_ATOL
        # the clean base masses do not depend on the side when A == B
    assert np.allclose(run.base["b_into_a"]["mass_a"], run.base["a_into_b"]["mass_a"], atol=F32_ATOL)


def test_batched_equals_naive_loop(lm):
    layers = list(range(lm.n_layers))
    fast = ds.run_pair(lm, PAIRS, layers, token_ids=TOKEN_IDS, zero=True, batch_size=5,
                       pairs_per_engine=3, progress=False)
    slow = ds.run_pair(lm, PAIRS, layers, token_ids=TOKEN_IDS, zero=True, naive=True,
                       progress=False)
    for kind in ("swap", "zero"):
        for side in ds.SIDES:
            for key in ("kl", "mass_a", "mass_b"):
                diff = np.abs(getattr(fast, kind)[side][key] - getattr(slow, kind)[side][key])
                assert diff.max() <= F32_ATOL, (kind, side, key, diff.max())
    for side in ds.SIDES:
        assert np.allclose(fast.base[side]["mass_a"], slow.base[side]["mass_a"], atol=F32_ATOL)
        # the interventions do something, and KL is non-negative
        assert fast.swap[side]["kl"].max() > 1e-3 and fast.zero[side]["kl"].max() > 1e-3
        assert fast.swap[side]["kl"].min() >= -1e-9
        for key in ("mass_a", "mass_b"):
            assert ((fast.swap[side][key] >= 0) & (fast.swap[side][key] <= 1)).all()


def test_injection_matches_a_full_forward(llama):
    lm = llama
    layer, alphas = 1, [0.0, 2.0]
    run = ds.run_pair(lm, PAIRS, [0, 1], ["mlp_out"], TOKEN_IDS, inject={"mlp_out": layer},
                      alphas=alphas, progress=False)
    site = site_name("mlp_out", layer)
    acts = {}
    for d, prompts in enumerate((PAIRS.a, PAIRS.b)):
        rows = []
        for text in prompts:
            ids = lm.tokenize(text)
            with capture(lm, [site], positions=[ids.shape[1] - 1]) as cache, torch.no_grad():
                lm.model(input_ids=ids)
            rows.append(cache[site][0, 0])
        acts[d] = torch.stack(rows).mean(0)
    vec = acts[1] - acts[0]
    assert run.inject_norms["mlp_out"] == pytest.approx(float(vec.norm()), rel=1e-5)
    assert np.abs(run.inject["b_into_a"]["kl"][:, 0, 0]).max() < F32_ATOL  # alpha = 0
    for i, text in enumerate(PAIRS.a):
        ids = lm.tokenize(text)
        last = ids.shape[1] - 1
        with torch.no_grad():
            base = torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
            with patch(lm, [Intervention(site, positions=(last,), kind="add", value=2.0 * vec)]):
                inj = torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
        kl = float((base * (base.log() - inj.log())).sum())
        mass_b = float(inj[TOKEN_IDS[1]].sum())
        assert run.inject["b_into_a"]["kl"][i, 0, 1] == pytest.approx(kl, abs=F32_ATOL)
        assert run.inject["b_into_a"]["mass_b"][i, 0, 1] == pytest.approx(mass_b, abs=F32_ATOL)
    assert run.inject["b_into_a"]["kl"][:, 0, 1].mean() > 1e-3


def test_reverse_intervention_scores_are_mean_probability_changes(llama):
    lm = llama
    one = PromptPairs("one", ("a", "b"), PAIRS.a[:2], PAIRS.b[:2])
    floor = 1e-3  # high enough that the tiny model's flat distribution crosses it
    run = ds.run_pair(lm, one, [1], ["attn_out"], accumulate_dprob=True, prob_floor=floor,
                      progress=False)
    score_a, score_b = ds.reverse_intervention_scores(run, "dprob")
    log_a, log_b = ds.reverse_intervention_scores(run, "dlogp")
    ref_a, ref_b = ds.reference_scores(run)
    site = site_name("attn_out", 1)
    expect_b, expect_log_b, expect_ref_b = (torch.zeros_like(score_b) for _ in range(3))

    def floored(p):
        return p.clamp_min(floor).log()

    for i in range(2):
        ids_a, ids_b = lm.tokenize(one.a[i]), lm.tokenize(one.b[i])
        with torch.no_grad():
            with capture(lm, [site]) as cache:
                clean_b = torch.softmax(lm.model(input_ids=ids_b).logits[0, -1].double(), -1)
            src = cache[site][:, -1:]
            base = torch.softmax(lm.model(input_ids=ids_a).logits[0, -1].double(), -1)
            with patch(lm, [Intervention(site, positions=(ids_a.shape[1] - 1,), value=src)]):
                swapped = torch.softmax(lm.model(input_ids=ids_a).logits[0, -1].double(), -1)
        expect_b += (swapped - base) / 2
        expect_log_b += (floored(swapped) - floored(base)) / 2
        expect_ref_b += (floored(clean_b) - floored(base)) / 2
    assert (score_b - expect_b).abs().max() < F32_ATOL
    assert abs(float(score_a.sum())) < 1e-9 and abs(float(score_b.sum())) < 1e-9
    assert score_b.abs().max() > 1e-4
    assert (log_b - expect_log_b).abs().max() < F32_ATOL and log_b.abs().max() > 1e-3
    assert not torch.equal(log_a, -log_b)  # two sides, two different runs
    assert (ref_b - expect_ref_b).abs().max() < F32_ATOL and torch.equal(ref_a, -ref_b)
    with pytest.raises(ValueError, match="SCORE"):
        ds.reverse_intervention_scores(run, "rank")


def test_select_token_sets_disjoint_ranked_and_refilled():
    a = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, -0.1, 0.6, 0.0])
    b = torch.tensor([0.1, 0.8, 0.7, 0.2, 0.1, 0.3, 0.05, 0.0])
    top_a, top_b = ds.select_token_sets(a, b, top_n=3, exclude_ids=[6])
    ids_a, ids_b = [i for i, _ in top_a], [i for i, _ in top_b]
    assert ids_a == [0, 3, 4]  # 1 and 2 score higher for B; 6 is excluded
    assert ids_b == [1, 2, 5]  # 5 has a negative A score; 7 was promoted by neither
    assert not set(ids_a) & set(ids_b)
    assert [s for _, s in top_a] == sorted((s for _, s in top_a), reverse=True)
    assert all(s > 0 for _, s in top_a + top_b)
    short_a, _ = ds.select_token_sets(a, b, top_n=50)
    assert [i for i, _ in short_a] == [0, 6, 3, 4]  # only four tokens are A's
    with pytest.raises(ValueError, match="top_n"):
        ds.select_token_sets(a, b, 0)


def test_token_set_unit_on_tiny_model(llama):
    unit = ds.token_set_unit(llama, PAIRS, [0, 1], top_n=8, progress=False, seed=3)
    assert unit["n_prompts"] == 4 and set(unit["scores"]) == set(ds.SCORES)
    split = unit["split"]
    assert len(split["discovery"]) == len(split["held_out"]) == 2 and split["seed"] == 3
    assert sorted(split["discovery"] + split["held_out"]) == [0, 1, 2, 3]
    for found in [unit["scores"][s] for s in ds.SCORES] + [unit["reference"]]:
        sets = found["sets"]
        assert set(sets) == {"code", "prose"}
        ids = [{e["id"] for e in sets[d]} for d in ("code", "prose")]
        assert len(ids[0]) == len(sets["code"]) == 8 and len(ids[1]) == 8
        assert not ids[0] & ids[1]
        assert not (ids[0] | ids[1]) & set(llama.tokenizer.all_special_ids)
        for e in sets["code"] + sets["prose"]:
            assert e["score"] > 0 and e["token"] == llama.tokenizer.decode([e["id"]])
            assert 0 < e["clean_p"] < 1
    # the sets come from the discovery half alone
    alone = ds.run_pair(llama, PAIRS.select(split["discovery"]), [0, 1], accumulate_dprob=True,
                        progress=False)
    top_a, _ = ds.select_token_sets(*ds.reverse_intervention_scores(alone), 8,
                                    llama.tokenizer.all_special_ids)
    assert [i for i, _ in top_a] == [e["id"] for e in unit["scores"]["dlogp"]["sets"]["code"]]
    chosen = ds.assign_token_sets(unit)
    assert chosen["sets"] == unit["scores"]["dlogp"]["sets"]
    agreement = chosen["agreement"]
    for score in ds.SCORES:
        for assignment in ds.ASSIGNMENTS:
            js = agreement[score][assignment]
            assert 0 <= js["code"] <= 1 and js["mean"] == pytest.approx((js["code"] + js["prose"]) / 2)


def test_split_pairs_is_seeded_exact_and_recognised_in_any_selection():
    six = PromptPairs("six", ("a", "b"), tuple(f"a{i}" for i in range(6)),
                      tuple(f"b{i}" for i in range(6)))
    split = ds.split_pairs(six, 0.5, seed=1)
    assert split == ds.split_pairs(six, 0.5, seed=1)
    assert split["discovery"] != ds.split_pairs(six, 0.5, seed=2)["discovery"] or \
        split["discovery"] != ds.split_pairs(six, 0.5, seed=5)["discovery"]
    assert len(split["held_out"]) == 3 and not set(split["discovery"]) & set(split["held_out"])
    assert len(ds.split_pairs(six, 1 / 3)["held_out"]) == 2
    sets = {"model": "m", "split": {"six": split}}
    held, idx, found_on = ds.held_out_pairs(sets, six)
    assert idx == split["held_out"] and held.a == tuple(six.a[i] for i in idx)
    assert found_on.a == tuple(six.a[i] for i in split["discovery"])
    # a longer file (new pairs appended): the new pairs are held out too
    longer = PromptPairs("six", ("a", "b"), six.a + ("a6",), six.b + ("b6",))
    assert ds.held_out_pairs(sets, longer)[1] == split["held_out"] + [6]
    with pytest.raises(ds.TokenSetMissingError, match="no discovery/held-out split"):
        ds.held_out_pairs({"model": "m", "split": {}}, six)
    with pytest.raises(ValueError, match="every selected pair was used"):
        ds.held_out_pairs(sets, six.select(split["discovery"]))
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="HELD_OUT_FRACTION"):
            ds.split_pairs(six, bad)
    with pytest.raises(ValueError, match="cannot be split"):
        ds.split_pairs(six.select([0]), 0.5)


def test_jaccard():
    assert ds.jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert ds.jaccard([], []) is None and ds.jaccard([1], []) == 0


def _depth_run(seed: int, swap_of=None):
    """A synthetic PairRun over 20 layers: separability = depth + noise, the component's
    importance (zero-ablation KL) = depth + other noise, the swap KL half of it unless
    ``swap_of(zero_kl, sep)`` says otherwise."""
    rng = np.random.default_rng(seed)
    n, layers = 12, list(range(20))
    depth = np.array(layers, dtype=float)
    sep = depth + rng.normal(0, 2.0, len(layers))
    importance = 10 + depth + rng.normal(0, 2.0, len(layers))
    zero_kl = 2 * importance[None, None, :] * np.ones((n, 1, 1))
    swap_kl = (zero_kl / 2 * (1 + rng.normal(0, 0.05, (n, 1, len(layers)))) if swap_of is None
               else swap_of(zero_kl, sep))
    run = ds.PairRun("t", ("a", "b"), layers, ["mlp_out"], n)
    for side in ds.SIDES:
        run.swap[side], run.zero[side], run.base[side] = {"kl": swap_kl}, {"kl": zero_kl}, {}
    scores = {l: float(v) for l, v in zip(layers, sep)}
    top, bottom = ds.top_bottom(ds.rank_layers(scores), 5)
    raw = ds._spearman_block(run, "swap", 0, scores)["both"]["kl"]
    return raw, ds._depth_control(run, 0, scores, top, bottom, 50, 200, 0)["both"]["kl"]


def test_depth_control_separates_separability_from_depth():
    """Effect and separability both grow with depth (and with nothing else in common): the raw ρ
    is large every time, the partial ρ given the layer rejects at about its nominal rate. When
    the swap follows separability beyond depth or beyond zero ablation, the controls find it."""
    rejections = 0
    for seed in range(40):
        raw, dc = _depth_run(seed)
        assert raw["rho"] > 0.8 and raw["p_value"] < 1e-4
        assert dc["partial_given_layer"]["df"] == 17
        rejections += dc["partial_given_layer"]["p_value"] < 0.05
    assert rejections <= 6  # nominal 5 % of 40 = 2; measured 7 % over 200 seeds
    # the swap relative to zero ablation follows separability: the relative controls find it
    _, dc = _depth_run(0, lambda zero_kl, sep: zero_kl * (1 + 0.05 * sep)[None, None, :] / 2)
    assert dc["ratio_to_zero"]["rho"] == pytest.approx(1.0)
    assert dc["relative_top_vs_bottom"]["diff"]["mean"] > 0.05
    assert dc["relative_top_vs_bottom"]["p_value"] < 0.05
    assert dc["partial_given_zero"]["rho"] > 0.5 and dc["partial_given_zero"]["p_value"] < 0.01
    # the swap follows the part of separability that depth does not explain: the partial finds it
    _, dc = _depth_run(0, lambda zero_kl, sep: zero_kl / 2 * np.exp(
        0.5 * (sep - np.arange(20.0)))[None, None, :])
    assert dc["partial_given_layer"]["rho"] > 0.5 and dc["partial_given_layer"]["p_value"] < 0.01


def test_load_token_sets_errors(tmp_path):
    with pytest.raises(ds.TokenSetMissingError,
                       match="token set missing for model smollm2-135m: run 01_reverse_intervention"):
        ds.load_token_sets("smollm2-135m", tmp_path)
    path = ds.token_sets_path("gemma3-270m", tmp_path)
    path.write_text(json.dumps({"model": "smollm2-135m", "top_n": 1, "pairs": {}}))
    with pytest.raises(ValueError, match="belong to one tokenizer"):
        ds.load_token_sets("gemma3-270m", tmp_path)
    path.write_text(json.dumps({"model": "gemma3-270m", "top_n": 1,
                                "pairs": {"p_q": {"p": [{"id": 3, "token": "x", "score": 0.1}],
                                                  "q": []}}}))
    sets = ds.load_token_sets("gemma3-270m", tmp_path)
    assert ds.token_set_ids(sets, "p_q", "p") == [3]
    with pytest.raises(ValueError, match="empty"):
        ds.token_set_ids(sets, "p_q", "q")
    with pytest.raises(ds.TokenSetMissingError, match="no pair 'cpp_python'"):
        ds.token_set_ids(sets, "cpp_python", "cpp")


def fake_scores(model, pair, layers, seed=0):
    rng = np.random.default_rng(seed)
    return {"model": model, "components": ["attn_out", "mlp_out"], "metrics": ["fisher"],
            "layers": list(layers), "n_prompts": None,
            "comparisons": [{"name": pair, "domain_a": "a", "domain_b": "b", "kind": "pair",
                             "n_a": 4, "n_b": 4,
                             "scores": {c: {"fisher": rng.random(len(layers)).tolist()}
                                        for c in ("attn_out", "mlp_out")}}]}


def test_scores_lookup_ranking_and_errors(tmp_path):
    with pytest.raises(ds.ScoresMissingError, match="run 00_layer_scores"):
        ds.load_scores("smollm2-135m", tmp_path)
    scores = fake_scores("m", "code_prose", [0, 1, 2, 3, 4])
    scores["comparisons"][0]["scores"]["attn_out"]["fisher"] = [0.5, 3.0, None, 1.0, 2.0]
    table = ds.pair_layer_scores(scores, "code_prose", "attn_out", "fisher")
    assert table == {0: 0.5, 1: 3.0, 3: 1.0, 4: 2.0}
    assert ds.rank_layers(table) == [1, 4, 3, 0]
    assert ds.rank_layers(table, [0, 3, 4]) == [4, 3, 0]
    assert ds.top_bottom([1, 4, 3, 0], 5) == ([1, 4], [0, 3])  # k shrinks; bottom = least first
    with pytest.raises(ValueError, match="at least two"):
        ds.top_bottom([1], 1)
    with pytest.raises(ds.ScoresMissingError, match="no 'pair' comparison 'cpp_python'"):
        ds.pair_layer_scores(scores, "cpp_python", "attn_out", "fisher")
    with pytest.raises(ds.ScoresMissingError, match="metric 'mmd'"):
        ds.pair_layer_scores(scores, "code_prose", "attn_out", "mmd")





def test_one_swap_equals_the_seed_algorithm_by_hand(llama):
    """Capture B's last-token MLP output in B's own run, patch it into A's last token, KL(A || A
    swapped): the seed's cross-swap, written out with lib.core.hooks."""
    from lib.core.hooks import capture, patch

    one = PAIRS.head(1)
    layer = 1
    site = site_name("mlp_out", layer)
    run = ds.run_pair(llama, one, [layer], ["mlp_out"], TOKEN_IDS, progress=False)
    ids_a, ids_b = llama.tokenize(one.a[0]), llama.tokenize(one.b[0])
    with torch.no_grad():
        with capture(llama, [site]) as cache:
            llama.model(input_ids=ids_b)
        base = llama.model(input_ids=ids_a).logits[0, -1].double()
        last = ids_a.shape[1] - 1
        with patch(llama, [Intervention(site, positions=(last,), value=cache[site][:, -1:])]):
            swapped = llama.model(input_ids=ids_a).logits[0, -1].double()
    p, q = base.log_softmax(-1), swapped.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())
    assert run.swap["b_into_a"]["kl"][0, 0, 0] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert kl > 1e-4


@pytest.fixture(scope="module")
def unit(llama):
    scores = fake_scores(llama.name, PAIRS.name, range(llama.n_layers))
    sets = {"model": llama.name, "top_n": 5, "pairs": {PAIRS.name: {
        "code": [{"id": i, "token": chr(i - 3), "score": 0.1} for i in TOKEN_IDS[0]],
        "prose": [{"id": i, "token": chr(i - 3), "score": 0.1} for i in TOKEN_IDS[1]]}},
        "split": {PAIRS.name: ds.split_pairs(PAIRS, 0.5, seed=0)}}
    return ds.full_compute_unit(llama, PAIRS, [0, 1], sets, scores, k=1, alphas=[0, 1],
                                n_bootstrap=200, n_permutations=200, progress=False)


def test_full_compute_unit_schema(unit):
    held_out = ds.split_pairs(PAIRS, 0.5, seed=0)["held_out"]
    assert unit["domains"] == ["code", "prose"] and unit["n_prompts"] == 2
    assert unit["evaluated_pairs"] == held_out
    for comp in ("attn_out", "mlp_out"):
        assert len(unit["top_layers"][comp]) == len(unit["bottom_layers"][comp]) == 1
        assert not set(unit["top_layers"][comp]) & set(unit["bottom_layers"][comp])
        block = unit["swap"][comp]
        assert [e["layer"] for e in block["per_layer"]] == [0, 1]
        for entry in block["per_layer"]:
            for side in ds.SIDES:
                s = entry["sides"][side]
                assert s["kl"]["n"] == 2 and s["kl"]["mean"] >= 0
                assert s["kl"]["ci_low"] <= s["kl"]["mean"] <= s["kl"]["ci_high"]
                for m in ("mass_a_before", "mass_a_after", "mass_b_before", "mass_b_after"):
                    assert 0 <= s[m]["mean"] <= 1
                expect = ((s["mass_b_after"]["mean"] - s["mass_a_after"]["mean"])
                          - (s["mass_b_before"]["mean"] - s["mass_a_before"]["mean"]))
                assert s["delta"]["mean"] == pytest.approx(expect, abs=1e-9)
        tvb = block["top_vs_bottom"]
        for side in (*ds.SIDES, "both"):
            for effect in ("kl", "abs_delta"):
                assert 0 < tvb[side][effect]["p_value"] <= 1
        assert set(block["spearman"]["both"]) == {"kl", "abs_delta"}
        dc = block["depth_control"]["both"]["kl"]
        assert set(dc) == {"partial_given_layer", "partial_given_zero", "ratio_to_zero",
                           "relative_top_vs_bottom"}
        assert dc["partial_given_layer"]["rho"] is None  # two layers: undefined, not made up
        assert 0 < dc["relative_top_vs_bottom"]["p_value"] <= 1
        inj = unit["injection"][comp]
        assert inj["layer"] == unit["layer_ranking"][comp][0]
        assert [r["alpha"] for r in inj["sides"]["b_into_a"]] == [0.0, 1.0]
        assert abs(inj["sides"]["b_into_a"][0]["delta"]["mean"]) < 1e-6
        assert len(unit["zero_ablation"][comp]["per_layer"]) == 2


def test_plots_return_figures(unit, tmp_path):
    from plotnine import ggplot

    from lib.plots import save_figure

    result = {"model": "tiny", "metric": "fisher", "components": ["attn_out", "mlp_out"],
              "pairs": {PAIRS.name: unit}}
    figs = [dp.plot_top_vs_bottom(result, "attn_out"),
            dp.plot_layer_comparison(result, "mlp_out", PAIRS.name),
            dp.plot_effect_vs_separability(result, "kl"),
            dp.plot_effect_vs_separability(result, "abs_delta", "b_into_a"),
            dp.plot_kl_curves(result), dp.plot_bias_curves(result), dp.plot_injection(result),
            dp.plot_all_models({"tiny": result, "tiny2": {**result, "model": "tiny2"}}),
            dp.plot_spearman_all_models({"tiny": result}, "abs_delta")]
    assert all(isinstance(f, ggplot) for f in figs)
    written = save_figure(figs[0], "attn_comparison", "tiny", tmp_path)
    assert all(p.stat().st_size > 0 for p in written)
    table = dp.summary_table(result)
    assert list(table["component"]) == ["attn_out", "mlp_out"]
    claims = dp.claim_table(result)
    assert list(claims["component"]) == ["attn_out", "mlp_out"]
    assert "survives_depth_control" in claims and "partial_given_layer_p" in claims
    with pytest.raises(dp.NoResultsError, match="at least four"):
        dp.plot_depth_control(result)  # two layers: every correlation is undefined


def test_depth_control_figure_and_claims_on_twenty_layers():
    from plotnine import ggplot

    rng = np.random.default_rng(0)
    layers = list(range(20))
    sep = {l: l + float(rng.normal(0, 2)) for l in layers}
    run = ds.PairRun("t", ("a", "b"), layers, ["mlp_out"], 12)
    kl = (10 + np.arange(20.0))[None, None, :] * (1 + rng.normal(0, 0.05, (12, 1, 20)))
    for side in ds.SIDES:
        run.swap[side], run.zero[side], run.base[side] = {"kl": kl / 2}, {"kl": kl}, {}
    unit = ds.summarize_pair(run, {"mlp_out": sep}, 5, 50, 200, 0)
    result = {"model": "synthetic", "pairs": {"t": unit}}
    assert isinstance(dp.plot_depth_control(result), ggplot)
    claims = dp.claim_table(result).iloc[0]
    assert claims["top_vs_bottom"] and claims["spearman"]        # late layers matter more ...
    assert not claims["partial_given_layer"]                     # ... and that is all
    assert not claims["survives_depth_control"]
    with pytest.raises(dp.NoResultsError, match="no pairs"):
        dp.plot_kl_curves({"model": "x", "pairs": {}})
    with pytest.raises(dp.NoResultsError):
        dp.plot_all_models({})


def test_assign_token_sets_base_exchanges_the_lists_and_measures_agreement():
    def entries(*ids):
        return [{"id": i, "token": str(i), "score": 0.1} for i in ids]

    unit = {"domains": ["p", "q"], "n_prompts": 4, "split": {"seed": 0},
            "scores": {"dlogp": {"sets": {"p": entries(1, 2), "q": entries(3)},
                                 "n_candidates": {"p": 3, "q": 5}},
                       "dprob": {"sets": {"p": entries(7), "q": entries(8)},
                                 "n_candidates": {"p": 1, "q": 1}}},
            "reference": {"sets": {"p": entries(1, 4), "q": entries(3)}}}
    source = ds.assign_token_sets(unit, "dlogp", "source")
    assert source["sets"] == unit["scores"]["dlogp"]["sets"]
    base = ds.assign_token_sets(unit, "dlogp", "base")
    assert base["sets"] == {"p": entries(3), "q": entries(1, 2)}
    assert base["n_candidates"] == {"p": 5, "q": 3}
    assert unit["scores"]["dlogp"]["n_candidates"]["p"] == 3  # the unit is not changed
    ag = source["agreement"]
    assert ag["dlogp"]["source"] == {"p": 1 / 3, "q": 1.0, "mean": pytest.approx(2 / 3)}
    assert ag["dlogp"]["base"] == {"p": 0.0, "q": 0.0, "mean": 0.0}
    assert ag["dprob"]["source"]["mean"] == 0.0
    assert ds.assign_token_sets(unit, "dprob")["sets"] == unit["scores"]["dprob"]["sets"]
    with pytest.raises(ValueError, match="ASSIGNMENT"):
        ds.assign_token_sets(unit, "dlogp", "target")
    with pytest.raises(ValueError, match="SCORE"):
        ds.assign_token_sets(unit, "rank")


def test_row_metrics_equal_their_definitions():
    """KL(base || row) and token-set masses from one log-sum-exp per row equal the textbook
    formulas on full float64 softmaxes, also for peaked and far-apart logits."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 8.0, 30.0]).repeat(24)[:70, None]
    logits = torch.randn(70, 500, generator=gen) * scale
    logits[5, 7] += 60.0
    ids_a, ids_b = torch.tensor([1, 7, 30]), torch.tensor([2, 499])
    got = ds._row_metrics(logits, ids_a, ids_b, keep_probs=True, chunk=16)
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    kl = (p[0] * (logp[0] - logp)).sum(-1)
    assert torch.allclose(got["kl"], kl, rtol=0, atol=1e-12)
    assert float(got["kl"].min()) >= -1e-12 and float(got["kl"][0]) == pytest.approx(0, abs=1e-12)
    assert torch.allclose(got["mass_a"], p[:, ids_a].sum(-1), rtol=0, atol=1e-12)
    assert torch.allclose(got["mass_b"], p[:, ids_b].sum(-1), rtol=0, atol=1e-12)
    assert torch.allclose(got["probs"], p, rtol=0, atol=1e-12)
