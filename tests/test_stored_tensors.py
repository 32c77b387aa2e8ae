"""What is read back must be what was written: every stored tensor kind, damaged four ways.

For each kind of tensor file the code reads back (09's DAS rotations, 08's cached networks,
09's cached tuned weights, 09's graph predictions) a truncated file, a NaN in a tensor, a tensor
of the wrong shape and a file written with other parameters (another key) each give a clear
error naming the file, or, where the code recomputes a missing file, a warning naming it, the
file set aside and the thing computed again: never a result silently computed from it. A number
a cache stores beside its tensors (a network's or the tuned model's test accuracy) is reported
again only for the tensors it was measured on (their checksum), else measured again.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open

from lib.core import io
from lib.core.tensorfiles import (OtherParametersError, TensorFileError, TensorFileWarning,
                                  read_header, save_tensors, tensors_sha256)
from lib.studies import das
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_graphs as ag
from lib.studies.das import arithmetic_study as study
from lib.studies.das import mlp_das, tuning
from lib.studies.das.causal_model import hierarchical_equality

from conftest import DAMAGE, damage

torch.set_num_threads(1)


# --- 09's rotations, read back by das_runs ------------------------------------------------

@pytest.fixture(scope="module")
def task(arithmetic_task):
    return arithmetic_task


def runs_of(task, folder, stored=None, params=None, units_dir="units"):
    """:func:`das_runs` of M1 and M7 at layer 0, rank 4, rotations in ``folder / "rotations"``
    (each parameter set's in its key's subfolder)."""
    params = params or {"DAS_LR": 0.01}
    units = io.UnitStore(folder / units_dir, params)
    return study.das_runs(task["lm"], [1, 7], [0], [4], {"all": None}, task["states"],
                          task["train_models"], task["test_pairs"], stored, units,
                          folder / "rotations", 64, 1, 32, params["DAS_LR"], "independent", 0)


def rotation(folder, name, params=None):
    """Where :func:`runs_of` keeps run ``name``'s rotation for ``params``."""
    key = io.UnitStore(folder / "units", params or {"DAS_LR": 0.01}).key
    return study.rotation_path(folder / "rotations", key, name)


def test_stored_rotations_are_reused_and_carry_their_units_key(task, tmp_path):
    runs, _, trained = runs_of(task, tmp_path)
    assert trained == {"M1_L0_k4_all", "M7_L0_k4_all"}
    key = io.UnitStore(tmp_path / "units", {"DAS_LR": 0.01}).key
    for name in trained:
        path = rotation(tmp_path, name)
        assert path.parent.name == key and read_header(path)[2] == key
    # a current das_iia.json (here: the runs) and its rotations: nothing trained, in a fresh
    # clone too (no units)
    again, _, trained = runs_of(task, tmp_path, {"runs": runs}, units_dir="fresh")
    assert trained == set() and again == runs


@pytest.mark.parametrize("how", DAMAGE + ("other run",))
def test_a_damaged_rotation_is_set_aside_and_trained_again(task, tmp_path, how):
    runs, _, _ = runs_of(task, tmp_path)
    path = rotation(tmp_path, "M1_L0_k4_all")
    original = path.read_bytes()
    if how == "other run":   # M7's rotation, with the right key, under M1's name
        path.write_bytes(rotation(tmp_path, "M7_L0_k4_all").read_bytes())
    else:
        damage(path, how)
    with pytest.warns(TensorFileWarning, match=r"M1_L0_k4_all.safetensors: .*set it aside as "
                      r"M1_L0_k4_all.safetensors.set-aside and training it again"):
        again, modules, trained = runs_of(task, tmp_path, {"runs": runs})
    assert trained == {"M1_L0_k4_all"}   # only the damaged one, trained to the same result
    assert again == runs and path.read_bytes() == original
    assert path.with_name("M1_L0_k4_all.safetensors.set-aside").exists()


