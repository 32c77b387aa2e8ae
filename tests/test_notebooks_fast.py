"""Fast tier: every numbered notebook runs end to end on ``tiny-random`` (2 layers, byte-level
tokenizer, built in process) through ``lib.runner.run_notebooks``, in order, every output
folder under one temporary directory, in seconds each; then each notebook's outputs are
checked for existence and shape. The same notebooks run on the real smollm2-135m in the slow
tier (``test_notebook_*.py``).

The notebooks are picked up from ``notebooks/`` (``lib.runner.list_notebooks``), so a new one
is in this tier as soon as it exists: it gets ``MODEL="tiny-random"``, the output folders it
declares, and the small sizes of ``SMALL`` that it declares; ``FAST_PARAMETERS`` adds what a
notebook needs beyond that (2 layers, single-byte answer tokens, ...).
"""

import json
import shutil

import pytest

from lib.core import paths
from lib.runner import list_notebooks, run_notebooks
from lib.studies.path_patching import ROLES

MODEL = "tiny-random"
PROMPT_FILES = ["cpp_python.json", "finance_medical.json"]
N_PAIRS = 4

# Output folders: whichever of these a notebook declares is redirected to the temporary tree.
FOLDERS = {"SCORES_DIR": "scores", "TOKEN_SETS_DIR": "token_sets",
           "FULL_COMPUTE_DIR": "full_compute", "GRAPHS_DIR": "graphs", "CACHE_DIR": "cache"}
# Small sizes, given to every notebook that declares the parameter.
SMALL = {"N_PROMPTS": N_PAIRS, "N_BOOTSTRAP": 50, "N_PERMUTATIONS": 50, "SAMPLES": 2}
FAST_PARAMETERS = {
    "00": {"PROMPT_FILES": PROMPT_FILES, "N_FOLDS": 2, "N_PROJECTIONS": 8},
    "01": {"PROMPT_FILES": PROMPT_FILES, "TOP_N": 5, "SHOW_TOP": 3},
    "02": {"PROMPT_FILES": PROMPT_FILES, "K": 1, "ALPHAS": [0, 1]},
    "03": {"PER_PAIR_LAYER_BARS": False},   # those bars are drawn in tests/test_domain_swap.py
    "04": {"PROMPT_FILES": PROMPT_FILES, "LAYER": 1, "TOP_K": 3, "N_CONTINUATION_TOKENS": 2},
    # the byte tokenizer: one-byte answers; "Spain" and "Italy" have the same byte length
    "05": {"TOKENS": ["M", "R"], "NAME": "fast"},
    "06": {"WINDOW": 2, "N_FACTS": 2},   # FACTS_FILE: the tiny model's own answers, below
    # IOI names are several bytes: the metric reads each name's first byte (lib.studies.ioi.name_token)
    "07": {"TOKENS": ["M", "R"], "N_IOI_PATCH": 2, "N_RECEIVERS": 1, "N_EXACT_PAIRS": 2,
           "N_ROLE_HEADS": 3},
    # no language model: the sizes of its MLPs' data and training runs
    "08": {"N_FACTUAL_HAND": 500, "N_CF_HAND": 64, "MLP_N_TRAIN": 1024, "MLP_N_TEST": 128,
           "MLP_EPOCHS": 1, "DAS_N_TRAIN": 256, "DAS_N_TEST": 128, "DAS_EPOCHS": 1,
           "DAS_BATCH": 128, "SWEEP_N_TRAIN": 256, "LAYERS": "0,1", "SEMANTICS": "independent",
           "N_NETWORKS": 2, "SELECT_N_TRAIN": 128, "GRID_NETWORKS": 2, "GRID_N_TRAIN": 256},
    # the X+Y+Z= task: the tiny model is fine-tuned for one epoch (it stays at chance)
    "09": {"N_SHIPPED": 2, "SHOTS": 1, "FT_EPOCHS": 1, "FT_BATCH": 256, "LAYERS": "0,1",
           "RANKS": [4], "SITES": "all,eq", "CAUSAL_MODELS": "1,2,7", "DAS_N_TRAIN": 128,
           "DAS_N_TEST": 64, "DAS_BATCH": 64, "GRAPH_ARRANGEMENTS": 12, "GRAPH_LAYERS": "1",
           "DAS_SEEDS": 2},
}
NOTEBOOKS = list_notebooks()


