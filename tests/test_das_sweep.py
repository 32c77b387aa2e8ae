"""scripts/das_sweep.py: 09's DAS grid split by causal model over runner processes, then
assembled in the target folder by one run that trains nothing; bad input refused before any
process starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import das_sweep as sweep  # noqa: E402
import workers  # noqa: E402

MODEL = "tiny-random"
# 09 on the tiny model at the fast tier's sizes, one seed, no graphs
TINY = {"N_SHIPPED": "2", "SHOTS": "1", "FT_EPOCHS": "1", "FT_BATCH": "256", "RANKS": "[4]",
        "SITES": "all", "DAS_N_TRAIN": "128", "DAS_N_TEST": "64", "DAS_BATCH": "64",
        "GRAPH_ARRANGEMENTS": "0", "DAS_SEEDS": "1"}


def test_groups_are_contiguous_and_balanced():
    assert workers.groups([1, 2, 3, 4, 5, 6, 7], 2) == [[1, 2, 3, 4], [5, 6, 7]]
    assert workers.groups([1, 2, 3, 4, 5, 6, 7], 3) == [[1, 2, 3], [4, 5], [6, 7]]
    assert workers.groups([1, 7], 4) == [[1], [7]]   # never an empty worker
    assert workers.groups([3], 1) == [[3]]


@pytest.mark.parametrize("argv, match", [
    (["-p", "LAYERS=0"], "FULL_COMPUTE_DIR"),
    (["-p", "FULL_COMPUTE_DIR=x", "-p", "GRAPHS_DIR=y", "-p", "CAUSAL_MODELS=1,8"],
     "CAUSAL_MODELS"),
    (["-p", "FULL_COMPUTE_DIR=x", "-p", "GRAPHS_DIR=y", "-p", "NO_SUCH=1"], "NO_SUCH"),
    (["--workers", "0", "-p", "FULL_COMPUTE_DIR=x", "-p", "GRAPHS_DIR=y"], "--workers"),
])
def test_bad_input_is_refused_before_any_process(argv, match, capsys, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a process started")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "call", no_process)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--models", MODEL, *argv])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_train_their_share_and_the_assembly_trains_nothing(tmp_path):
    """M7 at layer 0 is stored first; the sweep of M1 and M7 at layers 0 and 1 on two workers
    trains M1 (worker 0) and M7 at layer 1 only (worker 1), copies their runs into the target,
    and 09 with both causal models there reads all four cells without training."""
    from lib.core import io
    from lib.runner import parse_params, run_notebooks, select_notebooks

    fc, graphs = tmp_path / "fc", tmp_path / "graphs"
    params = {**TINY, "FULL_COMPUTE_DIR": str(fc), "GRAPHS_DIR": str(graphs),
              "CACHE_DIR": str(tmp_path / "cache")}
    [nb] = select_notebooks(["09"])
    first = {**params, "CAUSAL_MODELS": "7", "LAYERS": "0"}
    run_notebooks([nb], [MODEL], parse_params([f"{k}={v}" for k, v in first.items()]),
                  runs_dir=tmp_path / "first", threads=1, progress=False)
    target = fc / io.slug(MODEL)
    before = {p.relative_to(target): p.read_bytes()
              for p in (target / "das_rotations").rglob("*.safetensors")}
    assert [p.name for p in before] == ["M7_L0_k4_all.safetensors"]

    argv = ["--workers", "2", "--models", MODEL, "--work-dir", str(tmp_path / "work"),
            "--runs-dir", str(tmp_path / "runs")]
    for name, value in {**params, "CAUSAL_MODELS": "1,7", "LAYERS": "0,1"}.items():
        argv += ["-p", f"{name}={value}"]
    assert sweep.main(argv) == 0

    [w0, w1] = sorted((tmp_path / "work").glob(f"{io.slug(MODEL)}/*/w*"))
    log_of = {w.name: (w / "runs" / io.slug(MODEL) / "09_das_arithmetic.ipynb").read_text()
              for w in (w0, w1)}
    assert "M1_L0_k4_all: IIA" in log_of["w0"] and "M1_L1_k4_all: IIA" in log_of["w0"]
    assert "M7_L1_k4_all: IIA" in log_of["w1"] and "M7_L0_k4_all: IIA" not in log_of["w1"]
    # the stored run was read, not trained again: its rotation is the same file
    for rel, data in before.items():
        assert (target / rel).read_bytes() == data
    result = json.loads((target / "das_iia.json").read_text())
    assert sorted((c["model"], c["layer"]) for c in result["cells"]) == \
        [(1, 0), (1, 1), (7, 0), (7, 1)]
    final = (tmp_path / "runs" / io.slug(MODEL) / "09_das_arithmetic.ipynb").read_text()
    assert "rotation(s) stacked" not in final and ": IIA " not in final


def test_a_failed_worker_leaves_the_target_folder_as_it_was(tmp_path, monkeypatch, capsys):
    """A worker that fails: its log is printed, exit code 1, nothing copied into the target
    folder and no assembly run."""
    from lib.core import io

    target = tmp_path / "fc" / io.slug(MODEL)
    target.mkdir(parents=True)
    (target / sweep.FINETUNE).write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def failing(args, params, runs_dir):
        return [sys.executable, "-c", f"print('worker of {params['CAUSAL_MODELS']}'); "
                "raise SystemExit(3)"]
    monkeypatch.setattr(sweep, "runner_command", failing)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("assembled"))
    argv = ["--models", MODEL, "--work-dir", str(tmp_path / "work"), "-p",
            f"FULL_COMPUTE_DIR={tmp_path / 'fc'}", "-p", f"GRAPHS_DIR={tmp_path / 'g'}",
            "-p", "CAUSAL_MODELS=1,2,7"]
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert "worker 0 failed" in out and "worker of 1,2" in out and "worker of 7" in out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                  if not p.is_relative_to(tmp_path / "work")) == before


def test_copy_back_takes_new_and_retrained_runs_and_keeps_the_damaged_copy(tmp_path):
    """What a worker hands back: a run the target lacks, and a run it trained again in place
    of a linked copy it could not read (the target's copy set aside, not lost); a run still
    linked to the target's copy, a temporary file and a set-aside file are not copied."""
    from lib.core import io

    target, worker = tmp_path / "target" / "das_units", tmp_path / "w0" / "das_units"
    target.mkdir(parents=True)
    (target / "kept.json").write_text('{"iia": 0.5}')
    (target / "damaged.json").write_text('{"iia": 0.')
    assert sweep._link_tree(target, worker) == 2
    assert (worker / "kept.json").samefile(target / "kept.json")
    # the worker's 09 sets its link to the damaged copy aside and writes the run again
    (worker / "damaged.json").rename(worker / "damaged.json.set-aside")
    (worker / "damaged.json").write_text('{"iia": 0.7}')
    (worker / "new.json").write_text('{"iia": 0.9}')
    (worker / "half.json.tmp").write_text("{")
    with pytest.warns(io.ResultFileWarning, match="damaged.json"):
        assert sweep._copy_back(worker, target) == 2
    assert sorted(p.name for p in target.iterdir()) == [
        "damaged.json", "damaged.json.set-aside", "kept.json", "new.json"]
    assert (target / "damaged.json").read_text() == '{"iia": 0.7}'
    assert (target / "damaged.json.set-aside").read_text() == '{"iia": 0.'
    assert (target / "new.json").read_text() == '{"iia": 0.9}'
    assert sweep._copy_back(worker, target) == 0   # a second hand-back copies nothing


def test_wait_all_reports_progress_while_workers_run(tmp_path, capsys):
    """With a report, the running workers' progress is printed as it changes; each exit code
    is printed as its worker ends, the failed one's log after."""
    import time

    script = ("import sys, time, pathlib\n"
              "for i in range(3):\n"
              "    time.sleep(0.3); (pathlib.Path(sys.argv[1]) / f'u{i}').write_text('x')\n"
              "sys.exit(int(sys.argv[2]))")
    ws = [workers.start(i, [i], tmp_path / f"w{i}",
                        [sys.executable, "-c", script, str(tmp_path / f"w{i}"), str(i)], tmp_path)
          for i in (0, 1)]

    def report(w):
        return f"{len(list(w.folder.glob('u*')))} unit(s)"

    failed = workers.wait_all(ws, "items", time.perf_counter(), report, every_s=0.1)
    out = capsys.readouterr().out
    assert [w.index for w in failed] == [1]
    assert "worker 0 (items [0]) finished with exit code 0" in out
    assert "worker 1 (items [1]) finished with exit code 1" in out
    assert "--- worker 1 failed" in out
    progress = [line for line in out.splitlines() if " min: worker" in line]
    assert progress and any("unit(s)" in line and "0 unit(s)" not in line for line in progress)
    assert len(progress) == len(set(progress))   # a line is printed only when it changed