def test_rotations_of_two_parameter_sets_in_one_folder_coexist(task, tmp_path):
    """A run with DAS_LR=0.05 into the default run's folder (interrupted or not) writes its
    rotations beside the defaults', in its own key's subfolder: it overwrites none of them,
    and each parameter set then reuses its own rotations and trains nothing."""
    runs, _, _ = runs_of(task, tmp_path)
    defaults = {p: p.read_bytes() for p in (tmp_path / "rotations").rglob("*.safetensors")}
    assert len(defaults) == 2
    other = {"DAS_LR": 0.05}
    runs_lr, _, trained = runs_of(task, tmp_path, params=other, units_dir="units_lr")
    assert trained == {"M1_L0_k4_all", "M7_L0_k4_all"}
    assert {p: p.read_bytes() for p in defaults} == defaults          # nothing overwritten
    files = sorted((tmp_path / "rotations").rglob("*.safetensors"))
    assert len(files) == 4 and len({p.parent for p in files}) == 2
    assert read_header(rotation(tmp_path, "M1_L0_k4_all", other))[2] != \
        read_header(rotation(tmp_path, "M1_L0_k4_all"))[2]
    for stored, params, units_dir in ((runs, None, "fresh"), (runs_lr, other, "fresh_lr")):
        again, _, trained = runs_of(task, tmp_path, {"runs": stored}, params, units_dir)
        assert trained == set() and again == stored
    assert not list((tmp_path / "rotations").rglob("*.set-aside"))


@pytest.mark.parametrize("iia", ["NaN", "null", "1.5"])
def test_a_das_unit_with_an_iia_that_is_no_accuracy_is_set_aside_and_trained_again(task,
                                                                                   tmp_path, iia):
    runs, _, _ = runs_of(task, tmp_path)
    unit = tmp_path / "units" / "M1_L0_k4_all.json"
    stored = json.loads(unit.read_text())
    stored["value"]["iia"] = "IIA"
    unit.write_text(json.dumps(stored).replace('"IIA"', iia))
    with pytest.warns(io.ResultFileWarning, match="M1_L0_k4_all.json could not be read"):
        again, _, trained = runs_of(task, tmp_path)
    assert trained == {"M1_L0_k4_all"} and again == runs


@pytest.mark.parametrize("how", DAMAGE + ("not orthonormal",))
def test_load_intervention_refuses_a_damaged_file_naming_it(tmp_path, how):
    module = das.LowRankRotatedSpaceIntervention(16, 4, seed=0)
    path = das.save_intervention(module, tmp_path / "rot.safetensors", {"unit": "u"},
                                 key="a" * 16)
    if how == "not orthonormal":
        config, meta, key = read_header(path)
        save_tensors(path, {"rotation": 2 * module.R.detach()}, config, meta, key=key)
    else:
        damage(path, how)
    error = OtherParametersError if how == "key" else TensorFileError
    with pytest.raises(error, match=r"rot.safetensors: .*(delete it|FORCE=True)"):
        das.load_intervention(path, key="a" * 16)


def test_load_intervention_refuses_another_configuration(tmp_path):
    module = das.LowRankRotatedSpaceIntervention(16, 4, seed=0)
    path = das.save_intervention(module, tmp_path / "r.safetensors")
    assert das.load_intervention(path, expect={"d": 16, "rank": 4})[0].rank == 4
    with pytest.raises(TensorFileError, match="r.safetensors: .*rank 4, expected 8"):
        das.load_intervention(path, expect={"d": 16, "rank": 8})


# --- 08's cached networks -----------------------------------------------------------------

NET_ARGS = dict(n_train=1024, n_test=128, epochs=1, batch_size=128, lr=0.01)


def test_a_damaged_network_cache_is_set_aside_and_trained_again(tmp_path):
    model = hierarchical_equality(object_dim=4)
    net, info = mlp_das.task_network(model, seed=0, cache_dir=tmp_path, **NET_ARGS)
    [path] = tmp_path.glob("*.safetensors")
    original = path.read_bytes()
    for how in DAMAGE:
        damage(path, how, "blocks.0.weight")
        with pytest.warns(TensorFileWarning, match=rf"{path.name}: .*training it again"):
            again, info2 = mlp_das.task_network(model, seed=0, cache_dir=tmp_path, **NET_ARGS)
        assert not info2["cached"] and info2["test_accuracy"] == info["test_accuracy"], how
        assert path.read_bytes() == original, how
    assert len(list(tmp_path.glob("*.set-aside*"))) == len(DAMAGE)


