"""End-to-end: notebooks 01 (reverse intervention) -> 02 (cross swaps) -> 03 (graphs) on
smollm2-135m through the runner, every output folder in tmp_path. The separability scores come
from notebook 00 run with the same small parameters (or, if 00 is absent, a scores file written
here with the documented schema)."""

import json
import math

import numpy as np
import pytest

from lib.core import paths
from lib.runner import run_notebooks

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
N = 6
N_HELD = 3   # notebook 01 finds the token sets on half the pairs, 02 measures on the other half
LAYERS = [0, 10, 20, 29]
FILES = ["cpp_python.json", "finance_medical.json"]
PAIRS = {"cpp_python": ("cpp", "python"), "finance_medical": ("finance", "medical")}
K = 2
TOP_N = 20
NB = {n: paths.NOTEBOOKS / f"{n}.ipynb" for n in
      ("00_layer_scores", "01_reverse_intervention", "02_all_model_causal", "03_graph_generator")}


def write_scores(folder):
    """A scores file with the schema of notebook 00 (seeded random values)."""
    rng = np.random.default_rng(0)
    comps = [{"name": name, "domain_a": a, "domain_b": b, "kind": "pair", "n_a": N, "n_b": N,
              "scores": {c: {m: rng.random(len(LAYERS)).tolist()
                             for m in ("fisher", "mmd", "wasserstein")}
                         for c in ("attn_out", "mlp_out", "resid_post")}}
             for name, (a, b) in PAIRS.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODEL}.json").write_text(json.dumps({
        "model": MODEL, "components": ["attn_out", "mlp_out", "resid_post"],
        "metrics": ["fisher", "mmd", "wasserstein"], "layers": LAYERS, "n_prompts": N,
        "comparisons": comps, "provenance": {}}))


def images_in(nb_path):
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return sum("image/png" in out.get("data", {}) for c in nb["cells"] for out in c.get("outputs", []))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb01_03")
    dirs = {"SCORES_DIR": tmp / "scores", "TOKEN_SETS_DIR": tmp / "token_sets",
            "FULL_COMPUTE_DIR": tmp / "full_compute", "GRAPHS_DIR": tmp / "graphs"}
    common = {"N_PROMPTS": N, "PROMPT_FILES": FILES, "LAYERS": ",".join(map(str, LAYERS))}
    if NB["00_layer_scores"].exists():
        run_notebooks([NB["00_layer_scores"]], [MODEL],
                      {**common, "SCORES_DIR": str(dirs["SCORES_DIR"]),
                       "GRAPHS_DIR": str(dirs["GRAPHS_DIR"]), "N_PROJECTIONS": 32, "N_FOLDS": 3},
                      runs_dir=tmp / "runs", progress=False)
    else:
        write_scores(dirs["SCORES_DIR"])
    params = {**common, "TOP_N": TOP_N, "K": K, "N_BOOTSTRAP": 300, "N_PERMUTATIONS": 500,
              "ALPHAS": [0, 1, 4], **{k: str(v) for k, v in dirs.items()}}
    executed = run_notebooks([NB[n] for n in ("01_reverse_intervention", "02_all_model_causal",
                                              "03_graph_generator")],
                             [MODEL], params, runs_dir=tmp / "runs", progress=False)
    return {"tmp": tmp, "dirs": dirs, "params": params, "executed": executed}


def test_token_sets(pipeline, smollm):
    data = json.loads((pipeline["dirs"]["TOKEN_SETS_DIR"] / f"{MODEL}.json").read_text())
    assert data["model"] == MODEL and data["top_n"] == TOP_N
    assert data["provenance"]["model"]["name"] == MODEL
    assert data["provenance"]["parameters"]["N_PROMPTS"] == N
    assert set(data["pairs"]) == set(PAIRS)
    special = set(smollm.tokenizer.all_special_ids)
    for name, (a, b) in PAIRS.items():
        sets = data["pairs"][name]
        assert set(sets) == {a, b}
        ids = {}
        for d in (a, b):
            entries = sets[d]
            assert 0 < len(entries) <= TOP_N
            scores = [e["score"] for e in entries]
            assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)
            for e in entries[:5]:
                assert e["token"] == smollm.tokenizer.decode([e["id"]])
            ids[d] = {e["id"] for e in entries}
            assert len(ids[d]) == len(entries) and not ids[d] & special
        assert not ids[a] & ids[b], f"{name}: token sets overlap"
        assert data["pair_info"][name]["n_prompts"] == N
        split = data["split"][name]
        assert len(split["held_out"]) == N_HELD and len(split["discovery"]) == N - N_HELD
        ref = {d: {e["id"] for e in data["reference"][name][d]} for d in (a, b)}
        assert not ref[a] & ref[b]
        js = data["agreement"][name]["dlogp"]["source"]
        assert js["mean"] == pytest.approx(
            (len(ids[a] & ref[a]) / len(ids[a] | ref[a]) + len(ids[b] & ref[b]) / len(ids[b] | ref[b])) / 2)


