"""Last-token domain swaps, reverse intervention and token sets (lib.domain_swap), plus the
figure functions (lib.plots.domain), on tiny random models."""

import json

import numpy as np
import pytest
import torch

from lib.plots import domain as dp
from lib import domain_swap as ds
from lib.hooks import Intervention, capture, patch
from lib.prompts import PromptPairs
from lib.sites import site_name

PAIRS = PromptPairs("code_prose", ("code", "prose"),
                    ("def f(x): return x", "int main() { return 0; }", "print(1)", "x = [i for i in y]"),
                    ("The river was calm", "A story about a dog.", "Hello there", "It rained all day long"))
TOKEN_IDS = ([ord(c) + 3 for c in "{}();"], [ord(c) + 3 for c in "aeiou"])  # byte ids + 3 specials


def test_swap_with_own_activation_changes_nothing(lm):
    same = PromptPairs("same", ("a", "b"), PAIRS.a, PAIRS.a)
    run = ds.run_pair(lm, same, range(lm.n_layers), token_ids=TOKEN_IDS, progress=False)
    for side in ds.SIDES:
        assert np.abs(run.swap[side]["kl"]).max() < 1e-6
        assert np.abs(run.delta("swap", side)).max() < 1e-6
        # the clean base masses do not depend on the side when A == B
    assert np.allclose(run.base["b_into_a"]["mass_a"], run.base["a_into_b"]["mass_a"], atol=1e-6)


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
                assert diff.max() <= 1e-5, (kind, side, key, diff.max())
    for side in ds.SIDES:
        assert np.allclose(fast.base[side]["mass_a"], slow.base[side]["mass_a"], atol=1e-6)
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
    assert np.abs(run.inject["b_into_a"]["kl"][:, 0, 0]).max() < 1e-6  # alpha = 0
    for i, text in enumerate(PAIRS.a):
        ids = lm.tokenize(text)
        last = ids.shape[1] - 1
        with torch.no_grad():
            base = torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
            with patch(lm, [Intervention(site, positions=(last,), kind="add", value=2.0 * vec)]):
                inj = torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
        kl = float((base * (base.log() - inj.log())).sum())
        mass_b = float(inj[TOKEN_IDS[1]].sum())
        assert run.inject["b_into_a"]["kl"][i, 0, 1] == pytest.approx(kl, abs=1e-5)
        assert run.inject["b_into_a"]["mass_b"][i, 0, 1] == pytest.approx(mass_b, abs=1e-6)
    assert run.inject["b_into_a"]["kl"][:, 0, 1].mean() > 1e-3


def test_reverse_intervention_scores_are_mean_probability_changes(llama):
    lm = llama
    one = PromptPairs("one", ("a", "b"), PAIRS.a[:2], PAIRS.b[:2])
    run = ds.run_pair(lm, one, [1], ["attn_out"], accumulate_dprob=True, progress=False)
    score_a, score_b = ds.reverse_intervention_scores(run)
    site = site_name("attn_out", 1)
    expect_b = torch.zeros_like(score_b)
    for i in range(2):
        ids_a, ids_b = lm.tokenize(one.a[i]), lm.tokenize(one.b[i])
        with torch.no_grad():
            with capture(lm, [site]) as cache:
                lm.model(input_ids=ids_b)
            src = cache[site][:, -1:]
            base = torch.softmax(lm.model(input_ids=ids_a).logits[0, -1].double(), -1)
            with patch(lm, [Intervention(site, positions=(ids_a.shape[1] - 1,), value=src)]):
                swapped = torch.softmax(lm.model(input_ids=ids_a).logits[0, -1].double(), -1)
        expect_b += (swapped - base) / 2
    assert (score_b - expect_b).abs().max() < 1e-6
    assert abs(float(score_a.sum())) < 1e-9 and abs(float(score_b.sum())) < 1e-9
    assert score_b.abs().max() > 1e-4


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
    unit = ds.token_set_unit(llama, PAIRS, [0, 1], top_n=8, progress=False)
    sets = unit["sets"]
    assert set(sets) == {"code", "prose"} and unit["n_prompts"] == 4
    ids = [{e["id"] for e in sets[d]} for d in ("code", "prose")]
    assert len(ids[0]) == len(sets["code"]) == 8 and len(ids[1]) == 8
    assert not ids[0] & ids[1]
    assert not (ids[0] | ids[1]) & set(llama.tokenizer.all_special_ids)
    for e in sets["code"] + sets["prose"]:
        assert e["score"] > 0 and e["token"] == llama.tokenizer.decode([e["id"]])


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
    swapped): the seed's cross-swap, written out with lib.hooks."""
    from lib.hooks import capture, patch

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
        "prose": [{"id": i, "token": chr(i - 3), "score": 0.1} for i in TOKEN_IDS[1]]}}}
    return ds.full_compute_unit(llama, PAIRS, [0, 1], sets, scores, k=1, alphas=[0, 1],
                                n_bootstrap=200, n_permutations=200, progress=False)


def test_full_compute_unit_schema(unit):
    assert unit["domains"] == ["code", "prose"] and unit["n_prompts"] == 4
    for comp in ("attn_out", "mlp_out"):
        assert len(unit["top_layers"][comp]) == len(unit["bottom_layers"][comp]) == 1
        assert not set(unit["top_layers"][comp]) & set(unit["bottom_layers"][comp])
        block = unit["swap"][comp]
        assert [e["layer"] for e in block["per_layer"]] == [0, 1]
        for entry in block["per_layer"]:
            for side in ds.SIDES:
                s = entry["sides"][side]
                assert s["kl"]["n"] == 4 and s["kl"]["mean"] >= 0
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
    with pytest.raises(dp.NoResultsError, match="no pairs"):
        dp.plot_kl_curves({"model": "x", "pairs": {}})
    with pytest.raises(dp.NoResultsError):
        dp.plot_all_models({})


def test_assign_token_sets_base_exchanges_the_lists():
    unit = {"domains": ["p", "q"], "n_prompts": 2, "n_candidates": {"p": 3, "q": 5},
            "sets": {"p": [{"id": 1, "token": "a", "score": 0.2}],
                     "q": [{"id": 2, "token": "b", "score": 0.1}]}}
    assert ds.assign_token_sets(unit, "source") == unit
    base = ds.assign_token_sets(unit, "base")
    assert base["sets"] == {"p": unit["sets"]["q"], "q": unit["sets"]["p"]}
    assert base["n_candidates"] == {"p": 5, "q": 3} and unit["n_candidates"]["p"] == 3
    with pytest.raises(ValueError, match="ASSIGNMENT"):
        ds.assign_token_sets(unit, "target")
