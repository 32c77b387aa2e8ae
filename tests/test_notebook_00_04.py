"""End-to-end: notebooks 00 (layer scores) and 04 (prompt explorer) on smollm2-135m through the
runner, outputs redirected to tmp_path."""

import itertools
import json
import math

import pytest

from lib.core import paths
from lib.runner import run_notebooks

pytestmark = pytest.mark.slow

NB00 = paths.NOTEBOOKS / "00_layer_scores.ipynb"
NB04 = paths.NOTEBOOKS / "04_prompt_visualization.ipynb"
PAIRS = {"cpp_python": ("cpp", "python"), "finance_medical": ("finance", "medical"),
         "science_maths": ("science", "maths"), "physics_chemistry": ("physics", "chemistry")}


def outputs(nb_path):
    """(all text of all outputs, number of PNG images) of an executed notebook."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    texts, images = [], 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append("".join(out["text"]))
            data = out.get("data", {})
            for mime in ("text/plain", "text/markdown", "text/html"):
                if mime in data:
                    texts.append("".join(data[mime]))
            images += "image/png" in data
    return "\n".join(texts), images


def test_00_layer_scores_schema_and_skip(tmp_path):
    params = {"N_PROMPTS": 10, "LAYERS": "0,14,29", "SCORES_DIR": str(tmp_path / "scores"),
              "GRAPHS_DIR": str(tmp_path / "graphs"), "N_PROJECTIONS": 32}
    [executed] = run_notebooks([NB00], ["smollm2-135m"], params, runs_dir=tmp_path / "runs",
                               progress=False)
    path = tmp_path / "scores" / "smollm2-135m.json"
    data = json.loads(path.read_text())
    assert data["model"] == "smollm2-135m"
    assert data["components"] == ["attn_out", "mlp_out", "resid_post"]
    assert data["metrics"] == ["fisher", "mmd", "wasserstein"]
    assert data["layers"] == [0, 14, 29] and data["n_prompts"] == 10
    comps = {c["name"]: c for c in data["comparisons"]}
    domains = [d for pair in PAIRS.values() for d in pair]
    expected_cross = {f"{a}_vs_{b}" for a, b in itertools.combinations(domains, 2)
                      if (a, b) not in PAIRS.values()}
    assert len(expected_cross) == 24
    assert set(comps) == set(PAIRS) | expected_cross
    for name, (a, b) in PAIRS.items():
        assert (comps[name]["domain_a"], comps[name]["domain_b"], comps[name]["kind"]) == (a, b, "pair")
    for name in expected_cross:
        assert comps[name]["kind"] == "cross"
        assert name == f"{comps[name]['domain_a']}_vs_{comps[name]['domain_b']}"
    for c in data["comparisons"]:
        assert c["n_a"] == c["n_b"] == 10
        assert set(c["scores"]) == set(data["components"])
        for component in data["components"]:
            assert set(c["scores"][component]) == set(data["metrics"])
            for metric, values in c["scores"][component].items():
                assert len(values) == 3, (c["name"], component, metric)
                assert all(isinstance(v, float) and math.isfinite(v) for v in values)
                if metric == "fisher":
                    assert all(v >= 0 for v in values)
    prov = data["provenance"]
    assert prov["model"]["name"] == "smollm2-135m" and prov["model"]["n_layers"] == 30
    assert prov["parameters"]["N_PROMPTS"] == 10 and prov["parameters"]["LAYERS"] == "0,14,29"
    assert prov["seed"] == 0 and prov["versions"]["torch"] and prov["created_utc"]
    assert (tmp_path / "graphs" / "smollm2-135m" / "layer_scores.png").stat().st_size > 0
    assert (tmp_path / "graphs" / "smollm2-135m" / "layer_scores.pdf").stat().st_size > 0
    text, images = outputs(executed)
    assert images >= 1 and "most_separable_layer" in text

    # a rerun with the same parameters skips the computation and leaves the file as it is
    before = path.read_bytes()
    [again] = run_notebooks([NB00], ["smollm2-135m"], params, runs_dir=tmp_path / "runs",
                            progress=False)
    assert "is current" in outputs(again)[0]
    assert path.read_bytes() == before


def _token_sets(lm):
    entry = lambda text: {"id": lm.token_id(text), "token": text, "score": 1.0}
    return {"model": "smollm2-135m", "top_n": 2,
            "pairs": {"cpp_python": {"cpp": [entry(" C"), entry("#")],
                                     "python": [entry(" Python"), entry("def")]}},
            "provenance": {}}


def test_04_static_view_with_token_sets(tmp_path, smollm):
    sets_dir = tmp_path / "token_sets"
    sets_dir.mkdir()
    (sets_dir / "smollm2-135m.json").write_text(json.dumps(_token_sets(smollm)))
    params = {"TOKEN_SETS_DIR": str(sets_dir), "LAYER": 3, "TOP_K": 5,
              "N_CONTINUATION_TOKENS": 4}
    [executed] = run_notebooks([NB04], ["smollm2-135m"], params, runs_dir=tmp_path / "runs",
                               progress=False)
    text, images = outputs(executed)
    assert "cpp_python, prompt 0: swap of `mlp_out` at layer 3" in text
    assert "Write a C++ function that reverses a string in place." in text   # prompt shown
    assert "b_into_a" in text and "a_into_b" in text and "swapped" in text
    assert "token_set" in text and "change" in text                           # mass table
    assert images >= 2                                                        # tokens + masses
    assert "widgets not built" in text


def test_04_without_token_sets_still_shows_the_view(tmp_path):
    params = {"TOKEN_SETS_DIR": str(tmp_path / "empty"), "PAIR": "science_maths",
              "PROMPT_INDEX": 2, "TOP_K": 5, "N_CONTINUATION_TOKENS": 3}
    [executed] = run_notebooks([NB04], ["smollm2-135m"], params, runs_dir=tmp_path / "runs",
                               progress=False)
    text, images = outputs(executed)
    assert "token set missing for model smollm2-135m" in text
    assert "science_maths, prompt 2" in text and images >= 1
