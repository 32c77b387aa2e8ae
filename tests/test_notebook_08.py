"""End to end: notebook 08 (DAS on small MLPs) with small sizes through the runner, outputs
redirected to tmp_path; checks the schema, the hand-built network's exact numbers, and that a
rerun loads the stored results."""

import json

import pytest

from lib.core import paths
from lib.core.io import read_json
from lib.runner import run_notebooks

NOTEBOOK = paths.NOTEBOOKS / "08_das_mlp.ipynb"
SMALL = {"N_FACTUAL_HAND": 2000, "N_CF_HAND": 256, "MLP_N_TRAIN": 4096, "MLP_N_TEST": 512,
         "MLP_EPOCHS": 1, "DAS_N_TRAIN": 1024, "DAS_N_TEST": 512, "DAS_EPOCHS": 2,
         "DAS_BATCH": 256, "SWEEP_N_TRAIN": 512, "N_NETWORKS": 3, "SELECT_N_TRAIN": 512,
         "GRID_NETWORKS": 2, "GRID_N_TRAIN": 512}
FIGURES = ("equality_network_selection", "equality_training_curve", "equality_iia_per_layer", "abab_iia_per_layer",
           "wrong_model_grid")


def _stdout(executed) -> str:
    nb = json.loads(executed.read_text(encoding="utf-8"))
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow  # about 50 s on the shared 2-core CPU (two runs: compute, then load)
def test_notebook_08_runs_and_writes_its_outputs(tmp_path):
    params = {**SMALL, "FULL_COMPUTE_DIR": str(tmp_path / "fc"),
              "GRAPHS_DIR": str(tmp_path / "graphs"), "CACHE_DIR": str(tmp_path / "cache")}
    [executed] = run_notebooks([NOTEBOOK], ["ignored"], params, runs_dir=tmp_path / "runs",
                               progress=False)
    assert executed == tmp_path / "runs" / "das_mlp" / "08_das_mlp.ipynb"
    out = tmp_path / "fc" / "das_mlp"

    hand = read_json(out / "hand_built.json")
    assert hand["factual_accuracy"] == 1.0
    assert hand["iia"] == {"independent": 1.0, "conditioned": 1.0}
    assert sum(hand["factual_label_counts"]) == 2000

    eq = read_json(out / "equality.json")
    assert 0.0 <= eq["mlp"]["test_accuracy"] <= 1.0 and eq["mlp"]["n_test"] == 512
    sel = eq["selection"]
    assert [r["seed"] for r in sel["candidates"]] == [0, 1, 2] and sel["n_validation"] == 512
    best = max(sel["candidates"], key=lambda r: r["validation_iia"])
    assert sel["chosen_seed"] == best["seed"] == eq["mlp"]["seed"]
    assert eq["mlp"]["test_accuracy"] == best["mlp_test_accuracy"]
    for sem in ("independent", "conditioned"):
        main = eq["main"][sem]
        assert main["n_train"] == 1024 and main["n_test"] == 512 and main["layer"] == 0
        assert main["trainable_parameters"] == 256 and main["orthogonality_error"] <= 1e-5
        assert main["subspaces"] == [[0, 8], [8, 16]] and len(main["curve"]) == 2
        assert "seconds_per_epoch" not in main and "seconds" not in main["curve"][0]
        assert [r["layer"] for r in eq["per_layer"][sem]] == [0, 1, 2]
        assert all(0 <= r["control_iia"] <= 1 for r in eq["per_layer"][sem])
    abab = read_json(out / "abab.json")
    assert {abab["equal"]["task"], abab["and"]["task"]} == {"abab_equal", "abab_and"}
    assert [r["layer"] for r in abab["and"]["per_layer"]] == [0, 1, 2]
    wrong = read_json(out / "wrong_model.json")
    assert len(wrong["cells"]) == 18 and wrong["seeds"] == [0, 1] and wrong["n_train"] == 512
    assert {(r["train_model"], r["test_model"], r["inputs"]) for r in wrong["cells"]} == {
        (a, b, i) for a in ("AABB", "ABAB", "ABBA") for b in ("AABB", "ABAB", "ABBA")
        for i in ("own", "shared")}
    for cell in wrong["cells"]:
        assert len(cell["per_network"]) == 2 and 0 <= cell["balanced_iia"]["median"] <= 1
        assert 0 < cell["label_true_share"] < 1
    prov = eq["provenance"]
    assert prov["model"]["name"] == "das_mlp" and prov["parameters"]["DAS_N_TRAIN"] == 1024
    for sem in ("independent", "conditioned"):
        assert (out / "rotations" / f"equality_layer0_{sem}.safetensors").exists()
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = tmp_path / "graphs" / "das_mlp" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path
    assert list((tmp_path / "cache").glob("*.safetensors"))

    # a rerun with the same parameters loads every section and rewrites nothing
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    [again] = run_notebooks([NOTEBOOK], ["ignored"], params, runs_dir=tmp_path / "runs2",
                            progress=False)
    text = _stdout(again)
    assert "wrote" not in text and "s per epoch" not in text, "the rerun recomputed"
    for name in ("hand_built", "equality", "abab", "wrong_model"):
        assert f"{name}.json is current" in text, name
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == before
