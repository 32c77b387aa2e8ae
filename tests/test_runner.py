"""The papermill runner, on two small notebooks under tests/notebooks."""

import json
from pathlib import Path

import pytest

from lib import runner

NB_DIR = Path(__file__).parent / "notebooks"


def test_runs_in_order_with_parameters(tmp_path):
    notebooks = runner.select_notebooks(["00"], NB_DIR)
    done = runner.run_notebooks(notebooks, ["model-a", "model-b"], {"REPEAT": 3},
                                runs_dir=tmp_path, progress=False)
    assert done == [tmp_path / "model-a" / "00_ok.ipynb", tmp_path / "model-b" / "00_ok.ipynb"]
    nb = json.loads(done[1].read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "model is model-bmodel-bmodel-b" in text
    assert not list(tmp_path.rglob(".*.running.ipynb"))


def test_stops_at_first_failure_and_names_notebook_cell_error(tmp_path):
    notebooks = runner.select_notebooks(["01", "00"], NB_DIR)
    assert [p.stem for p in notebooks] == ["00_ok", "01_fail"]
    with pytest.raises(runner.NotebookFailed) as err:
        runner.run_notebooks(notebooks[::-1], ["m1", "m2"], runs_dir=tmp_path, progress=False)
    message = str(err.value)
    assert "01_fail.ipynb" in message and "cell" in message
    assert "ValueError: deliberate failure for m1" in message
    assert (tmp_path / "m1" / "01_fail.failed.ipynb").exists()
    assert not (tmp_path / "m2").exists()  # stopped before the second model


def test_cli_exit_codes_and_help(tmp_path, capsys):
    rc = runner.main(["--notebook-dir", str(NB_DIR), "--notebooks", "01", "--models",
                      "tiny-random", "--runs-dir", str(tmp_path)])
    assert rc == 1
    assert "deliberate failure" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--notebook-dir", str(NB_DIR), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "00_ok" in out and "REPEAT: int = 2" in out and "01_fail" in out
    with pytest.raises(runner.ParameterError, match="no notebook matches '07'"):
        runner.select_notebooks(["07"], NB_DIR)


def test_parse_params_keeps_the_text_until_the_type_is_known():
    from lib.core.params import CliText, ParameterError

    parsed = runner.parse_params(["A=3", "B=true", 'C="x"', "D=hello", "E=[1, 2]", "F=a=b"])
    assert parsed == {"A": "3", "B": "true", "C": '"x"', "D": "hello", "E": "[1, 2]", "F": "a=b"}
    assert all(isinstance(v, CliText) for v in parsed.values())
    with pytest.raises(ParameterError, match="NAME=VALUE"):
        runner.parse_params(["oops"])


def test_notebook_without_model_runs_once_under_its_own_name(tmp_path):
    notebooks = runner.select_notebooks(["00", "02"], NB_DIR)
    assert runner.takes_model(notebooks[0]) and not runner.takes_model(notebooks[1])
    done = runner.run_notebooks(notebooks, ["m1", "m2"], {"REPEAT": 3}, runs_dir=tmp_path,
                                progress=False)
    assert done == [tmp_path / "m1" / "00_ok.ipynb", tmp_path / "m2" / "00_ok.ipynb",
                    tmp_path / "no_model" / "02_no_model.ipynb"]
    nb = json.loads(done[2].read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "no modelno modelno model" in text
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "MODEL" not in "".join(injected[0]["source"])


def test_cli_values_are_converted_to_the_declared_type(tmp_path):
    notebooks = runner.select_notebooks(["00"], NB_DIR)
    checked = runner.check_run(notebooks, ["m"], runner.parse_params(["REPEAT=3"]), tmp_path,
                               check_models=False)
    assert checked[notebooks[0]] == {"REPEAT": 3}


def test_a_successful_run_removes_the_failed_and_running_copies_of_earlier_runs(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "00_ok.failed.ipynb").write_text("{}")
    (out / ".00_ok.running.ipynb").write_text("{}")
    runner.run_notebooks(runner.select_notebooks(["00"], NB_DIR), ["m"], runs_dir=tmp_path,
                         progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00_ok.ipynb"]


def _sleep_notebook(folder: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"}}
    params = nbformat.v4.new_code_cell('MODEL: str = "m"  # model\nPID_FILE: str = ""  # pid file')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        'import os, time\nopen(PID_FILE, "w").write(str(os.getpid()))\ntime.sleep(300)')]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    nbformat.write(nb, str(folder / "00_sleep.ipynb"))
    return folder


def test_the_kernel_dies_with_the_runner(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = _sleep_notebook(tmp_path)
    pid_file = tmp_path / "kernel.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lib.runner", "--notebook-dir", str(folder), "--models",
         "tiny-random", "--runs-dir", str(tmp_path / "runs"), "-p", f"PID_FILE={pid_file}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        kernel = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "STOPPED" in err and "kernel was shut down" in err
    for _ in range(50):
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(kernel, signal.SIGKILL)
        pytest.fail("the kernel outlived the runner")
    assert (tmp_path / "runs" / "tiny-random" / "00_sleep.failed.ipynb").exists()


@pytest.mark.slow
def test_a_small_notebook_rerun_gives_byte_identical_results(tmp_path, monkeypatch):
    """05 on a tiny model, twice, into two folders: the result JSON is the same byte for byte
    (the time is pinned with SOURCE_DATE_EPOCH; the rest of provenance has no timing)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    nb = runner.select_notebooks(["05"])
    outputs = []
    for run in ("first", "second"):
        params = {"BASE": "abcd", "SOURCE": "abce", "TOKENS": ["x", "y"], "LAYERS": "all",
                  "NAME": "bytes", "FULL_COMPUTE_DIR": str(tmp_path / run / "fc"),
                  "GRAPHS_DIR": str(tmp_path / run / "graphs"), "ATTRIBUTION": False}
        runner.run_notebooks(nb, ["tiny-random"], params, runs_dir=tmp_path / run / "runs",
                             progress=False)
        outputs.append(tmp_path / run / "fc" / "tiny-random" / "interchange_bytes.json")
    first, second = (p.read_bytes() for p in outputs)
    assert first == second
    prov = json.loads(first)["provenance"]
    assert prov["torch_threads"] >= 1 and prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert "converted_in_s" not in json.dumps(prov)


def test_a_rerun_of_the_same_content_keeps_the_executed_copy(tmp_path):
    """Run times, papermill's random id of the injected cell and reprs' memory addresses differ
    between two runs of the same content; the copy keeps its bytes (git status stays clean)."""
    notebooks = runner.select_notebooks(["00"], NB_DIR)
    [done] = runner.run_notebooks(notebooks, ["m"], {"REPEAT": 2}, runs_dir=tmp_path,
                                  progress=False)
    first = done.read_bytes()
    nb = json.loads(first)
    assert "injected-parameters" in [c.get("id") for c in nb["cells"]]
    runner.run_notebooks(notebooks, ["m"], {"REPEAT": 2}, runs_dir=tmp_path, progress=False)
    assert done.read_bytes() == first
    runner.run_notebooks(notebooks, ["m"], {"REPEAT": 3}, runs_dir=tmp_path, progress=False)
    assert done.read_bytes() != first   # other outputs: rewritten
    assert not list(tmp_path.rglob(".*.running.ipynb"))


def test_executed_content_ignores_times_and_nothing_else(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"execution": {"t": 1},
                                                      "papermill": {"duration": 1.5,
                                                                    "status": "completed"}},
                     "outputs": [{"text": "x"}], "source": "print(1)"}],
          "metadata": {"papermill": {"start_time": "a", "end_time": "b", "duration": 2,
                                     "parameters": {"M": 1}}}}
    a, b = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    a.write_text(json.dumps(nb))
    nb["metadata"]["papermill"].update(start_time="c", duration=9)
    nb["cells"][0]["metadata"]["papermill"]["duration"] = 7
    b.write_text(json.dumps(nb))
    assert runner.executed_content(a) == runner.executed_content(b)
    nb["cells"][0]["outputs"][0]["text"] = "y"
    b.write_text(json.dumps(nb))
    assert runner.executed_content(a) != runner.executed_content(b)


def test_force_sets_force_in_the_notebooks_that_declare_it(tmp_path):
    real = runner.select_notebooks(["00", "03"])   # 00 declares FORCE, 03 does not
    checked = runner.check_run(real, ["tiny-random"], {}, tmp_path, force=True)
    assert checked[real[0]] == {"FORCE": True} and checked[real[1]] == {}
    assert runner.check_run(real, ["tiny-random"], {}, tmp_path)[real[0]] == {}
    from lib.core.params import ParameterError
    with pytest.raises(ParameterError, match="--force"):
        runner.check_run(real, ["tiny-random"], {"FORCE": "true"}, tmp_path, force=True)


def test_consecutive_stream_outputs_are_merged():
    outs = [{"output_type": "stream", "name": "stdout", "text": "a\n"},
            {"output_type": "stream", "name": "stdout", "text": "b\n"},
            {"output_type": "stream", "name": "stderr", "text": "w\n"},
            {"output_type": "display_data", "data": {}},
            {"output_type": "stream", "name": "stdout", "text": "c\n"}]
    got = runner._merged_streams(outs)
    assert [o.get("text") for o in got] == ["a\nb\n", "w\n", None, "c\n"]


def test_cli_says_which_executed_copies_changed(tmp_path, capsys):
    argv = ["--notebook-dir", str(NB_DIR), "--notebooks", "00", "--models", "tiny-random",
            "--runs-dir", str(tmp_path), "-p", "REPEAT=3"]
    assert runner.main(argv) == 0
    copy = tmp_path / "tiny-random" / "00_ok.ipynb"
    assert f"wrote {copy}" in capsys.readouterr().out
    before = copy.read_bytes()
    assert runner.main(argv) == 0
    out = capsys.readouterr().out
    assert f"unchanged {copy}" in out and "wrote" not in out
    assert copy.read_bytes() == before
    assert runner.main(argv[:-1] + ["REPEAT=4"]) == 0
    assert f"wrote {copy}" in capsys.readouterr().out
