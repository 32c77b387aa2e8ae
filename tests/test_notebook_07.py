"""End to end: notebooks/07_path_patching.ipynb on the real smollm2-135m with small parameters
(three IOI pairs, edges of the last three layers), outputs redirected to tmp_path; then what the
real model is known to do (issue 25's independent check) and the files' shapes are asserted."""

import json

import pytest

from lib.core import paths
from lib.runner import run_notebooks
from lib.studies import path_patching as pp
from lib.studies.ioi import load_ioi

NOTEBOOK = paths.NOTEBOOKS / "07_path_patching.ipynb"


@pytest.mark.slow
def test_notebook_07_runs_and_writes_its_outputs(tmp_path):
    fc, graphs, runs = tmp_path / "fc", tmp_path / "graphs", tmp_path / "runs"
    ioi_file = tmp_path / "ioi3.json"
    ioi_file.write_text(json.dumps(load_ioi()[:3]), encoding="utf-8")
    params = {"IOI_FILE": str(ioi_file), "N_QUERY_PAIRS": 1, "N_RECEIVERS": 1,
              "N_ROLE_HEADS": 3, "EAP_LAYERS": "27,28,29", "EAP_IG_STEPS": 2,
              "N_EXACT_PAIRS": 1, "N_CIRCUIT_POINTS": 6, "BATCH_SIZE": 64,
              "FULL_COMPUTE_DIR": str(fc), "GRAPHS_DIR": str(graphs)}
    done = run_notebooks([NOTEBOOK], ["smollm2-135m"], params, runs_dir=runs, progress=False)
    assert done == [runs / "smollm2-135m" / NOTEBOOK.name]
    out = fc / "smollm2-135m"

    ioi = json.loads((out / "path_patching_ioi.json").read_text())
    pp.IOI_SCHEMA(ioi)
    assert ioi["n_pairs"] == ioi["n_pairs_patched"] == 3 and ioi["accuracy"] == 1.0
    assert ioi["strongest"][0] == "a23.h3"     # -2.9 on every pair of the full set
    roles = json.loads((out / "path_patching_roles.json").read_text())
    pp.ROLES_SCHEMA(roles)
    first = roles["heads"][0]
    assert first["head"] == "a23.h3" and first["role"] == "subject suppression"
    assert first["attention"]["s2"]["mean"] > first["attention"]["io"]["mean"]
    eap = json.loads((out / "path_patching_eap.json").read_text())
    pp.EAP_SCHEMA(eap)
    assert eap["exact_pairs"] == 1 and eap["n_pairs"] == 3 and eap["ig_steps"] == 2
    n_edges = len(pp.node_edges(type("L", (), {"n_layers": 30})(), [27, 28, 29]))
    assert len(eap["records"]) == n_edges
    circuit = json.loads((out / "circuit_faithfulness.json").read_text())
    pp.CIRCUIT_SCHEMA(circuit)
    for curve in circuit["curves"]:
        assert curve["ks"][0] == 0 and curve["ks"][-1] == n_edges and len(curve["ks"]) == 6
        # every edge kept (keep) or none patched (remove) is the clean run itself
        assert curve["faithfulness"][-1 if curve["direction"] == "keep" else 0] == \
            pytest.approx(1.0, abs=1e-6)
    for name in ("path_patching_ioi_heads", "path_patching_ioi_roles", "path_patching_eap",
                 "circuit_faithfulness"):
        assert (graphs / "smollm2-135m" / f"{name}.png").stat().st_size > 0