def number(nb) -> str:
    return nb.stem.split("_")[0]


def declared(nb) -> set[str]:
    import papermill as pm

    return set(pm.inspect_notebook(str(nb)))


def tiny_facts(path, n: int = 2):
    """``n`` facts whose answer is the tiny model's own greedy token, so that they are kept. A
    byte that is not UTF-8 on its own does not survive decode -> encode; such prompts are
    passed over."""
    from lib.core.models import load_model
    from lib.studies.tracing import CausalTracer, answer_token_id

    lm = load_model(MODEL)
    facts = []
    for city in ("Rome", "Oslo", "Lima", "Kyiv", "Bern", "Riga", "Doha", "Baku"):
        prompt = f"{city} is a city in"
        tracer = CausalTracer(lm, prompt, city, noise=0.1, samples=1)
        if answer_token_id(lm, tracer.top_token) == tracer.top_id:
            facts.append({"prompt": prompt, "subject": city, "answer": tracer.top_token})
    assert len(facts) >= n, f"only {len(facts)} usable facts for {MODEL}"
    path.write_text(json.dumps(facts[:n]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One temporary tree that all notebooks of the tier read from and write to, in order."""
    root = tmp_path_factory.mktemp("fast_tier")
    with pytest.MonkeyPatch.context() as mp:
        # 2-layer models gain nothing from threads; on a shared CPU extra threads only queue
        mp.setenv("OMP_NUM_THREADS", "1")
        yield {"root": root, "runs": root / "runs", "facts": tiny_facts(root / "facts.json"),
               **{k: root / v for k, v in FOLDERS.items()}}


def parameters_for(nb, ws) -> dict:
    names = declared(nb)
    extra = dict(FAST_PARAMETERS.get(number(nb), {}))
    if number(nb) == "06":
        extra["FACTS_FILE"] = str(ws["facts"])
    unknown = sorted(set(extra) - names)
    assert not unknown, f"{nb.name} no longer declares {unknown}; update FAST_PARAMETERS"
    params = {k: str(ws[k]) for k in FOLDERS if k in names}
    params.update({k: v for k, v in SMALL.items() if k in names})
    params.update(extra)
    return params


def executed_outputs(executed) -> tuple[str, int, list[str]]:
    """(text of every output, number of PNG images, error names) of an executed notebook."""
    nb = json.loads(executed.read_text(encoding="utf-8"))
    texts, images, errors = [], 0, []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            data = out.get("data", {})
            texts += ["".join(data[m]) for m in ("text/plain", "text/markdown") if m in data]
            images += "image/png" in data
            if out.get("output_type") == "error":
                errors.append(out.get("ename", "?"))
    return "\n".join(texts), images, errors


def figures(ws, *names, model=MODEL):
    for name in names:
        for ext in ("png", "pdf"):
            path = ws["GRAPHS_DIR"] / model / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path


# --- what each notebook must have written ---------------------------------------------------

def check_00(ws, executed):
    from lib.studies.separability import validate_scores

    data = json.loads((ws["SCORES_DIR"] / f"{MODEL}.json").read_text())
    validate_scores(data)
    assert data["layers"] == [0, 1] and data["n_prompts"] == N_PAIRS
    kinds = [c["kind"] for c in data["comparisons"]]
    assert kinds.count("pair") == 2 and kinds.count("cross") == 4   # 4 domains, 2 own pairs
    figures(ws, "layer_scores")


def check_01(ws, executed):
    data = json.loads((ws["TOKEN_SETS_DIR"] / f"{MODEL}.json").read_text())
    assert set(data["pairs"]) == {"cpp_python", "finance_medical"} and data["top_n"] == 5
    for name, sets in data["pairs"].items():
        assert len(sets) == 2 and all(0 < len(v) <= 5 for v in sets.values())
        split = data["split"][name]
        assert len(split["discovery"]) == len(split["held_out"]) == N_PAIRS // 2
        assert set(data["reference"][name]) == set(sets)
        assert data["agreement"][name]["dlogp"]["source"]["mean"] is not None
    assert data["score"]["name"] == "dlogp" and data["assignment"]["name"] == "source"
    figures(ws, "token_sets_agreement", "token_sets_frequency")


def check_02(ws, executed):
    data = json.loads((ws["FULL_COMPUTE_DIR"] / f"{MODEL}.json").read_text())
    assert set(data["pairs"]) == {"cpp_python", "finance_medical"}
    sets = json.loads((ws["TOKEN_SETS_DIR"] / f"{MODEL}.json").read_text())
    for name, pair in data["pairs"].items():
        # every effect on the pairs notebook 01 held out
        assert pair["evaluated_pairs"] == sets["split"][name]["held_out"]
        assert pair["n_prompts"] == N_PAIRS // 2 and pair["layers"] == [0, 1]
        assert "depth_control" in pair["swap"]["mlp_out"]
        for comp in data["components"]:
            assert [e["layer"] for e in pair["swap"][comp]["per_layer"]] == [0, 1]
            assert len(pair["top_layers"][comp]) == len(pair["bottom_layers"][comp]) == 1


def check_03(ws, executed):
    figures(ws, "attn_comparison", "mlp_comparison", "kl_per_layer", "bias_per_layer",
            "effect_vs_separability_kl", "injection")
    figures(ws, "top_vs_bottom_kl", model="all_models")


def check_04(ws, executed):
    text, images, _ = executed_outputs(executed)
    assert "swap of `mlp_out` at layer 1" in text and "widgets not built" in text
    sets_file = ws["TOKEN_SETS_DIR"] / f"{MODEL}.json"
    if sets_file.exists():   # notebook 01 ran before it in this session
        assert images >= 2   # top tokens and token-set masses
        assert "Token sets of cpp_python" in text   # the sets' top tokens
        if "split" in json.loads(sets_file.read_text()):
            assert "Split:" in text and "half of cpp_python" in text
    else:                    # 04 selected alone (-k 04): no token sets, and the view says so
        assert images >= 1 and "token set missing" in text


def check_05(ws, executed):
    from lib.studies.interchange import RECORD_KEYS

    data = json.loads((ws["FULL_COMPUTE_DIR"] / MODEL / "interchange_fast.json").read_text())
    n_pos = len(data["base"]["tokens"])
    assert data["layers"] == [0, 1] and n_pos == len("The capital of Spain is") + 1  # + <bos>
    assert len(data["records"]) == 2 * 2 * n_pos * 2   # components x layers x positions x tokens
    assert all(set(r) == set(RECORD_KEYS) and 0 <= r["prob"] <= 1 for r in data["records"])
    figures(ws, *(f"interchange_fast_{n}" for n in
                  ("heatmap", "bars", "attribution", "attribution_scatter")))


def check_06(ws, executed):
    out = ws["FULL_COMPUTE_DIR"] / MODEL
    for kind in ("hidden", "mlp", "attention"):
        data = json.loads((out / f"causal_trace_{kind}.json").read_text())
        assert len(data["scores"]) == len(data["tokens"])
        assert all(len(row) == 2 for row in data["scores"])
    facts = json.loads((out / "causal_trace_facts.json").read_text())
    assert facts["summary"]["n_correct"] == 2
    figures(ws, *(f"causal_trace_{n}" for n in
                  ("hidden", "mlp", "attention", "severed", "average", "average_severed")))


def check_07(ws, executed):
    out = ws["FULL_COMPUTE_DIR"] / MODEL
    capital = json.loads((out / "path_patching_capital.json").read_text())
    n_pos = len(capital["base_tokens"])
    assert len(capital["records"]) == (1 + 2 * 2) * n_pos * 2   # nodes x positions x tokens
    assert len(capital["cumulative"]) == (1 + 2 * 2) * 2 * 2
    data = json.loads((out / "path_patching_ioi.json").read_text())
    assert data["n_pairs"] >= 50 and 0 <= data["accuracy"] <= 1
    assert len(data["to_logits"]) == 2 * 4 * 2                 # layers x heads x policies
    assert len(data["strongest"]) == 1 and data["to_queries"]
    assert data["n_pairs_patched"] == 2 and data["provenance"]["inputs"]["ioi"]
    for row in data["to_logits"] + data["to_queries"]:   # intervals over the patched pairs
        assert row["ci_low"] - 1e-9 <= row["delta"] <= row["ci_high"] + 1e-9
        assert 0 <= row["share_negative"] <= 1
    eap = json.loads((out / "path_patching_eap.json").read_text())
    assert len(eap["records"]) == 15                             # node-level edges, 2 layers
    assert eap["exact_pairs"] == 2 and eap["n_pairs"] == data["n_pairs"]
    roles = json.loads((out / "path_patching_roles.json").read_text())
    assert len(roles["heads"]) == 3 and all(h["role"] in ROLES for h in roles["heads"])
    circuit = json.loads((out / "circuit_faithfulness.json").read_text())
    assert {c["ranking"] for c in circuit["curves"]} == {"eap", "eap_ig", "exact"}
    assert all(c["ks"][-1] == 15 for c in circuit["curves"])
    figures(ws, *(f"path_patching_{n}" for n in
                  ("capital_heatmap", "capital_cumulative", "lineage", "ioi_heads",
                   "ioi_queries", "eap", "ioi_roles")), "circuit_faithfulness")


def check_08(ws, executed):
    out = ws["FULL_COMPUTE_DIR"] / "das_mlp"
    hand = json.loads((out / "hand_built.json").read_text())
    assert hand["factual_accuracy"] == 1.0 and hand["iia"] == {"independent": 1.0}
    assert len(list(out.glob("*.json"))) >= 3
    grid = json.loads((out / "wrong_model.json").read_text())
    assert grid["n_networks"] == 2 and len(grid["cells"]) == 18
    assert all("balanced_iia" in c and "label_true_share" in c for c in grid["cells"])
    # the equality study's rotations carry its result's key; its networks' cache files carry
    # theirs and the checksum of the tensors their stored accuracy was measured on
    from lib.core.tensorfiles import read_header, tensors_sha256

    key = json.loads((out / "equality.json").read_text())["params_key"]
    rotations = sorted((out / "rotations").glob("*.safetensors"))
    assert rotations and {read_header(p)[2] for p in rotations} == {key}
    nets = [p for p in sorted(ws["CACHE_DIR"].glob("*.safetensors"))
            if not p.name.startswith(MODEL)]   # 09 caches its tuned weights there too
    assert nets and all(read_header(p)[2] in p.name for p in nets)
    from lib.core.io import load_tensors

    for p in nets:
        tensors, _, meta = load_tensors(p)
        assert meta["weights_sha256"] == tensors_sha256(tensors)


def check_09(ws, executed):
    out = ws["FULL_COMPUTE_DIR"] / MODEL
    ft = json.loads((out / "das_finetune.json").read_text())
    assert ft["tokenization"]["padded"]["length"] == 10 and "error" in ft["tokenization"]["plain"]
    assert [s["shots"] for s in ft["shipped"]] == [0, 1, 1] and len(ft["curve"]) == 1
    assert sorted(ft["split"]["train"] + ft["split"]["val"] + ft["split"]["test"]) == \
        list(range(1000))
    data = json.loads((out / "das_iia.json").read_text())
    assert len(data["runs"]) == 3 * 2 * 1 * 2 * 2       # models x layers x ranks x sites x seeds
    assert all(0 <= r["iia"] <= 1 and 0 <= r["control_iia"] <= 1 for r in data["runs"])
    # each cell over its two seeds: the mean of its runs, inside its interval
    assert data["seeds"] == [0, 1] and len(data["cells"]) == 3 * 2 * 1 * 2
    for cell in data["cells"]:
        mine = [r["iia"] for r in data["runs"] if all(r[k] == cell[k] for k in
                                                      ("model", "layer", "rank", "site"))]
        assert sorted(r["seed"] for r in data["runs"] if all(
            r[k] == cell[k] for k in ("model", "layer", "rank", "site"))) == [0, 1]
        assert cell["iia"]["n"] == 2 and cell["iia"]["mean"] == pytest.approx(sum(mine) / 2)
        assert cell["iia"]["ci_low"] <= cell["iia"]["mean"] <= cell["iia"]["ci_high"]
    assert len(data["sanity_grid"]) == 2 * 2 * 2 * 2    # (M1, M2) trained x tested x layers x sites
    for row in data["full_swap"]:
        assert abs(row["iia"] - row["source_prediction_is_label"]) < 1e-9
    # one subfolder of rotations per parameter set (the DAS unit store's key)
    assert len(list((out / "das_rotations").glob("*/*.safetensors"))) == 24
    assert len(list((out / "das_rotations").iterdir())) == 1
    figures(ws, "das_finetune", "das_iia_layers", "das_sanity_grid", "das_graph_means")
    graph = json.loads((out / "das_graph.json").read_text())
    # one graph per causal model at GRAPH_LAYERS="1" only
    assert len(graph["arrangements"]) == 12 and len(graph["graphs"]) == 3
    assert {g["layer"] for g in graph["graphs"]} == {1}
    for g in graph["graphs"]:
        low, high = g["mean_weight_ci"]
        assert 0 <= low <= g["mean_weight"] <= high <= 1
    # every ordered pair's prediction is stored; the weights are read back from it
    import torch

    from lib.studies.das import arithmetic as ar, arithmetic_das as da
    from lib.core.io import load_tensors, same_apart_from_time

    pred_path = out / graph["predictions_file"]
    preds, config, _ = load_tensors(pred_path)
    assert config["arrangements"] == graph["arrangements"] and len(preds) == 3
    for g in graph["graphs"]:
        pred = preds[da.run_name(g["model"], g["layer"], g["rank"], g["site"])].long()
        assert pred.shape == (12, 12) and torch.all(pred.diagonal() == -1)
        W = da.graph_weights(pred, ar.causal_model(g["model"]), graph["arrangements"])
        assert float(W.sum()) / (12 * 11) == pytest.approx(g["mean_weight"])
    # an interrupted run of the graphs resumes: the finished graphs are units, not recomputed
    before = json.loads((out / "das_graph.json").read_text()), pred_path.read_bytes()
    (out / "das_graph.json").unlink()
    pred_path.unlink()
    nb = next(n for n in NOTEBOOKS if number(n) == "09")
    [again] = run_notebooks([nb], [MODEL], parameters_for(nb, ws), runs_dir=ws["runs"],
                            timeout=300, progress=False)
    text, _, errors = executed_outputs(again)
    assert not errors and "ordered pairs in" not in text, "the rerun computed a graph again"
    assert same_apart_from_time(json.loads((out / "das_graph.json").read_text()), before[0])
    assert pred_path.read_bytes() == before[1]


CHECKS = {"00": check_00, "01": check_01, "02": check_02, "03": check_03, "04": check_04,
          "05": check_05, "06": check_06, "07": check_07, "08": check_08, "09": check_09}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_tiny_random(nb, workspace):
    params = parameters_for(nb, workspace)
    [executed] = run_notebooks([nb], [MODEL], params, runs_dir=workspace["runs"], timeout=300,
                               progress=False)
    _, _, errors = executed_outputs(executed)
    assert not errors, f"{nb.name}: error outputs {errors}"
    CHECKS.get(number(nb), lambda ws, ex: None)(workspace, executed)


def test_every_notebook_is_in_the_fast_tier():
    assert NOTEBOOKS == list_notebooks(paths.NOTEBOOKS) and len(NOTEBOOKS) >= 7
    # a notebook with its own checks must still exist (a renamed one would silently lose them)
    assert set(CHECKS) <= {number(nb) for nb in NOTEBOOKS}


def test_09_on_another_cpu_reuses_refuses_or_recomputes(workspace):
    """Fine-tuning from the same parameters on another kind of CPU rounds differently, so every
    result of 09 names the tuned weights' fingerprint. On another CPU (simulated here):
    (a) a fresh clone (no tuned weights, no units) reuses every stored result and never loads
    or trains the tuned model; (b) where a result must be computed and the cache holds other
    weights than the stored results name, the run stops with the fix and changes nothing;
    (c) FORCE=True fine-tunes again and recomputes every result, each naming the new weights."""
    from lib.core.tensorfiles import tensors_sha256
    from lib.core.io import load_tensors, same_apart_from_time, save_tensors
    from lib.runner import NotebookFailed

    nb = next(n for n in NOTEBOOKS if number(n) == "09")
    out = workspace["FULL_COMPUTE_DIR"] / MODEL
    if not (out / "das_iia.json").exists():
        pytest.skip("notebook 09 did not run in this session (filtered out)")
    names = ("das_finetune.json", "das_iia.json", "das_graph.json")
    stored = {n: json.loads((out / n).read_text()) for n in names}
    params = parameters_for(nb, workspace)
    [weights] = [p for p in workspace["CACHE_DIR"].rglob(f"{MODEL}*.safetensors")]
    original = weights.read_bytes()
    # (a) a fresh clone: only the committed files
    weights.unlink()
    shutil.rmtree(out / "das_units", ignore_errors=True)
    [again] = run_notebooks([nb], [MODEL], params, runs_dir=workspace["runs"], timeout=300,
                            progress=False)
    text, _, errors = executed_outputs(again)
    assert not errors and "not loaded, every result was stored and current" in text
    assert not weights.exists()                             # nothing was trained
    for n in names:
        assert same_apart_from_time(json.loads((out / n).read_text()), stored[n]), n
    # (b) this CPU's fine-tune gave other weights, and a new result (another rank) needs them
    weights.write_bytes(original)
    tensors, config, meta = load_tensors(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_tensors(weights, tensors, config, meta)
    before = {n: (out / n).read_bytes() for n in names}
    with pytest.raises(NotebookFailed, match="FORCE=True"):
        run_notebooks([nb], [MODEL], {**params, "RANKS": [4, 2]}, runs_dir=workspace["runs"],
                      timeout=300, progress=False)
    assert {n: (out / n).read_bytes() for n in names} == before
    # (c) FORCE=True: fine-tuned again here, every result recomputed with those weights
    run_notebooks([nb], [MODEL], {**params, "FORCE": True}, runs_dir=workspace["runs"],
                  timeout=300, progress=False)
    tuned = tensors_sha256(load_tensors(weights)[0])
    ft = json.loads((out / "das_finetune.json").read_text())
    assert ft["weights_sha256"] == tuned
    for n in ("das_iia.json", "das_graph.json"):
        key = json.loads((out / n).read_text())["provenance"]["parameters"]
        assert key["TUNED_WEIGHTS_SHA256"] == tuned, n
    # the same CPU fine-tunes to the same weights: the results are the stored ones again
    assert tuned == stored["das_finetune.json"]["weights_sha256"]
    for n in names:
        assert same_apart_from_time(json.loads((out / n).read_text()), stored[n]), n


def test_09_trains_a_damaged_or_foreign_rotation_again_and_keeps_its_results(workspace):
    """A NaN in a stored rotation, or a rotation of other parameters under a run's name (copied
    into this parameter set's subfolder by hand), is set aside with a warning
    naming it and trained again, and what was computed from it (das_iia.json; das_graph.json
    for a graph's rotation) is computed again: never reported beside the foreign file. Training
    is repeatable, so every file keeps its bytes."""
    from conftest import damage
    from lib.core.io import same_apart_from_time
    from lib.core.tensorfiles import read_header

    nb = next(n for n in NOTEBOOKS if number(n) == "09")
    out = workspace["FULL_COMPUTE_DIR"] / MODEL
    if not (out / "das_iia.json").exists():
        pytest.skip("notebook 09 did not run in this session (filtered out)")
    [rotations] = (out / "das_rotations").iterdir()   # the defaults' key's subfolder
    files = sorted(rotations.glob("*.safetensors"))
    keys = {read_header(p)[2] for p in files}
    assert keys == {rotations.name}   # every rotation carries its unit store's key
    before = {p: p.read_bytes() for p in files}
    names = ("das_iia.json", "das_graph.json")
    stored = {n: json.loads((out / n).read_text()) for n in names}
    damage(rotations / "M1_L1_k4_all.safetensors", "nan")      # a graph's rotation
    damage(rotations / "M7_L0_k4_eq.safetensors", "key")
    [again] = run_notebooks([nb], [MODEL], parameters_for(nb, workspace),
                            runs_dir=workspace["runs"], timeout=300, progress=False)
    text, _, errors = executed_outputs(again)
    assert not errors
    assert "M1_L1_k4_all.safetensors: holds NaN or infinite values" in text
    assert "M7_L0_k4_eq.safetensors: was written with other parameters" in text
    assert "M1_L1_k4_all: IIA" in text and "M1_L1_k4_all: 132 ordered pairs in" in text
    assert {p: p.read_bytes() for p in files} == before
    for n in names:
        assert same_apart_from_time(json.loads((out / n).read_text()), stored[n]), n
    assert sorted(p.name for p in rotations.glob("*.set-aside")) == [
        "M1_L1_k4_all.safetensors.set-aside", "M7_L0_k4_eq.safetensors.set-aside"]
