"""Bad inputs, as a new user would try them, through the runner and through the library.

Every case asserts an error (or, where the input is legitimate but odd, a warning) whose message
names the parameter or file and says how to fix it; runner cases assert a non-zero exit before
any kernel starts; and no committed result file, nor an earlier result file of the test,
changes (the autouse fixture compares every committed result file before and after each test).
"""

import json
import os
import re
import warnings

import pytest
import torch

from lib.core import io, paths
from lib import runner
from lib.core.interventions import Intervention
from lib.core.hooks import NonFiniteError, allow_nonfinite, patch
from lib.core.models import ModelNotFoundError, PromptError, load_model
from lib.core.params import ParameterError, check_namespace
from lib.core.parsers import parse_layers, parse_list, parse_positions, parse_sites
from lib.core.prompts import DuplicatePromptWarning, PromptFileError, load_pairs

RESULT_DIRS = [paths.SCORES, paths.TOKEN_SETS, paths.FULL_COMPUTE, paths.GRAPHS, paths.RUNS,
               paths.PROMPT_SET]


def _snapshot():
    out = {}
    for folder in RESULT_DIRS:
        for path in folder.rglob("*"):
            if path.is_file():
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def committed_results_unchanged():
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"committed result files changed: {changed[:5]}"


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def cli(tmp_path, capsys, notebooks, *args, models=("tiny-random",)):
    """Run the runner's CLI; returns (exit code, stderr). Asserts that nothing ran."""
    runs = tmp_path / "runs"
    argv = ["--notebooks", *notebooks, "--runs-dir", str(runs)]
    if models is not None:
        argv += ["--models", *models]
    rc = runner.main(argv + list(args))
    err = capsys.readouterr().err
    assert not list(runs.rglob("*.ipynb")) if runs.exists() else True, "a notebook ran"
    return rc, err


def expect_cli_error(tmp_path, capsys, notebooks, params, *fragments, models=("tiny-random",)):
    args = [a for p in params for a in ("-p", p)]
    rc, err = cli(tmp_path, capsys, notebooks, *args, models=models)
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


# --- through the runner: checked before any kernel starts ----------------------------------------

RUNNER_CASES = [
    # (id, notebooks, -p values, fragments the one-line error must contain)
    ("string-for-list", ["00"], ["COMPONENTS=mlp_out"],
     ["COMPONENTS", "expected a JSON list", "-p COMPONENTS='["]),
    ("name-escapes-folder", ["05"], ["NAME=../../escaped"], ["NAME", "leave its folder"]),
    ("name-absolute", ["05"], ["NAME=/tmp/x"], ["NAME", "leave its folder"]),
    ("misspelt-name", ["05"], ["LAYER=3"],
     ["LAYER is not declared", "did you mean LAYERS", "--help"]),
    ("misspelt-in-all", ["00", "01"], ["N_PROMPT=3"], ["N_PROMPT is not declared", "N_PROMPTS"]),
    ("int-not-a-number", ["00"], ["N_PROMPTS=abc"], ["N_PROMPTS", "integer", "-p N_PROMPTS=0"]),
    ("int-is-float", ["00"], ["N_PROMPTS=2.5"], ["N_PROMPTS", "expected an integer"]),
    ("layers-not-indices", ["05"], ["LAYERS=first"], ["LAYERS", "comma-separated integers"]),
    ("positions-not-indices", ["05"], ["POSITIONS=last"], ["POSITIONS", "comma-separated"]),
    ("negative-count", ["00"], ["N_PROMPTS=-3"], ["N_PROMPTS", "from 0 to 100000"]),
    ("zero-batch", ["05"], ["BATCH_SIZE=0"], ["BATCH_SIZE", "from 1 to 4096"]),
    ("size-above-its-bound", ["09"], ["DAS_N_TEST=1000000000"], ["DAS_N_TEST", "1 to 1000000"]),
    ("count-above-its-bound", ["08"], ["MLP_N_TRAIN=100000000"], ["MLP_N_TRAIN", "to 10000000"]),
    ("bool-word", ["00"], ["FORCE=maybe"], ["FORCE", "true or false"]),
    ("bool-number", ["00"], ["FORCE=1"], ["FORCE", "true or false"]),
    ("choice-typo", ["02"], ["METRIC=fishr"], ["METRIC", "did you mean 'fisher'"]),
    ("engine-choice", ["05"], ["ENGINE=fast"], ["ENGINE", "batched, naive"]),
    ("assignment-choice", ["01"], ["ASSIGNMENT=target"], ["ASSIGNMENT", "source, base"]),
    ("side-choice", ["03"], ["SIDE=left"], ["SIDE", "both, b_into_a, a_into_b"]),
    ("score-choice", ["01"], ["SCORE=rank"], ["SCORE", "dlogp, dprob"]),
    ("held-out-fraction", ["01"], ["HELD_OUT_FRACTION=1"], ["HELD_OUT_FRACTION", "from 0.05 to 0.95"]),
    ("prob-floor-zero", ["01"], ["PROB_FLOOR=0"], ["PROB_FLOOR", "from 1e-12 to 0.1"]),
    ("trace-kinds", ["06"], ["KINDS=hidden,mpl"], ["KINDS", "unknown ['mpl']"]),
    ("trace-kinds-empty", ["06"], ["KINDS=,"], ["KINDS", "is empty"]),
    ("dtype", ["00"], ["DTYPE=float64"], ["DTYPE", "bfloat16"]),
    ("device", ["05"], ["DEVICE=gpu"], ["DEVICE", "cuda"]),
    ("noise-negative", ["06"], ["NOISE=-1"], ["NOISE", "positive number"]),
    ("noise-word", ["06"], ["NOISE=loud"], ["NOISE", "auto, subject"]),
    ("missing-prompt-file", ["00"], ['PROMPT_FILES=["nope.json"]'],
     ["PROMPT_FILES", "nope.json", "does not exist", "cpp_python.json"]),
    ("empty-prompt-files", ["01"], ["PROMPT_FILES=[]"], ["PROMPT_FILES", "is empty"]),
    ("empty-prompt", ["06"], ["PROMPT="], ["PROMPT", "is empty"]),
    ("blank-base", ["05"], ["BASE=   "], ["BASE", "is empty"]),
    ("unknown-site", ["05"], ["COMPONENTS=mlp"], ["COMPONENTS", "unknown site kinds ['mlp']"]),
    ("component-01", ["01"], ['COMPONENTS=["resid_pre"]'], ["COMPONENTS", "attn_out, mlp_out"]),
    ("list-item-type", ["02"], ['ALPHAS=[0, "x"]'], ["ALPHAS", "item 1", "float"]),
    ("list-not-json", ["02"], ["ALPHAS=0,1"], ["ALPHAS", "JSON list"]),
    ("tokens-string", ["05"], ['TOKENS=" Madrid"'], ["TOKENS", "expected a list"]),
    ("severed-token", ["06"], ["SEVERED_TOKEN=-2"], ["SEVERED_TOKEN", "at least -1"]),
    ("model-as-param", ["00"], ["MODEL=x"], ["--models"]),
    ("no-equals", ["00"], ["N_PROMPTS"], ["NAME=VALUE"]),
    ("bad-name", ["00"], ["N-PROMPTS=3"], ["is not a name"]),
    ("all-problems-at-once", ["05"], ["TOP_K=0", "ENGINE=x"], ["TOP_K", "ENGINE"]),
]