def test_a_networks_stored_accuracy_is_reported_only_for_its_own_tensors(tmp_path):
    model = hierarchical_equality(object_dim=4)
    net, info = mlp_das.task_network(model, seed=0, cache_dir=tmp_path, **NET_ARGS)
    [path] = tmp_path.glob("*.safetensors")
    config, meta, key = read_header(path)
    state = net.state_dict()
    # the checksum matches: the stored number is the file's (even a made-up one)
    save_tensors(path, state, config, {**meta, "test_accuracy": 0.123}, key=key)
    assert mlp_das.task_network(model, seed=0, cache_dir=tmp_path, **NET_ARGS)[1][
        "test_accuracy"] == 0.123
    # other tensors than the checksum's (a finite change), or no checksum: measured again
    changed = {**state, "blocks.0.bias": state["blocks.0.bias"] + 5.0}
    for tensors, stored in ((changed, {**meta, "test_accuracy": 0.123}),
                            (state, {k: v for k, v in meta.items() if k != "weights_sha256"})):
        save_tensors(path, tensors, config, {**stored, "test_accuracy": 0.123}, key=key)
        again, got = mlp_das.task_network(model, seed=0, cache_dir=tmp_path, **NET_ARGS)
        x, y = mlp_das._test_set(model, 128, 0)
        assert got["cached"] and got["test_accuracy"] == mlp_das.accuracy(again, x, y) != 0.123


# --- 09's cached tuned weights -------------------------------------------------------------

TUNE_ARGS = dict(epochs=1, batch_size=256, lr=3e-3, seed=0)


def test_damaged_tuned_weights_are_set_aside_and_trained_again(tmp_path):
    _, _, _, info = tuning.tuned_model("tiny-random-llama", cache_dir=tmp_path, **TUNE_ARGS)
    [path] = tmp_path.glob("*.safetensors")
    original = path.read_bytes()
    for how in DAMAGE:
        damage(path, how, "lm_head.weight")
        with pytest.warns(TensorFileWarning, match=rf"{path.name}: .*fine-tuning again"):
            _, _, _, again = tuning.tuned_model("tiny-random-llama", cache_dir=tmp_path,
                                                **TUNE_ARGS)
        assert not again["cached"] and again["weights_sha256"] == info["weights_sha256"], how
        assert path.read_bytes() == original, how


