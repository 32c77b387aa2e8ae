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
    rc = runner.main(["--notebook-dir", str(NB_DIR), "--notebooks", "01", "--models", "x",
                      "--runs-dir", str(tmp_path)])
    assert rc == 1
    assert "deliberate failure" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--notebook-dir", str(NB_DIR), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "00_ok" in out and "REPEAT: int = 2" in out and "01_fail" in out
    with pytest.raises(SystemExit, match="no notebook matches '07'"):
        runner.select_notebooks(["07"], NB_DIR)


def test_parse_params():
    assert runner.parse_params(["A=3", "B=true", 'C="x"', "D=hello", "E=[1, 2]"]) == \
        {"A": 3, "B": True, "C": "x", "D": "hello", "E": [1, 2]}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
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