@pytest.mark.parametrize("case", RUNNER_CASES, ids=[c[0] for c in RUNNER_CASES])
def test_runner_refuses_bad_parameters_before_any_work(case, tmp_path, capsys):
    _, notebooks, params, fragments = case
    expect_cli_error(tmp_path, capsys, notebooks, params, *fragments)


def test_runner_refuses_an_empty_model_name(tmp_path, capsys):
    expect_cli_error(tmp_path, capsys, ["00"], [], "model name ''", "--models smollm2-135m",
                     models=[""])


def test_runner_refuses_no_model(tmp_path, capsys):
    expect_cli_error(tmp_path, capsys, ["00"], [], "no model given", models=[])


def test_runner_refuses_an_unknown_model_listing_the_known_ones(tmp_path, capsys):
    expect_cli_error(tmp_path, capsys, ["00"], [], "unknown model 'smollm-135m'", "smollm2-135m",
                     models=["smollm-135m"])


def test_runner_refuses_an_unknown_notebook(tmp_path, capsys):
    expect_cli_error(tmp_path, capsys, ["99"], [], "no notebook matches '99'", "00_layer_scores")


@pytest.mark.parametrize("value", ["0", "-5", "abc"])
def test_runner_refuses_a_bad_timeout(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--notebooks", "00", "--timeout", value, "--runs-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_runner_refuses_an_unwritable_runs_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = runner.main(["--notebooks", "00", "--models", "tiny-random",
                      "--runs-dir", str(blocker / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "--runs-dir" in err and "not writable" in err and "Traceback" not in err


def test_runner_refuses_a_read_only_runs_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write to read-only folders (root)")
        rc = runner.main(["--notebooks", "00", "--models", "tiny-random", "--runs-dir", str(ro)])
        err = capsys.readouterr().err
        assert rc == 2 and "--runs-dir" in err and "not writable" in err
    finally:
        ro.chmod(0o755)


def test_cli_text_for_str_parameters_is_the_text_itself(tmp_path):
    notebooks = runner.select_notebooks(["05", "06"])
    checked = runner.check_run(notebooks, ["tiny-random"],
                               runner.parse_params(["LAYERS=5", "PROMPT=42", 'NAME="quoted"']),
                               tmp_path)
    nb05, nb06 = notebooks
    assert checked[nb05] == {"LAYERS": "5", "NAME": "quoted"}  # -p LAYERS=5 is layer 5
    # a notebook gets only what it declares (06 has LAYERS and PROMPT, not NAME)
    assert checked[nb06] == {"LAYERS": "5", "PROMPT": "42"}


def test_a_parameter_declared_by_some_selected_notebooks_is_fine(tmp_path):
    notebooks = runner.select_notebooks(["00", "05"])
    checked = runner.check_run(notebooks, ["tiny-random"], runner.parse_params(["NAME=x"]),
                               tmp_path)
    assert checked == {notebooks[0]: {}, notebooks[1]: {"NAME": "x"}}


def test_library_callers_of_run_notebooks_are_checked_too(tmp_path):
    with pytest.raises(ParameterError, match="COMPONENTS"):
        runner.run_notebooks(runner.select_notebooks(["00"]), ["tiny-random"],
                             {"COMPONENTS": "mlp_out"}, runs_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.ipynb"))


@pytest.fixture(scope="module")
def sleep_dir(tmp_path_factory):
    import nbformat

    folder = tmp_path_factory.mktemp("sleep_nb")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"}}
    params = nbformat.v4.new_code_cell(
        'MODEL: str = "m"  # model\nSECONDS: float = 60  # [0..] how long to sleep\n'
        'PID_FILE: str = ""  # where the kernel writes its pid')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        'import os, time\nif PID_FILE:\n    open(PID_FILE, "w").write(str(os.getpid()))\n'
        'time.sleep(SECONDS)')]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    nbformat.write(nb, str(folder / "00_sleep.ipynb"))
    return folder


def test_a_cell_past_the_timeout_is_a_clear_failure_not_a_traceback(sleep_dir, tmp_path, capsys):
    rc = runner.main(["--notebook-dir", str(sleep_dir), "--models", "tiny-random", "--runs-dir",
                      str(tmp_path), "-p", "SECONDS=60", "--timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED: 00_sleep.ipynb" in err and "--timeout 2 s" in err and "raise --timeout" in err
    assert (tmp_path / "tiny-random" / "00_sleep.failed.ipynb").exists()
    assert not list(tmp_path.rglob(".*.running.ipynb"))


def test_09_refuses_layers_the_model_lacks_before_fine_tuning(tmp_path, capsys):
    """Layers beyond the model (09's defaults 14, 22 on an 18-block model) are refused as soon
    as the model's size is known: before the accuracy as shipped and the fine-tune."""
    fc = tmp_path / "fc"
    rc = runner.main(["--notebooks", "09", "--models", "tiny-random", "--runs-dir",
                      str(tmp_path / "runs"), "-p", "LAYERS=0,5", "-p", "GRAPH_LAYERS=0",
                      "-p", f"FULL_COMPUTE_DIR={fc}", "-p", f"GRAPHS_DIR={tmp_path / 'g'}",
                      "-p", f"CACHE_DIR={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED: 09_das_arithmetic.ipynb" in err and "LAYERS" in err, err
    assert not list(fc.rglob("*.json")) and not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("param, value, fragment", [
    ("CUMULATIVE_POSITIONS", "[99]", "CUMULATIVE_POSITIONS [99] out of range"),
    ("CUMULATIVE_POSITIONS", "[-99, 5]", "CUMULATIVE_POSITIONS [-99] out of range"),
    ("LINEAGE_NODE", "bogus", "unknown node 'bogus'"),
    ("LINEAGE_NODE", "a99", "layer 99 out of range"),
    ("LINEAGE_NODE", "logits", "LINEAGE_NODE: logits is no node"),
    ("IOI_FILE", "nope.json", "IOI file"),
])
def test_07_refuses_meaningless_inputs_before_any_study(param, value, fragment, tmp_path,
                                                         capsys):
    """Positions beyond the prompt no longer wrap around, an unknown lineage node no longer
    draws a trivial tree, a missing IOI file is named: all before the first study runs."""
    fc = tmp_path / "fc"
    rc = runner.main(["--notebooks", "07", "--models", "tiny-random", "--runs-dir",
                      str(tmp_path / "runs"), "-p", f"{param}={value}",
                      "-p", f"FULL_COMPUTE_DIR={fc}", "-p", f"GRAPHS_DIR={tmp_path / 'g'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED: 07_path_patching.ipynb" in err, err
    assert fragment in err, err
    assert not list(fc.rglob("*.json")) and not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("notebook, stem, result, extra, model_line", [
    # 06: the model line its loading cell prints is never printed
    ("06", "06_causal_tracing", "causal_trace_hidden", ["-p", "N_FACTS=-1"],
     "tiny-random: 2 layers"),
    # 07: the traceback ends in check_results, before load_model's weights are read
    ("07", "07_path_patching", "path_patching_eap", [], "Loading weights"),
])
def test_a_result_of_another_kind_is_refused_before_the_model_loads(
        notebook, stem, result, extra, model_line, tmp_path, capsys):
    """05's result where 06's hidden-state trace (07's EAP result) goes: refused by
    check_results in the cell that loads the model, before load_model, and the file is left as
    it was."""
    import shutil

    fc = tmp_path / "fc"
    target = fc / "tiny-random" / f"{result}.json"
    target.parent.mkdir(parents=True)
    shutil.copy(paths.FULL_COMPUTE / "smollm2-135m" / "interchange_default.json", target)
    before = target.read_bytes()
    rc = runner.main(["--notebooks", notebook, "--models", "tiny-random", "--runs-dir",
                      str(tmp_path / "runs"), "-p", f"FULL_COMPUTE_DIR={fc}",
                      "-p", f"GRAPHS_DIR={tmp_path / 'g'}", *extra])
    err = capsys.readouterr().err
    assert rc == 1 and f"FAILED: {stem}.ipynb" in err, err
    assert f"{result}.json holds a interchange" in err or "WrongKindError" in err, err
    [failed] = (tmp_path / "runs").rglob(f"{stem}.failed.ipynb")
    text = failed.read_text()
    assert "check_results(" in text and "load_model(MODEL" in text
    assert "WrongKindError" in text and model_line not in text   # the model never loaded
    assert target.read_bytes() == before and sorted(p.name for p in target.parent.iterdir()) == \
        [f"{result}.json"]


def test_check_results_refuses_another_kind_and_sets_aside_an_unreadable_file(tmp_path):
    """lib.core.io.check_results, the check a notebook runs on all its result files before its
    model loads: missing files pass, an unreadable or malformed one is set aside (left alone
    with force, which overwrites it), another kind's valid result is refused, nothing moved."""
    from lib.core.schema import WrongKindError
    from lib.studies import steps

    files = steps.trace_files(tmp_path, ["hidden", "mlp"], True, True)
    assert sorted(p.name for p in files) == ["causal_trace_facts.json",
                                             "causal_trace_hidden.json",
                                             "causal_trace_mlp.json", "causal_trace_severed.json"]
    io.check_results(files)                                     # nothing stored: fine
    hidden, mlp = tmp_path / "causal_trace_hidden.json", tmp_path / "causal_trace_mlp.json"
    hidden.write_text('{"answer": "Par')
    mlp.write_text('{"answer": "Paris"}')
    io.check_results(files, force=True)                         # forced: left to be overwritten
    assert hidden.exists() and mlp.exists()
    with pytest.warns(io.ResultFileWarning, match="causal_trace_hidden.json could not be read"):
        io.check_results(files)
    assert not hidden.exists() and not mlp.exists()
    assert (tmp_path / "causal_trace_hidden.json.set-aside").exists()
    assert (tmp_path / "causal_trace_mlp.json.set-aside").exists()
    other = paths.FULL_COMPUTE / "smollm2-135m" / "causal_trace_severed.json"
    hidden.write_bytes(other.read_bytes())                      # 06's own, but another kind
    for force in (False, True):
        with pytest.raises(WrongKindError, match=r"causal_trace_hidden.json holds a "
                           r"causal_trace_severed result .*nothing was moved"):
            io.check_results(files, force=force)
    assert hidden.read_bytes() == other.read_bytes()


def test_a_truncated_ioi_file_is_named(tmp_path):
    from lib.studies import ioi

    bad = tmp_path / "ioi.json"
    bad.write_text('[{"base": "When Mary', encoding="utf-8")
    with pytest.raises(ValueError, match="IOI file .*ioi.json is not valid JSON"):
        ioi.load_ioi(bad)


@pytest.mark.parametrize("params, fragment", [
    ({"CAUSAL_MODELS": "7,7"}, "CAUSAL_MODELS names [7, 7]"),
    ({"RANKS": [4, 4]}, "RANKS names [4, 4]"),
    ({"GRAPH_ARRANGEMENTS": 1}, "GRAPH_ARRANGEMENTS = 1"),
    ({"GRAPH_ARRANGEMENTS": 300}, "more than the 200 test arrangements"),
    ({"N_VAL": 500, "N_TEST": 500}, "N_VAL + N_TEST = 1000"),
    ({"RANKS": [4, 4000], "GRAPH_ARRANGEMENTS": 0}, "exceed tiny-random's width"),
])
def test_09_refuses_before_the_shipped_accuracy_and_the_fine_tune(params, fragment, tmp_path):
    """Values that would run twice, a graph of one node, no training arrangement, a rank
    wider than the model: refused before anything is measured or trained."""
    from lib.studies.das import arithmetic_study as study
    from lib.core.params import ParameterError, read_parameters

    values = {name: p.default for name, p in read_parameters(study.NOTEBOOK).items()}
    values.update(MODEL="tiny-random", LAYERS="0,1", GRAPH_LAYERS="1",
                  FULL_COMPUTE_DIR=str(tmp_path / "fc"), CACHE_DIR=str(tmp_path / "cache"),
                  **params)
    with pytest.raises(ParameterError, match=re.escape(fragment)):
        study.Notebook(values).finetune()
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("notebook, param, value", [
    ("09", "DAS_N_TEST", 1000000), ("09", "DAS_N_TRAIN", 1000000),
    ("08", "MLP_N_TRAIN", 10000000), ("08", "DAS_N_TRAIN", 10000000)])
def test_a_size_that_will_not_fit_in_memory_is_refused_before_any_model_call(
        notebook, param, value, tmp_path, monkeypatch):
    """Within its declared bound, but more than this machine has (here: 300 MB available for
    09, 2 GB for 08, whose defaults take 1.3 GB): the
    notebook's study refuses it when built, naming the parameter, the estimate, the memory
    available and the largest value that fits, before any model loads or data is built; that
    largest value is then accepted."""
    from lib.core import memory
    from lib.core.params import read_parameters
    from lib.studies.das import arithmetic_study, mlp_study

    study = arithmetic_study if notebook == "09" else mlp_study
    available = 300 * 10 ** 6 if notebook == "09" else 2 * 10 ** 9
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": available)
    monkeypatch.setattr("lib.core.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    values = {name: p.default for name, p in read_parameters(study.NOTEBOOK).items()}
    values.update(FULL_COMPUTE_DIR=str(tmp_path / "fc"), CACHE_DIR=str(tmp_path / "cache"),
                  GRAPHS_DIR=str(tmp_path / "g"), THREADS=0, **{param: value})
    with pytest.raises(memory.WontFitError) as err:
        study.Notebook(values)
    message = str(err.value)
    assert f"{param}={value} needs about" in message
    assert f"of the {'300.0 MB' if notebook == '09' else '2.0 GB'} available on cpu" in message
    largest = int(re.search(rf"the largest {param} that fits is about (\d+)", message)[1])
    assert 0 < largest < value
    study.Notebook({**values, param: largest})       # the value it names fits
    assert not list(tmp_path.rglob("*.*"))


def test_00_refuses_projections_that_will_not_fit_before_any_forward(monkeypatch):
    """N_PROJECTIONS=100000 within its bound, with 50 MB available: refused once the model's
    width is known, before any activation is computed."""
    from lib.core import memory
    from lib.core.prompts import PromptPairs
    from lib.studies import separability, steps

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 50 * 10 ** 6)
    monkeypatch.setattr(separability, "score_layers", lambda *a, **k: pytest.fail("ran"))
    pairs = PromptPairs("x_y", ("x", "y"), tuple(f"write x {i}" for i in range(8)),
                        tuple(f"write y {i}" for i in range(8)))
    with pytest.raises(memory.WontFitError, match=r"N_PROJECTIONS=100000 needs about .* the "
                                                  r"largest N_PROJECTIONS that fits is about \d+"):
        steps.layer_scores("tiny-random", "cpu", "float32", [pairs], "all", ["resid_post"],
                           ["wasserstein"], 5, 100000, 0, 4, 0, {})


def test_check_fits_names_the_largest_value_and_reads_the_machine():
    from lib.core import memory

    assert memory.available_bytes() > 0                  # /proc/meminfo on this machine
    memory.check_fits("N", 10, 1.0)                      # a few bytes always fit
    with pytest.raises(memory.WontFitError, match=r"N=10\d* needs about .* the largest N "
                       r"that fits is about \d+: lower it"):
        memory.check_fits("N", 10 ** 18, 1000.0)


def test_a_name_with_a_trailing_newline_is_refused(tmp_path, capsys):
    expect_cli_error(tmp_path, capsys, ["05"], ["NAME=run\n"], "NAME", "plain file-name part")


def test_a_gpu_this_machine_lacks_is_refused_before_any_kernel(tmp_path, capsys):
    import torch

    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    expect_cli_error(tmp_path, capsys, ["05"], ["DEVICE=cuda:3"], "DEVICE", "not on this machine",
                     "use auto")


def test_a_malformed_source_date_epoch_is_refused_before_any_kernel(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "abc")
    expect_cli_error(tmp_path, capsys, ["05"], [], "SOURCE_DATE_EPOCH='abc'", "unset it")


def test_an_unwritable_model_cache_is_named(tmp_path, monkeypatch):
    from lib.core import models

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setattr(models.paths, "MODEL_CACHE", blocker / "models")
    with pytest.raises(OSError, match="CAUSAL_MODEL_CACHE"):
        models._load_embedded("smollm2-135m")


@pytest.mark.parametrize("how", ["truncated", "nan", "shape", "missing", "source"])
def test_a_damaged_model_cache_is_named_with_the_fix_and_never_reconverted(how, tmp_path,
                                                                          monkeypatch):
    """The safetensors copy of a converted GGUF model (a tiny stand-in here) read back checked:
    cut short, a NaN, a misshapen or missing tensor (transformers would fill it with random
    values and only warn), an unreadable source.json: each names the file and says to delete
    the folder so the next load converts again. Nothing is converted in the test."""
    from safetensors.torch import load_file, save_file

    from lib.core import models

    model, tokenizer, _ = models._build_tiny("tiny-random-llama", 0)
    cache = tmp_path / "models" / "smollm2-135m"
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    (cache / "source.json").write_text(json.dumps({"kind": "gguf", "file": "x.gguf",
                                                   "sha256": "0" * 64}))
    monkeypatch.setattr(models.paths, "MODEL_CACHE", tmp_path / "models")
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    loaded, _, source = models._load_embedded("smollm2-135m")   # the intact copy loads
    assert source["file"] == "x.gguf" and loaded.config.num_hidden_layers == 2
    weights = cache / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.0.mlp.down_proj.weight"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif how == "source":
        (cache / "source.json").write_text('{"kind": "gg')
    else:
        if how == "nan":
            tensors[name][0, 0] = float("nan")
        elif how == "shape":
            tensors[name] = tensors[name][:-1]
        else:
            del tensors[name]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    shown = "source.json" if how == "source" else "model.safetensors"
    with pytest.raises(models.ModelCacheError,
                       match=rf"{shown}: .*delete the folder .*smollm2-135m and load "
                             "smollm2-135m again to convert it afresh"):
        models._load_embedded("smollm2-135m")


def test_an_output_folder_that_cannot_take_a_file_is_refused_before_the_computation(tmp_path):
    """A file where the folder should be (as a read-only, full or dangling folder would):
    refused before compute runs, so no computation is lost."""
    from lib.core.io import load_or_compute

    blocker = tmp_path / "out"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    ran = []
    with pytest.raises(OSError, match="cannot take a result file"):
        load_or_compute(blocker / "r.json", {"a": 1},
                        lambda: ran.append(1) or ({"x": 1}, {"parameters": {"a": 1}}))
    assert not ran


def test_a_prompt_file_too_small_for_the_folds_is_refused_before_the_model(monkeypatch):
    """A one-pair file used to fail deep in the scoring, and the advice named N_FOLDS <= 0,
    which the parameter's own rule refuses."""
    from lib.core.prompts import PromptPairs
    from lib.studies import steps

    loaded = []
    monkeypatch.setattr("lib.core.models.load_model", lambda *a, **k: loaded.append(1))
    one = PromptPairs("tiny_pair", ("x", "y"), ("write x",), ("write y",))
    with pytest.raises(ValueError, match=r"tiny_pair: 1 pairs are too few .*at least 4 prompts"):
        steps.layer_scores("tiny-random", "cpu", "float32", [one], "all", ["resid_post"],
                           ["fisher"], 5, 8, 0, 4, 0, {})
    assert not loaded


# --- through the library ---------------------------------------------------------------------

def test_parameter_values_are_checked_inside_the_notebook_too():
    nb06 = paths.NOTEBOOKS / "06_causal_tracing.ipynb"
    with pytest.raises(ParameterError, match=r"PROMPT=42 .*expected a string"):
        check_namespace(nb06, {"PROMPT": 42})
    nb05 = paths.NOTEBOOKS / "05_interchange_intervention.ipynb"
    with pytest.raises(ParameterError, match=r"LAYERS=5 .*quote it"):
        check_namespace(nb05, {"LAYERS": 5})
    with pytest.raises(ParameterError, match="COMPONENTS"):
        check_namespace(paths.NOTEBOOKS / "00_layer_scores.ipynb", {"COMPONENTS": "mlp_out"})
    check_namespace(nb05, {"LAYERS": "0,1", "NAME": "ok-name_1.2"})  # good values pass


@pytest.mark.parametrize("call,fragments", [
    (lambda: parse_layers("abc", 4), ["LAYERS", "comma-separated integers"]),
    (lambda: parse_layers("9", 4), ["LAYERS [9] out of range", "0 to 3", "-4 to -1"]),
    (lambda: parse_layers(",", 4), ["LAYERS is empty"]),
    (lambda: parse_layers(True, 4), ["LAYERS"]),
    (lambda: parse_positions([7], 5), ["POSITIONS [7] out of range", "token positions"]),
    (lambda: parse_sites("mlp"), ["COMPONENTS", "unknown component 'mlp'", "mlp_out"]),
    (lambda: parse_sites(""), ["COMPONENTS is empty"]),
    (lambda: parse_list("0,x", float, "ALPHAS"), ["ALPHAS", "float"]),
])
def test_parsers_name_the_parameter_and_the_fix(call, fragments):
    with pytest.raises(ParameterError) as err:
        call()
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_string_list_parameter_is_never_split_into_characters():
    assert parse_list("mlp_out") == ["mlp_out"]
    assert parse_sites("mlp_out") == ["mlp_out"]


def test_output_names_cannot_leave_their_folder(tmp_path):
    for bad in ("../../escaped.json", "/etc/passwd", "a/../../b.json"):
        with pytest.raises(ValueError, match="would leave"):
            io.inside(tmp_path, bad)
    assert io.inside(tmp_path, "interchange_x.json") == tmp_path / "interchange_x.json"
    for name in ("../..", "a/../b", "../../escaped", "owner/name"):
        assert "/" not in io.slug(name) and not io.slug(name).startswith(".")
    assert io.slug("owner/name") == "owner__name"
    for name in ("..", "/", " "):
        with pytest.raises(ValueError, match="empty folder name"):
            io.slug(name)


def test_empty_model_name_in_the_library():
    with pytest.raises(ModelNotFoundError, match="empty"):
        load_model("")


def test_an_empty_prompt_is_refused(lm):
    for text in ("", "   "):
        with pytest.raises(PromptError, match="empty prompt"):
            lm.tokenize(text)
    from lib.studies.interchange import run_interchange

    with pytest.raises(PromptError, match="empty prompt"):
        run_interchange(lm, "", "", ["a"], progress=False)


def test_a_prompt_longer_than_the_context_is_refused_with_the_length_and_the_limit(lm):
    long_prompt = "word " * 2000
    with pytest.raises(PromptError) as err:
        lm.tokenize(long_prompt)
    assert "10001 tokens" in str(err.value) and "256 tokens" in str(err.value)
    from lib.studies.tracing import CausalTracer

    with pytest.raises(PromptError, match="context"):
        CausalTracer(lm, long_prompt, "word", noise=0.1, samples=1)


def _iv(lm, **kw):
    return Intervention("blocks.0.mlp_out", positions=(1,), **kw)


def test_nan_from_an_intervention_names_the_site_and_row(lm):
    x = torch.zeros(3, 4, lm.d_model)
    value = torch.zeros(3, 1, lm.d_model)
    value[2, 0, 5] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        _iv(lm, value=value, source="my source").apply(x)
    message = str(err.value)
    assert "'blocks.0.mlp_out'" in message and "rows [2]" in message and "1 NaN" in message
    assert "allow_nonfinite" in message
    with allow_nonfinite():  # the opt-out
        out = _iv(lm, value=value).apply(x)
    assert torch.isnan(out).sum() == 1


def test_inf_from_a_function_intervention_through_a_model_run(lm):
    ids = lm.tokenize(["abcd", "efgh"])
    iv = Intervention("blocks.1.resid_post", positions=(2,), kind="function", rows=(1,),
                      fn=lambda a: a * float("inf"))
    with pytest.raises(NonFiniteError, match=r"'blocks.1.resid_post'.*rows \[1\]"):
        with patch(lm, [iv]):
            lm.model(input_ids=ids)


def test_a_replace_value_of_the_wrong_shape_is_a_clear_error(lm):
    x = torch.zeros(2, 4, lm.d_model)
    with pytest.raises(ValueError) as err:
        _iv(lm, value=torch.zeros(2, 1, lm.d_model + 1)).apply(x)
    message = str(err.value)
    assert "'blocks.0.mlp_out'" in message and f"(2, 1, {lm.d_model})" in message
    assert "give a value of that shape" in message


def test_a_function_returning_none_is_a_clear_error(lm):
    def forgot_return(a):
        a.mul_(2)

    with pytest.raises(TypeError, match=r"forgot_return returned NoneType at 'blocks.0.mlp_out'"):
        _iv(lm, kind="function", fn=forgot_return).apply(torch.zeros(1, 4, lm.d_model))


def test_a_string_value_is_a_clear_error(lm):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _iv(lm, value="0.5").apply(torch.zeros(1, 4, lm.d_model))


# --- result files ----------------------------------------------------------------------------

def test_a_result_that_fails_its_schema_check_is_not_written(tmp_path):
    target = tmp_path / "scores.json"
    io.write_json(target, {"ok": 1})
    before = target.read_bytes()

    def check(payload):
        if "components" not in payload:
            raise ValueError("no 'components'")

    with pytest.raises(ValueError, match=r"not writing .*scores.json.*no 'components'.*nothing"):
        io.write_json(target, {"ok": 2}, check=check)
    assert target.read_bytes() == before


def test_00_schema_check_refuses_split_components(tmp_path):
    from lib.studies import separability as S

    bad = {"model": "m", "components": list("mlp_out"), "metrics": ["fisher"], "layers": [0],
           "n_prompts": 1, "comparisons": []}
    target = tmp_path / "m.json"
    with pytest.raises(ValueError, match="not writing"):
        io.write_json(target, bad, check=S.validate_scores)
    assert not target.exists()


def test_a_truncated_unit_file_is_named_set_aside_and_recomputed(tmp_path):
    store = io.UnitStore(tmp_path, {"k": 1})
    store.put("fact_000", {"x": 1})
    unit = tmp_path / "fact_000.json"
    unit.write_text(unit.read_text()[:15])  # an interrupted copy, a full disk ...
    with pytest.warns(io.ResultFileWarning, match=r"fact_000.json could not be read.*set it aside"):
        value = io.UnitStore(tmp_path, {"k": 1}).get_or_compute("fact_000", lambda: {"x": 2})
    assert value == {"x": 2}
    assert json.loads(unit.read_text())["value"] == {"x": 2}
    assert (tmp_path / "fact_000.json.set-aside").exists()


def test_a_unit_file_of_another_shape_is_set_aside(tmp_path):
    (tmp_path / "u.json").write_text("[1, 2]")
    with pytest.warns(io.ResultFileWarning, match="not a unit file"):
        assert io.UnitStore(tmp_path, {}).get("u") is None


def test_a_corrupt_result_file_is_named_set_aside_and_recomputed(tmp_path):
    target = tmp_path / "interchange_x.json"
    target.write_text('{"records": [1, 2')
    with pytest.warns(io.ResultFileWarning, match="interchange_x.json could not be read"):
        assert io.read_current(target, {"A": 1}) is None
    assert not target.exists() and (tmp_path / "interchange_x.json.set-aside").exists()
    target.write_text("{}")
    with pytest.warns(io.ResultFileWarning):
        io.read_current(target, {"A": 1}, check=lambda d: d["records"])
    assert (tmp_path / "interchange_x.json.set-aside-2").exists()


def test_cross_model_figures_never_silently_drop_an_unreadable_model(tmp_path):
    from lib.studies.domain_swap import load_all_full_compute

    (tmp_path / "model-a.json").write_text('{"pairs": ')
    with pytest.raises(ValueError, match=r"model-a.json is not valid JSON.*FORCE=True"):
        load_all_full_compute(tmp_path)


def test_read_json_on_a_binary_file_names_it(tmp_path):
    path = tmp_path / "weird.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="weird.json is not valid JSON"):
        io.read_json(path)


def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "r.json"
    stray = tmp_path / ".r.json.999999999.abcd.tmp"  # a pid that does not exist
    stray.write_text("half")
    io.write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_one_side_repeating_a_prompt_warns_and_a_repeated_pair_fails(tmp_path):
    data = [{"a": "x one", "b": "y one"}, {"a": "x two", "b": "y one"}]
    path = tmp_path / "a_b.json"
    path.write_text(json.dumps(data))
    with pytest.warns(DuplicatePromptWarning, match=r"a_b.json.*entry 1 repeats entry 0 on 'b'"):
        assert len(load_pairs(path)) == 2
    path.write_text(json.dumps(data + [dict(data[0])]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DuplicatePromptWarning)
        with pytest.raises(PromptFileError, match=r"a_b.json: entry 2 repeats the whole pair"):
            load_pairs(path)


def test_the_generic_schema_check_catches_a_string_split_into_characters(tmp_path):
    check = io.require_keys("model", lists=("components",))
    target = tmp_path / "token_sets.json"
    with pytest.raises(ValueError, match=r"token_sets.json.*'components' is a string split"):
        io.write_json(target, {"model": "m", "components": list("mlp_out")}, check=check)
    with pytest.raises(ValueError, match=r"missing keys \['model'\]"):
        io.write_json(target, {"components": ["mlp_out"]}, check=check)
    assert not target.exists()
    io.write_json(target, {"model": "m", "components": ["mlp_out"]}, check=check)
    assert io.read_current(target, {}, check=check) is None  # no provenance: not current


def test_02_refuses_token_sets_found_on_every_prompt():
    """A token-set file without a discovery/held-out split (written before splits, or by hand)
    would make 02's effects circular: a clear error naming the fix, before any model runs."""
    from lib.studies import domain_swap as ds
    from lib.core.prompts import PromptPairs

    pairs = PromptPairs("p_q", ("p", "q"), ("a", "b"), ("c", "d"))
    sets = {"model": "tiny-random", "top_n": 1, "pairs": {"p_q": {"p": [], "q": []}}}
    with pytest.raises(ds.TokenSetMissingError, match="circular.*rerun 01_reverse_intervention"):
        ds.full_compute_unit(None, pairs, [0], sets, {})
