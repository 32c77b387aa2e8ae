"""End to end: notebook 05 (interchange intervention) on smollm2-135m with few layers, outputs
redirected to tmp_path; then a rerun that must load the stored result instead of recomputing."""

import json

import pytest

from conftest import F32_ATOL
from lib.core import paths
from lib.studies.interchange import ATTRIBUTION_KEYS, RECORD_KEYS
from lib.core.io import read_json
from lib.runner import run_notebooks

NOTEBOOK = paths.NOTEBOOKS / "05_interchange_intervention.ipynb"
FIGURES = ("heatmap", "bars", "attribution", "attribution_scatter")


def _stdout(executed) -> str:
    nb = json.loads(executed.read_text(encoding="utf-8"))
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_notebook_05_runs_and_writes_its_outputs(tmp_path):
    params = {"LAYERS": "0,15,29", "NAME": "test", "FULL_COMPUTE_DIR": str(tmp_path / "fc"),
              "GRAPHS_DIR": str(tmp_path / "graphs")}
    [executed] = run_notebooks([NOTEBOOK], ["smollm2-135m"], params,
                               runs_dir=tmp_path / "runs", progress=False)
    assert executed.exists()
    assert "wrote" in _stdout(executed)

    data = read_json(tmp_path / "fc" / "smollm2-135m" / "interchange_test.json")
    n_components, n_layers, n_tokens = 2, 3, 2
    n_positions = len(data["base"]["tokens"])
    assert data["base"]["tokens"] == ["The", " capital", " of", " Spain", " is"]
    assert data["source"]["tokens"][3] == " Italy"
    assert data["layers"] == [0, 15, 29] and data["positions"] == list(range(n_positions))
    assert sorted(data["components"]) == ["attn_in", "mlp_out"]
    records = data["records"]
    assert len(records) == n_components * n_layers * n_positions * n_tokens
    assert all(set(r) == set(RECORD_KEYS) for r in records)
    assert all(0.0 <= r["prob"] <= 1.0 for r in records)
    assert {r["token"] for r in records} == {" Madrid", " Rome"}
    # clean top-10 of both prompts, and the answers' clean probabilities
    assert len(data["base"]["top"]) == 10 and len(data["source"]["top"]) == 10
    answers = {a["token"]: a for a in data["answers"]}
    assert answers[" Madrid"]["p_base"] > answers[" Rome"]["p_base"]
    assert answers[" Rome"]["p_source"] > answers[" Madrid"]["p_source"]
    # positions before the differing token cannot change anything
    for r in records:
        if r["position"] < 3:
            assert r["prob"] == pytest.approx(answers[r["token"]]["p_base"], abs=F32_ATOL)
    att = data["attribution"]
    assert len(att["records"]) == n_components * n_layers * n_positions * 3
    assert all(set(r) == set(ATTRIBUTION_KEYS) for r in att["records"])
    for corr in att["correlation"].values():
        for cells in ("all_cells", "changed_cells"):
            for key in ("pearson", "spearman"):
                value = corr[cells][key]
                assert value is None or -1.0 <= value <= 1.0
    prov = data["provenance"]
    assert prov["model"]["name"] == "smollm2-135m"
    assert prov["parameters"]["LAYERS"] == "0,15,29"
    assert prov["versions"]["torch"] and prov["created_utc"]
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = tmp_path / "graphs" / "smollm2-135m" / f"interchange_test_{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path

    # A rerun with the same parameters loads the file instead of recomputing.
    before = (tmp_path / "fc" / "smollm2-135m" / "interchange_test.json").read_bytes()
    [again] = run_notebooks([NOTEBOOK], ["smollm2-135m"], params,
                            runs_dir=tmp_path / "runs2", progress=False)
    assert "interchange_test.json is current" in _stdout(again)
    assert (tmp_path / "fc" / "smollm2-135m" / "interchange_test.json").read_bytes() == before