def test_full_compute(pipeline):
    data = json.loads((pipeline["dirs"]["FULL_COMPUTE_DIR"] / f"{MODEL}.json").read_text())
    scores = json.loads((pipeline["dirs"]["SCORES_DIR"] / f"{MODEL}.json").read_text())
    sets = json.loads((pipeline["dirs"]["TOKEN_SETS_DIR"] / f"{MODEL}.json").read_text())
    assert data["model"] == MODEL and data["metric"] == "fisher"
    assert data["components"] == ["attn_out", "mlp_out"] and set(data["sides"]) == {"b_into_a", "a_into_b"}
    prov = data["provenance"]
    assert prov["model"]["name"] == MODEL and prov["seed"] == 0
    assert prov["parameters"]["K"] == K and prov["versions"]["torch"]
    assert set(data["pairs"]) == set(PAIRS)
    for name, (a, b) in PAIRS.items():
        pair = data["pairs"][name]
        assert pair["domains"] == [a, b] and pair["n_prompts"] == N_HELD and pair["layers"] == LAYERS
        assert pair["evaluated_pairs"] == sets["split"][name]["held_out"]
        comparison = next(c for c in scores["comparisons"] if c["name"] == name and c["kind"] == "pair")
        for comp in data["components"]:
            fisher = dict(zip(scores["layers"], comparison["scores"][comp]["fisher"]))
            ranking = sorted(LAYERS, key=lambda l: (-fisher[l], l))
            assert pair["layer_ranking"][comp] == ranking
            assert pair["top_layers"][comp] == ranking[:K]
            assert pair["bottom_layers"][comp] == ranking[::-1][:K]
            block = pair["swap"][comp]
            assert [e["layer"] for e in block["per_layer"]] == LAYERS
            for entry in block["per_layer"]:
                assert entry["score"] == pytest.approx(fisher[entry["layer"]])
                for side in ("b_into_a", "a_into_b"):
                    s = entry["sides"][side]
                    for key, st in s.items():
                        assert st["n"] == N_HELD, (name, comp, key)
                        assert st["ci_low"] <= st["mean"] + 1e-12 and st["mean"] <= st["ci_high"] + 1e-12
                        if key.startswith("mass"):
                            assert 0 <= st["ci_low"] and st["ci_high"] <= 1
                    assert s["kl"]["mean"] >= -1e-9
            for side in ("b_into_a", "a_into_b", "both"):
                for effect in ("kl", "abs_delta"):
                    res = block["top_vs_bottom"][side][effect]
                    assert 0 < res["p_value"] <= 1 and res["top"]["n"] == N_HELD
            sp = block["spearman"]["both"]["kl"]
            assert sp["n"] == len(LAYERS) and (sp["rho"] is None or -1 <= sp["rho"] <= 1)
            zero = pair["zero_ablation"][comp]["per_layer"]
            assert all(e["sides"][s]["kl"]["n"] == N_HELD for e in zero for s in ("b_into_a", "a_into_b"))
            dc = block["depth_control"]["both"]["kl"]
            assert dc["partial_given_layer"]["n"] == len(LAYERS) and dc["partial_given_layer"]["df"] == 1
            assert 0 < dc["relative_top_vs_bottom"]["p_value"] <= 1
            inj = pair["injection"][comp]
            assert inj["layer"] == ranking[0] and inj["alphas"] == [0.0, 1.0, 4.0]
            first = inj["sides"]["b_into_a"][0]
            assert first["alpha"] == 0 and abs(first["kl"]["mean"]) < 1e-6
            assert all(0 <= r["mass_a"]["mean"] <= 1 and 0 <= r["mass_b"]["mean"] <= 1
                       for r in inj["sides"]["a_into_b"])
        # some layer of some component moves the output
        assert max(e["sides"]["b_into_a"]["kl"]["mean"] for c in data["components"]
                   for e in pair["swap"][c]["per_layer"]) > 1e-4
    assert all(math.isfinite(v) for v in [data["pairs"]["cpp_python"]["injection"]["mlp_out"]["vector_norm"]])


def test_graphs(pipeline):
    graphs = pipeline["dirs"]["GRAPHS_DIR"]
    names = ["attn_comparison", "mlp_comparison", "effect_vs_separability_kl",
             "effect_vs_separability_abs_delta", "kl_per_layer", "bias_per_layer", "injection",
             "depth_control_kl", "depth_control_abs_delta"]
    names += [f"{c}_layers_{p}" for c in ("attn", "mlp") for p in PAIRS]
    for name in names:
        for ext in ("png", "pdf"):
            path = graphs / MODEL / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    for name in ("top_vs_bottom_kl", "top_vs_bottom_abs_delta", "spearman_kl"):
        assert (graphs / "all_models" / f"{name}.png").stat().st_size > 1000
    nb01, nb02, nb03 = pipeline["executed"]
    assert images_in(nb03) >= len(names)
    text = nb01.read_text()
    assert "cpp token" in text and "python score" in text  # the token-set tables are shown
    for name in ("token_sets_agreement", "token_sets_frequency"):
        assert (graphs / MODEL / f"{name}.png").stat().st_size > 1000


def test_rerun_of_02_is_skipped_and_byte_identical(pipeline):
    path = pipeline["dirs"]["FULL_COMPUTE_DIR"] / f"{MODEL}.json"
    before = path.read_bytes()
    import papermill as pm

    nb = NB["02_all_model_causal"]
    declared = set(pm.inspect_notebook(str(nb)))  # the runner refuses names 02 does not declare
    params = {k: v for k, v in pipeline["params"].items() if k in declared}
    run_notebooks([nb], [MODEL], params, runs_dir=pipeline["tmp"] / "runs2", progress=False)
    assert path.read_bytes() == before