def test_tuned_weights_accuracy_is_reported_only_for_their_own_tensors(tmp_path):
    kwargs = dict(cache_dir=tmp_path, **TUNE_ARGS)
    _, _, _, info = tuning.tuned_model("tiny-random-llama", **kwargs)
    [path] = tmp_path.glob("*.safetensors")
    config, meta, key = read_header(path)
    with safe_open(str(path), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["weights_sha256"] == tensors_sha256(state) == info["weights_sha256"]
    save_tensors(path, state, config, {**meta, "test_accuracy": 0.5}, key=key)
    assert tuning.tuned_model("tiny-random-llama", **kwargs)[3]["test_accuracy"] == 0.5
    changed = {**state, "lm_head.weight": state["lm_head.weight"] * 3}
    save_tensors(path, changed, config, {**meta, "test_accuracy": 0.5, "val_accuracy": 0.5},
                 key=key)
    lm, tokens, split, got = tuning.tuned_model("tiny-random-llama", **kwargs)
    assert got["cached"] and got["weights_sha256"] == tensors_sha256(changed)
    assert got["test_accuracy"] == ar.accuracy(lm, tokens, split["test"]) != 0.5
    assert got["val_accuracy"] == ar.accuracy(lm, tokens, split["val"]) != 0.5


# --- 09's graph predictions, and its graph units -------------------------------------------

def graph_files(tmp_path):
    """A das_graph.json-like result of two graphs on 5 arrangements, and its predictions."""
    pool = [3, 8, 40, 41, 900]
    pred = torch.randint(0, ar.N_CLASSES, (5, 5), generator=torch.Generator().manual_seed(0))
    pred.fill_diagonal_(-1)
    graphs = [{"model": m, "layer": 1, "rank": 4, "site": "all"} for m in (1, 7)]
    result = {"arrangements": pool, "graphs": graphs, "params_key": "b" * 16,
              "predictions_file": "das_graph_predictions.safetensors"}
    save_tensors(tmp_path / result["predictions_file"],
                 {"M1_L1_k4_all": pred.to(torch.int8), "M7_L1_k4_all": pred.to(torch.int8).clone()},
                 {"params_key": "b" * 16, "arrangements": pool}, key="b" * 16)
    return result, tmp_path / result["predictions_file"]


@pytest.mark.parametrize("how", DAMAGE + ("class", "arrangements", "legacy"))
def test_graph_predictions_are_read_back_checked(tmp_path, how):
    result, path = graph_files(tmp_path)
    assert set(ag.graph_predictions(tmp_path, result)) == {"M1_L1_k4_all", "M7_L1_k4_all"}
    if how == "class":
        config, meta, key = read_header(path)
        bad = torch.full((5, 5), 28, dtype=torch.int8).fill_diagonal_(-1)
        save_tensors(path, {"M1_L1_k4_all": bad, "M7_L1_k4_all": bad.clone()}, config, meta,
                     key=key)
    elif how == "arrangements":
        result = {**result, "arrangements": [3, 8, 40, 41, 901]}
    elif how == "legacy":   # written before the key: its config's params_key is the key
        config, meta, _ = read_header(path)
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        save_tensors(path, tensors, config, meta)
        assert set(ag.graph_predictions(tmp_path, result)) == set(tensors)
        result = {**result, "params_key": "c" * 16}
    else:
        damage(path, how)
    with pytest.raises(TensorFileError, match=r"das_graph_predictions.safetensors: .*FORCE=True"):
        ag.graph_predictions(tmp_path, result)


@pytest.mark.parametrize("value", [[[-1, 2], [3, -1], [0, 0]], [[-1, 2.5], [3, -1]],
                                   [[-1, 28], [3, -1]], [[0, 2], [3, -1]]])
def test_a_graph_unit_of_another_shape_or_range_is_set_aside(tmp_path, value):
    store = io.UnitStore(tmp_path, {"k": 1})
    store.put("M1_L1_k4_all", value)
    with pytest.warns(io.ResultFileWarning, match="M1_L1_k4_all.json could not be read"):
        assert io.UnitStore(tmp_path, {"k": 1}).get("M1_L1_k4_all", ag.graph_check(2)) is None
    store.put("M1_L1_k4_all", [[-1, 2], [3, -1]])
    assert store.get("M1_L1_k4_all", ag.graph_check(2)) == [[-1, 2], [3, -1]]


def test_a_das_run_has_one_shape_for_its_unit_and_for_das_iia():
    """The unit check of a DAS run and das_iia.json's kind are one definition (RUN_SHAPE plus
    the IIA range): a run refused as a unit is refused inside das_iia.json too, and a valid
    one passes both."""
    import copy

    from lib.core.schema import SchemaError

    path = next(p for p in sorted(io.paths.FULL_COMPUTE.rglob("das_iia.json")))
    result = json.loads(path.read_text())
    run = result["runs"][0]
    study.check_run(run)
    study.DAS_SCHEMA(result)
    assert study.DAS_SCHEMA.shape["runs"].shape is study.RUN_SHAPE
    for change, fragment in ((lambda r: r.pop("n_test"), "missing keys ['n_test']"),
                             (lambda r: r.update(curve=[{"epoch": 0}]), "missing keys ['loss']"),
                             (lambda r: r.update(iia=1.5), "iia: an accuracy in [0, 1]"),
                             (lambda r: r.update(control_iia=-0.1), "control_iia: an accuracy"),
                             (lambda r: r.update(rank="64"), "expected int")):
        bad = copy.deepcopy(run)
        change(bad)
        with pytest.raises(SchemaError, match=re.escape(fragment)):
            study.check_run(bad)
        whole = copy.deepcopy(result)
        whole["runs"][0] = bad
        with pytest.raises(SchemaError, match=re.escape(fragment)):
            study.DAS_SCHEMA(whole)
