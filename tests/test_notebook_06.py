"""End to end: notebooks/06_causal_tracing.ipynb on the real smollm2-135m with small parameters,
outputs redirected to tmp_path, then the JSON schema and the figures are checked."""

import json
import math

import pytest

from conftest import F32_ATOL
from lib.core import paths
from lib.runner import run_notebooks

NOTEBOOK = paths.NOTEBOOKS / "06_causal_tracing.ipynb"
KINDS = ("hidden", "mlp", "attention")
N_LAYERS = 30  # smollm2-135m
START = 24


@pytest.mark.slow
def test_notebook_06_runs_and_writes_its_outputs(tmp_path):
    fc, graphs, runs = tmp_path / "fc", tmp_path / "graphs", tmp_path / "runs"
    params = {"SAMPLES": 2, "N_FACTS": 3, "LAYERS": ",".join(map(str, range(START, N_LAYERS))),
              "BATCH_SIZE": 64,
              "FULL_COMPUTE_DIR": str(fc), "GRAPHS_DIR": str(graphs)}
    done = run_notebooks([NOTEBOOK], ["smollm2-135m"], params, runs_dir=runs, progress=False)
    assert done == [runs / "smollm2-135m" / NOTEBOOK.name] and done[0].exists()
    out = fc / "smollm2-135m"

    for kind in KINDS:
        data = json.loads((out / f"causal_trace_{kind}.json").read_text())
        for key in ("answer", "answer_id", "p_clean", "p_corrupt", "noise", "tokens",
                    "subject_range", "scores", "window", "samples", "seed", "provenance"):
            assert key in data, (kind, key)
        assert data["answer"] == " Paris" and data["subject_range"] == [0, 4]
        assert data["window"] == (1 if kind == "hidden" else 10)
        assert data["samples"] == 2 and data["provenance"]["parameters"]["samples"] == 2
        assert 0 <= data["p_corrupt"] < data["p_clean"] <= 1
        assert data["noise"] > 0 and math.isfinite(data["noise"])
        scores = data["scores"]
        assert len(scores) == len(data["tokens"]) == 10
        assert all(len(row) == N_LAYERS for row in scores)
        for row in scores:  # layers before START were not run
            assert all(v is None for v in row[:START])
            assert all(v is not None and 0 <= v <= 1 for v in row[START:])
    hidden = json.loads((out / "causal_trace_hidden.json").read_text())
    # restoring the last layer's state at the last token restores the clean output
    assert hidden["scores"][-1][-1] == pytest.approx(hidden["p_clean"], abs=F32_ATOL)

    severed = json.loads((out / "causal_trace_severed.json").read_text())
    assert severed["token"] == 3  # last subject token (" Tower")
    for key in ("ordinary", "mlp_severed", "attention_severed"):
        assert len(severed[key]) == N_LAYERS

    facts = json.loads((out / "causal_trace_facts.json").read_text())
    assert len(facts["facts"]) == 3
    kept = [f for f in facts["facts"] if f["correct"]]
    summary = facts["summary"]
    assert summary["n_correct"] == len(kept) >= 1 and summary["n_facts"] == 3
    ate = sum(f["p_clean"] - f["p_corrupt"] for f in kept) / len(kept)
    assert summary["ate"] == pytest.approx(ate)
    kinds = {e["kind"] for e in facts["effects"]}
    assert kinds == set(KINDS) | {"hidden_mlp_severed", "hidden_attention_severed"}
    assert {e["token"] for e in facts["effects"]} == {"last_subject", "last"}
    for kind in KINDS:
        assert set(summary["peaks"][kind]) == {"last_subject", "last"}
    assert len(list((out / "causal_trace_units").glob("fact_*.json"))) == 3

    for name in ("hidden", "mlp", "attention", "severed", "average", "average_severed"):
        for ext in ("png", "pdf"):
            path = graphs / "smollm2-135m" / f"causal_trace_{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
        assert (graphs / "smollm2-135m" / f"causal_trace_{name}.png").read_bytes()[:4] == \
            b"\x89PNG"
    executed = json.loads(done[0].read_text())
    text = json.dumps(executed)
    assert "Traceback" not in text and "kept" in text
