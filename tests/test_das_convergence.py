"""DAS convergence grid (lib.studies.das.convergence) on tiny random Llama: training continued
across checkpoints ends where training straight to the budget ends, and so does a grid resumed
or extended from its stored training state; the first budget is 09's
das_run on 09's training pairs; the plateau decision on hand-made curves; the result's schema;
bad grids refused before any training (in the library and in scripts/das_convergence.py)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_f32_close
from lib.core.stats import t_interval
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_das as da
from lib.studies.das import convergence as cv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
torch.set_num_threads(1)
LAYER, BATCH = 0, 16


@pytest.fixture(scope="module")
def tuned(llama):
    ar.attach_classifier(llama, seed=0)
    tokens = ar.task_tokens(llama.tokenizer, "padded")
    states = da.residual_states(llama, tokens, [LAYER])[LAYER]
    split = ar.split_arrangements(0)
    train = ar.causal_models(split["train"])
    test_models = ar.causal_models(split["test"])
    test = {m: ar.counterfactual_pairs(test_models[m], 64, 20 + m) for m in (1, 7)}
    return llama, states, train, test


def _grid(tuned, budgets, seeds=(0, 1), models=(1, 7), block_steps=2, **state):
    lm, states, train, test = tuned
    return cv.convergence_grid(lm, LAYER, states, train, test, list(seeds), budgets,
                               list(models), rank=4, batch_size=BATCH, lr=0.01,
                               block_steps=block_steps, **state)


def test_a_grid_resumes_and_goes_on_from_its_stored_training_state(tuned, tmp_path):
    """Interrupted after budget 2, a rerun starts at step 2; a grid extended from [2, 4] to
    [2, 4, 8] trains only steps 5-8; both end where training straight through ends (the same
    computation, so the same rotations, IIAs and losses to the bit). A state beyond the grid
    is left alone; a damaged one is set aside."""
    from lib.core import tensorfiles as tf

    straight_runs, straight = _grid(tuned, [2, 4, 8])
    path = tmp_path / "state.safetensors"

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _grid(tuned, [2, 4], progress=stop_at_3, state_file=path, state_key="k")
    assert tf.read_header(path)[0]["step"] == 2
    calls = []
    _grid(tuned, [2, 4], progress=calls.append, state_file=path, state_key="k")
    assert calls[0] == 2 and calls[-1] == 4 and len(calls) == 3   # 2 (resumed), 3, 4
    calls.clear()
    runs, modules = _grid(tuned, [2, 4, 8], progress=calls.append, state_file=path,
                          state_key="k")
    assert calls == [4, 5, 6, 7, 8] and runs == straight_runs
    for a, b in zip(modules, straight):
        assert torch.equal(a.inner.R.detach(), b.inner.R.detach())
    # a shorter grid trains from step 0 and leaves the state at step 8
    short, _ = _grid(tuned, [2], state_file=path, state_key="k")
    assert [r["points"] for r in short] == [r["points"][:1] for r in straight_runs]
    assert tf.read_header(path)[0]["step"] == 8
    # another key or other members: refused before anything is copied
    lm, states, *_ = tuned
    from lib.studies.das import stacked as st
    from lib.studies.das import train_state as ts
    stack = st.Stack(lm, LAYER, states, [4], [0])
    opt = torch.optim.Adam([{"params": g} for g in stack.parameters()], lr=0.01)
    with pytest.raises(tf.OtherParametersError):
        ts.load_state(path, stack, opt, [(1, 0)], "other")
    with pytest.raises(tf.TensorFileError, match="tensors|members"):
        ts.load_state(path, stack, opt, [(1, 0)], "k")
    assert not opt.state
    # a damaged state is set aside, with a warning, and the grid trains from step 0
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(tf.TensorFileWarning, match="set it aside"):
        again, _ = _grid(tuned, [2, 4], state_file=path, state_key="k")
    assert again == [{**r, "points": r["points"][:2]} for r in straight_runs]
    assert (tmp_path / "state.safetensors.set-aside").exists()
    assert tf.read_header(path)[0]["step"] == 4


def test_checkpointed_training_equals_training_straight_to_the_budget(tuned):
    runs, modules = _grid(tuned, [2, 4, 8])
    straight_runs, straight = _grid(tuned, [8])
    assert [[p["steps"] for p in r["points"]] for r in runs] == [[2, 4, 8]] * 4
    for j, (a, b) in enumerate(zip(modules, straight)):
        assert_f32_close(a.inner.R.detach(), b.inner.R.detach(), msg=f"member {j}")
        assert runs[j]["points"][-1]["iia"] == straight_runs[j]["points"][-1]["iia"]
        assert runs[j]["points"][-1]["control_iia"] == straight_runs[j]["points"][-1]["control_iia"]
    # the straight run's one segment is the mean of the checkpointed run's three (2, 2, 4 steps)
    for r, s in zip(runs, straight_runs):
        losses = [p["loss"] for p in r["points"]]
        assert_f32_close(s["points"][0]["loss"], (2 * losses[0] + 2 * losses[1] + 4 * losses[2]) / 8)
    # the rotations moved between checkpoints
    assert runs[0]["points"][0]["iia"] != runs[0]["points"][-1]["iia"] or \
        runs[0]["points"][0]["loss"] != runs[0]["points"][-1]["loss"]


def test_first_budget_is_todays_das_run_on_09s_training_pairs(tuned):
    """Block 0 of seed s is 09's training set for SEED = s (seed * 1000 + 10 + m), in
    train_stacked's (das_run's) order: each stacked member ends where das_run alone ends."""
    lm, states, train, test = tuned
    runs, modules = _grid(tuned, [3], block_steps=3)
    for run, module in zip(runs, modules):
        m, s = run["model"], run["seed"]
        pairs = ar.counterfactual_pairs(train[m], 3 * BATCH, s * 1000 + 10 + m)
        alone, res = da.das_run(lm, LAYER, 4, states, pairs, test[m], None, epochs=1,
                                batch_size=BATCH, lr=0.01, seed=s)
        assert_f32_close(module.inner.R.detach(), alone.inner.R.detach(), msg=f"M{m} seed {s}")
        assert run["points"][0]["control_iia"] == res["control_iia"]
        assert_f32_close(run["points"][0]["loss"], res["curve"][0]["loss"])
        assert run["points"][0]["iia"] == res["iia"]


def test_plateau_decision_on_hand_made_curves():
    got = cv.plateau([20, 40, 80, 160], [0.10, 0.30, 0.305, 0.309])
    assert got["reached"] and got["steps"] == 40 and "40 steps" in got["decision"]
    assert [d["to"] for d in got["deltas"]] == [40, 80, 160]
    assert_f32_close([d["delta"] for d in got["deltas"]], [0.20, 0.005, 0.004])
    # a first small doubling followed by a large one is no plateau (M1 at layer 22)
    got = cv.plateau([20, 40, 80, 160], [0.10, 0.105, 0.20, 0.30])
    assert not got["reached"] and got["steps"] is None
    assert got["decision"] == "not reached by 160 steps"
    assert cv.plateau([20, 40, 80, 160], [0.10, 0.105, 0.20, 0.205])["steps"] == 80
    assert cv.plateau([20, 40], [0.50, 0.495])["steps"] == 20     # a fall counts by size
    # small doublings that add up to more than the tolerance: the plateau starts where they
    # no longer do (M5 at layer 22)
    drift = cv.plateau([20, 40, 80, 160, 320], [0.122, 0.132, 0.140, 0.143, 0.147])
    assert drift["steps"] == 80 and "within 0.01 of it (at most 0.0070)" in drift["decision"]
    assert cv.plateau([20, 40, 80, 160], [0.10, 0.109, 0.118, 0.127])["steps"] == 80
    assert cv.plateau([20, 40], [0.50, 0.48])["steps"] is None
    assert not cv.plateau([20], [0.5])["reached"]                  # no doubling yet
    with pytest.raises(ValueError, match="one mean each"):
        cv.plateau([20, 40], [0.5])


def test_t_interval_over_three_seeds():
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)   # t(0.975, 2) * s / sqrt(3), s = 1
    assert_f32_close([low, high], [2 - half, 2 + half])
    assert t_interval([0.4]) == (0.4, 0.4)


def test_schema_accepts_the_payload_and_refuses_broken_ones(tuned):
    runs, _ = _grid(tuned, [1, 2], seeds=(0, 1, 2), models=(1,), block_steps=1)
    key = {"X": 1}
    payload = cv.payload(runs, LAYER, 4, BATCH, 0.01, "independent", [0, 1, 2], [1, 2], 64,
                         200, key, block_steps=1)
    cv.CONVERGENCE_SCHEMA(payload)
    assert payload["plateau"][0]["model"] == 1 and len(payload["summary"]) == 2
    row = payload["summary"][0]
    assert row["iia"]["n"] == 3 and row["iia"]["ci_low"] <= row["iia"]["mean"] <= row["iia"]["ci_high"]
    for broken in ({**payload, "runs": payload["runs"][:2]},
                   {**payload, "budgets": [1, 3]},
                   {**payload, "runs": [{**payload["runs"][0], "points": [
                       {**p, "iia": 1.5} for p in payload["runs"][0]["points"]]},
                       *payload["runs"][1:]]}):
        with pytest.raises(ValueError):
            cv.CONVERGENCE_SCHEMA(broken)


@pytest.mark.parametrize("change, match", [
    (dict(layer=5), "layer"), (dict(models=[1, 9]), "unknown causal models"),
    (dict(budgets=[20, 30]), "doubling grid"), (dict(seeds=[0, 0]), "seeds"),
    (dict(rank=0), "rank"), (dict(budgets=[0]), "first budget"),
    (dict(budgets=[3, 6]), "multiples of the block")])
def test_bad_grids_are_refused_before_any_training(tuned, monkeypatch, change, match):
    lm, states, train, test = tuned
    monkeypatch.setattr(cv.st, "Stack", lambda *a, **k: pytest.fail("training started"))
    args = dict(layer=LAYER, seeds=[0], budgets=[2, 4], models=[1], rank=4) | change
    with pytest.raises(ValueError, match=match):   # DASError is one
        cv.convergence_grid(lm, args["layer"], states, train, test, args["seeds"],
                            args["budgets"], args["models"], rank=args["rank"], batch_size=BATCH,
                            block_steps=2)


@pytest.mark.parametrize("argv, match", [
    (["--max-steps", "10"], "max-steps 10"), (["--max-steps", "40", "--start", "10"], "start"),
    (["--max-steps", "60", "--start", "30"], "start 30"),
    (["--max-steps", "40", "--models", "1,9"], "causal models"),
    (["--max-steps", "40", "--models", "1,x"], "comma-separated"),
    (["--max-steps", "40", "--workers", "0"], "--workers 0")])
def test_script_refuses_bad_arguments_before_any_model(argv, match, capsys, monkeypatch):
    import das_convergence as script

    monkeypatch.setattr("lib.core.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert match in capsys.readouterr().err + str(exit_.value.code)


def test_script_refuses_a_layer_outside_the_model_before_training(monkeypatch):
    import das_convergence as script

    monkeypatch.setattr(cv, "compute", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(SystemExit, match="blocks 0 to 1"):
        script.main(["--model", "tiny-random-llama", "--layer", "5", "--max-steps", "40"])


def test_script_writes_the_result_and_reuses_it(tmp_path, capsys):
    """The runner target end to end on tiny Llama (09's fine-tune of it included): the JSON of
    its kind, keyed by the tuned weights, the figure, and a second run that reads it."""
    import das_convergence as script

    from lib.core import io

    dirs = ["--full-compute-dir", str(tmp_path / "fc"), "--graphs-dir", str(tmp_path / "g"),
            "--cache-dir", str(tmp_path / "cache")]
    argv = ["--model", "tiny-random-llama", "--layer", "0", "--models", "1", "--seeds", "0,1",
            "--max-steps", "40", *dirs]
    assert script.main(argv) == 0
    path = tmp_path / "fc" / "tiny-random-llama" / "das_convergence.json"
    result = io.read_result(path, cv.CONVERGENCE_SCHEMA)
    assert result["budgets"] == [20, 40] and result["block_steps"] == 20
    assert result["tuned_weights_sha256"] == \
        result["provenance"]["parameters"]["TUNED_WEIGHTS_SHA256"]
    assert (tmp_path / "g" / "tiny-random-llama" / "das_convergence.png").exists()
    capsys.readouterr()
    assert script.main(argv) == 0
    assert "is current" in capsys.readouterr().out
    # adding a causal model trains only it: M1's runs are read from the stored result (of
    # another key), M7's are trained
    other = tmp_path / "other.json"
    other.write_bytes(path.read_bytes())
    wider = [*argv[:argv.index("--models") + 1], "1,7", *argv[argv.index("--models") + 2:]]
    assert script.main([*wider, "--reuse", str(other)]) == 0
    out = capsys.readouterr().out
    assert "reused from earlier results: ['M1']" in out and "2 rotations stacked" in out
    both = io.read_result(path, cv.CONVERGENCE_SCHEMA)
    assert both["causal_models"] == [1, 7] and both["reused"] == [1]
    assert [r for r in both["runs"] if r["model"] == 1] == result["runs"]
    assert [p["model"] for p in both["plateau"]] == [1, 7]
    # a larger grid goes on from the stored training state of the smaller one
    assert len(list((path.parent / cv.STATE_DIR).glob("*.safetensors"))) == 2   # M1; M7
    longer = [*argv[:argv.index("--max-steps") + 1], "80", *argv[argv.index("--max-steps") + 2:]]
    assert script.main(longer) == 0
    assert "resumed from the training state at step 40" in capsys.readouterr().out
    extended = io.read_result(path, cv.CONVERGENCE_SCHEMA)
    assert extended["budgets"] == [20, 40, 80]
    assert [{**r, "points": r["points"][:2]} for r in extended["runs"]] == result["runs"]


def test_reused_runs_must_be_of_the_same_grid_and_weights():
    base = {"layer": 0, "rank": 4, "site": "all", "batch_size": 16, "lr": 0.01,
            "semantics": "independent", "seeds": [0], "budgets": [20], "block_steps": 20,
            "n_test": 64, "test_arrangements": 200, "pair_seeds": cv.pair_seeds_rule(20),
            "tuned_weights_sha256": "a" * 64}
    runs = [{"model": 1, "seed": 0, "points": [{"steps": 20, "iia": 0.5, "control_iia": 0.1,
                                                "loss": 2.0}]}]
    stored = cv.payload(runs, 0, 4, 16, 0.01, "independent", [0], [20], 64, 200, {"K": 1})
    stored["tuned_weights_sha256"] = "a" * 64
    assert cv.reusable_runs([stored], base, [1, 7]) == {1: runs}
    for field, value in (("tuned_weights_sha256", "b" * 64), ("budgets", [20, 40]),
                         ("layer", 1), ("seeds", [0, 1])):
        assert cv.reusable_runs([stored], {**base, field: value}, [1, 7]) == {}, field


def test_script_refuses_an_unreadable_reuse_file(tmp_path, monkeypatch):
    import das_convergence as script

    monkeypatch.setattr("lib.core.models.load_model", lambda *a, **k: pytest.fail("loaded"))

    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": []}')
    with pytest.raises(SystemExit, match="--reuse .*bad.json: not a readable"):
        script.main(["--model", "tiny-random-llama", "--layer", "0", "--max-steps", "20",
                     "--full-compute-dir", str(tmp_path / "fc"), "--cache-dir",
                     str(tmp_path / "cache"), "--reuse", str(bad)])


@pytest.mark.slow
def test_two_workers_train_their_share_and_the_assembly_trains_nothing(tmp_path, capsys):
    """--workers 2 on tiny Llama: M1 and M7 each trained by its own process (09's fine-tune
    made once, before them), the grid assembled from their results without training, and a
    larger --max-steps going on from each worker's stored training state."""
    import das_convergence as script

    from lib.core import io

    dirs = ["--full-compute-dir", str(tmp_path / "fc"), "--graphs-dir", str(tmp_path / "g"),
            "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work")]
    argv = ["--model", "tiny-random-llama", "--layer", "0", "--models", "1,7", "--seeds", "0",
            "--max-steps", "20", "--workers", "2", *dirs]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "worker 0: causal models [1]" in out and "worker 1: causal models [7]" in out
    assert "rotations stacked" not in out   # this process trained nothing
    path = tmp_path / "fc" / "tiny-random-llama" / "das_convergence.json"
    result = io.read_result(path, cv.CONVERGENCE_SCHEMA)
    assert result["causal_models"] == [1, 7] and result["reused"] == [1, 7]
    folders = sorted((tmp_path / "work" / "tiny-random-llama").glob("*/w*"))
    assert [f.name for f in folders] == ["w0", "w1"]
    parts = [io.read_result(f / "tiny-random-llama" / "das_convergence.json",
                            cv.CONVERGENCE_SCHEMA) for f in folders]
    assert [p["causal_models"] for p in parts] == [[1], [7]]
    assert result["runs"] == parts[0]["runs"] + parts[1]["runs"]
    for f in folders:
        assert "1 rotations stacked" in (f / "log.txt").read_text()
    # current: read, no worker started
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "is current" in out and "worker 0" not in out
    # a larger grid: each worker goes on from its own training state
    longer = [*argv[:argv.index("--max-steps") + 1], "40", *argv[argv.index("--max-steps") + 2:]]
    assert script.main(longer) == 0
    for f in folders:
        assert "resumed from the training state at step 20" in (f / "log.txt").read_text()
    extended = io.read_result(path, cv.CONVERGENCE_SCHEMA)
    assert extended["budgets"] == [20, 40]
    assert [{**r, "points": r["points"][:1]} for r in extended["runs"]] == result["runs"]


def test_a_failed_worker_writes_nothing(tmp_path, capsys, monkeypatch):
    """A worker that fails: its log printed, exit code 1, no result and no figure written."""
    import das_convergence as script

    def failing(args, share, folder, reuse):
        return [sys.executable, "-c", f"print('worker of {share}'); raise SystemExit(3)"]
    monkeypatch.setattr(script, "worker_command", failing)
    dirs = ["--full-compute-dir", str(tmp_path / "fc"), "--graphs-dir", str(tmp_path / "g"),
            "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work")]
    assert script.main(["--model", "tiny-random-llama", "--layer", "0", "--models", "1,7",
                        "--max-steps", "20", "--workers", "2", *dirs]) == 1
    out = capsys.readouterr().out
    assert "worker 0 failed" in out and "worker of [1]" in out and "worker of [7]" in out
    assert not (tmp_path / "fc" / "tiny-random-llama" / "das_convergence.json").exists()
    assert not (tmp_path / "g").exists()
