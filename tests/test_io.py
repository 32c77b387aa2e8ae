"""Result files: provenance, atomic writes, byte-stable reruns, resumable units, figures."""

import json
import os

import pytest

from lib.core import io, paths
from lib.core.io import load_tensors
from lib.core.models import load_model


def test_write_json_has_provenance_and_is_byte_stable(tmp_path, monkeypatch):
    lm = load_model("tiny-random")
    target = tmp_path / "out" / "result.json"
    payload = {"scores": [0.1, 0.2, float("nan")], "n": 3}
    io.write_json(target, payload, io.provenance(lm, {"k": 5}, seed=0))
    data = json.loads(target.read_text())
    prov = data["provenance"]
    assert prov["model"]["name"] == "tiny-random" and prov["seed"] == 0
    assert prov["parameters"] == {"k": 5}
    assert {"torch", "transformers", "python"} <= set(prov["versions"])
    assert "git_commit" in prov and prov["created_utc"].endswith("+00:00")
    import torch

    assert prov["torch_threads"] == torch.get_num_threads()
    assert prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert data["scores"][2] is None  # NaN is not valid JSON
    before = target.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # a later run, a different time
    io.write_json(target, payload, io.provenance(lm, {"k": 5}, seed=0))
    assert target.read_bytes() == before
    io.write_json(target, {**payload, "n": 4}, io.provenance(lm, {"k": 5}, seed=0))
    assert json.loads(target.read_text())["n"] == 4
    assert json.loads(target.read_text())["provenance"]["created_utc"] == "1970-01-01T00:00:00+00:00"


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    io.write_json(target, {"a": 1})

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        io.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_unit_store_resumes_and_respects_params_and_force(tmp_path):
    calls = []
    store = io.UnitStore(tmp_path, {"layers": [1, 2]})
    assert store.get_or_compute("pair a", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert io.UnitStore(tmp_path, {"layers": [1, 2]}).get_or_compute(
        "pair a", lambda: calls.append(2) or {"x": 2}) == {"x": 1}
    assert calls == [1]
    assert io.UnitStore(tmp_path, {"layers": [1]}).get("pair a") is None
    assert io.UnitStore(tmp_path, {"layers": [1, 2]}, force=True).get("pair a") is None


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        io.read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        io.read_json(bad)


def test_save_figure_writes_png_and_pdf(tmp_path):
    import pandas as pd
    from plotnine import aes, geom_point, ggplot

    from lib.plots import save_figure

    fig = ggplot(pd.DataFrame({"x": [1, 2], "y": [3, 4]}), aes("x", "y")) + geom_point()
    written = save_figure(fig, "demo", "tiny", graphs_dir=tmp_path)
    assert [p.name for p in written] == ["demo.png", "demo.pdf"]
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[1].read_bytes()[:4] == b"%PDF"
    first_pdf = written[1].read_bytes()
    save_figure(fig, "demo", "tiny", graphs_dir=tmp_path)
    assert written[1].read_bytes() == first_pdf
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["demo.pdf", "demo.png"]


def test_provenance_carries_no_timing(monkeypatch):
    lm = load_model("tiny-random")
    monkeypatch.setattr(lm, "source", {"kind": "gguf", "sha256": "ab", "converted_in_s": 22.6})
    prov = io.provenance(lm, {"k": 1}, seed=0)
    assert prov["model"]["source"] == {"kind": "gguf", "sha256": "ab"}
    assert set(prov) == {"model", "parameters", "seed", "device", "dtype", "torch_threads",
                         "versions", "git_commit", "created_utc"}


def test_read_current_compares_the_given_parameters_with_provenance(tmp_path):
    target = tmp_path / "r.json"
    io.write_json(target, {"x": 1}, io.provenance(None, {"A": 1, "B": [1, 2], "NAME": "n"}))
    assert io.read_current(target, {"A": 1, "B": [1, 2]})["x"] == 1  # a subset is enough
    assert io.read_current(target, {"A": 2}) is None
    assert io.read_current(target, {"C": 1}) is None
    assert io.read_current(target, {"A": 1}, force=True) is None
    assert target.exists()  # a stale result is kept (it is only overwritten on success)


def test_a_result_or_unit_of_another_thread_count_is_not_current(tmp_path):
    import torch

    target = tmp_path / "r.json"
    prov = io.provenance(None, {"A": 1})
    io.write_json(target, {"x": 1}, {**prov, "torch_threads": torch.get_num_threads() + 1})
    assert io.read_current(target, {"A": 1}) is None
    old = dict(prov)
    del old["torch_threads"]  # written before the thread count was recorded
    io.write_json(target, {"x": 1}, old)
    assert io.read_current(target, {"A": 1}) is None
    io.write_json(target, {"x": 1}, prov)
    assert io.read_current(target, {"A": 1})["x"] == 1
    store = io.UnitStore(tmp_path / "units", {"A": 1})
    store.put("u", {"v": 1})
    assert io.UnitStore(tmp_path / "units", {"A": 1}).get("u") == {"v": 1}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert io.UnitStore(tmp_path / "units", {"A": 1}).get("u") is None
    finally:
        torch.set_num_threads(threads)


def test_saved_tensors_are_the_same_bytes_in_every_process(tmp_path):
    # safetensors keeps header metadata in a hash map seeded per process: with more than one
    # key their order (and the file's bytes) changed from run to run; timings are left out
    import subprocess
    import sys

    code = ("import sys, torch; from lib.core.io import save_tensors; "
            "save_tensors(sys.argv[1], {'w': torch.arange(6.).reshape(2, 3)}, "
            "{'kind': 'x', 'd': 3}, {'task': 't', 'layer': 0, 'seconds_per_step': float(sys.argv[2])})")
    outs = []
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path), str(i)], check=True,
                       cwd=paths.REPO_ROOT)
        outs.append(path.read_bytes())
    assert all(o == outs[0] for o in outs)
    tensors, config, meta = load_tensors(tmp_path / "0.safetensors")
    assert config == {"kind": "x", "d": 3} and meta == {"task": "t", "layer": 0}
    assert tensors["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_tensors_saved_by_earlier_versions_still_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(2)}, str(path),
              metadata={"config": json.dumps({"kind": "x"}), "metadata": json.dumps({"a": 1})})
    tensors, config, meta = load_tensors(path)
    assert config == {"kind": "x"} and meta == {"a": 1} and tensors["w"].tolist() == [1, 1]


def test_save_figure_leaves_an_unchanged_figure_untouched(tmp_path):
    import pandas as pd
    from plotnine import aes, geom_point, ggplot

    from lib.plots import save_figure

    fig = ggplot(pd.DataFrame({"x": [1, 2], "y": [3, 4]}), aes("x", "y")) + geom_point()
    written = save_figure(fig, "demo", "tiny", graphs_dir=tmp_path)
    stamps = [os.stat(p).st_mtime_ns for p in written]
    os.utime(written[0], ns=(1, 1)), os.utime(written[1], ns=(1, 1))
    save_figure(fig, "demo", "tiny", graphs_dir=tmp_path)
    assert [os.stat(p).st_mtime_ns for p in written] == [1, 1]   # not rewritten
    other = ggplot(pd.DataFrame({"x": [1, 2], "y": [3, 5]}), aes("x", "y")) + geom_point()
    save_figure(other, "demo", "tiny", graphs_dir=tmp_path)
    assert all(os.stat(p).st_mtime_ns > 1 for p in written) and stamps   # new content: rewritten
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["demo.pdf", "demo.png"]


def test_load_or_compute_reuses_a_current_result_and_computes_otherwise(tmp_path, capsys):
    path = tmp_path / "r.json"
    calls = []

    def compute(value=1):
        calls.append(value)
        return {"value": value, "items": [1, 2]}, io.provenance(None, {"P": 1})

    check = io.require_keys("value", lists=("items",))
    first = io.load_or_compute(path, {"P": 1}, compute, check=check, inputs={"data": "d1"})
    assert first["value"] == 1 and first["provenance"]["inputs"] == {"data": "d1"}
    assert "wrote" in capsys.readouterr().out
    again = io.load_or_compute(path, {"P": 1}, compute, check=check, inputs={"data": "d1"})
    assert calls == [1] and again == first and "is current" in capsys.readouterr().out
    # another input file, other parameters, or force: computed again
    io.load_or_compute(path, {"P": 1}, compute, inputs={"data": "d2"})
    io.load_or_compute(path, {"P": 2}, compute, inputs={"data": "d2"})
    io.load_or_compute(path, {"P": 1}, compute, force=True)
    assert calls == [1, 1, 1, 1]
    # a result without inputs is not current where inputs are asked for
    io.load_or_compute(path, {"P": 1}, compute, inputs={"data": "d2"})
    assert len(calls) == 5
    # a computed payload that fails its check is not written: the stored file stays
    before = path.read_bytes()
    with pytest.raises(ValueError, match="schema check"):
        io.load_or_compute(path, {"P": 3}, lambda: ({"items": []}, io.provenance(None)),
                           check=check)
    assert path.read_bytes() == before


def test_digest_is_stable_and_order_free_for_mappings():
    assert io.digest({"a": 1, "b": [1, 2]}) == io.digest({"b": [1, 2], "a": 1})
    assert io.digest({"a": 1}) != io.digest({"a": 2}) and len(io.digest([])) == 64


def test_concurrent_writers_of_one_tensor_file_never_collide(tmp_path):
    """Each writer has its own temporary file (a fixed name made two writers replace or
    remove each other's: 3 of 600 concurrent saves failed); the last rename wins, whole."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from lib.core.io import save_tensors

    target = tmp_path / "t.safetensors"
    tensors = {"w": torch.arange(4096.0)}

    def save(i):
        return save_tensors(target, tensors, {"i": i % 2})

    with ThreadPoolExecutor(8) as pool:
        assert len(list(pool.map(save, range(400)))) == 400
    got, config, _ = load_tensors(target)
    assert torch.equal(got["w"], tensors["w"]) and config["i"] in (0, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]   # no temporaries left


def test_every_result_file_gets_the_same_mode_under_the_umask(tmp_path):
    """JSON, tensors and figures: 0644 less the umask (temporary files are created 0600)."""
    import pandas as pd
    import torch
    from plotnine import aes, geom_point, ggplot

    from lib.plots import save_figure

    old = os.umask(0o027)
    try:
        assert paths.file_mode() == 0o640
        files = [io.write_json(tmp_path / "r.json", {"a": 1}),
                 io.save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)}, {}),
                 *save_figure(ggplot(pd.DataFrame({"x": [1], "y": [2]}), aes("x", "y"))
                              + geom_point(), "f", graphs_dir=tmp_path)]
    finally:
        os.umask(old)
    assert {oct(os.stat(p).st_mode & 0o777) for p in files} == {oct(0o640)}
    assert paths.file_mode() == 0o644 & ~old


def test_tensor_files_carry_their_key_and_refuse_another(tmp_path):
    import torch

    from lib.core.tensorfiles import OtherParametersError, read_header

    path = io.save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(2)}, {"c": 1},
                           {"m": 2}, key="k1")
    assert read_header(path) == ({"c": 1}, {"m": 2}, "k1")
    assert load_tensors(path, key="k1")[1] == {"c": 1}
    with pytest.raises(OtherParametersError, match=r"t.safetensors: .*key k1, this run's k2"):
        load_tensors(path, key="k2")
    io.save_tensors(path, {"w": torch.ones(2)}, {"c": 1})   # no key: an earlier version's file
    with pytest.raises(OtherParametersError, match="names no parameters key"):
        load_tensors(path, key="k1")
    assert load_tensors(path, key="k1", unkeyed_ok=True)[1] == {"c": 1}   # a cache named by it


def test_a_tensor_file_that_is_not_one_is_named(tmp_path):
    path = tmp_path / "x.safetensors"
    for raw in (b"", b"\x00" * 7, b"not a safetensors file at all", b"{" * 64):
        path.write_bytes(raw)
        with pytest.raises(io.TensorFileError, match=r"x.safetensors: cannot be read"):
            load_tensors(path)


def test_a_unit_holding_nan_is_set_aside(tmp_path):
    store = io.UnitStore(tmp_path, {"k": 1})
    store.put("u", {"x": float("nan")})   # written as null
    assert store.get("u") == {"x": None}
    (tmp_path / "u.json").write_text('{"params_key": "%s", "value": {"x": NaN}}' % store.key)
    with pytest.warns(io.ResultFileWarning, match="u.json could not be read.*NaN"):
        assert store.get("u") is None
# --- result kinds: every read checks the kind's shape (lib.core.schema) ----------------------

import re  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402

import lib.studies  # noqa: E402,F401  (declares the modules of every kind)
from lib.core import schema  # noqa: E402

KINDS = {k.name: k for k in schema.all_kinds()}
# results, not the resumable units a local run keeps in ignored *_units/ folders
COMMITTED = sorted(p.relative_to(paths.REPO_ROOT) for folder in
                   (paths.SCORES, paths.TOKEN_SETS, paths.FULL_COMPUTE) for p in folder.rglob("*.json")
                   if not any(part.endswith("_units") for part in p.parts))


def expected_kind(rel) -> str:
    """The kind a committed file must hold, from its place alone (not from its content)."""
    parts, name = rel.parts, rel.stem
    if parts[0] != "full_compute":
        return {"scores": "layer_scores", "token_sets": "token_sets"}[parts[0]]
    if len(parts) == 2:
        return "domain_effects"
    if parts[1] == "das_mlp":
        return f"das_mlp_{name}"
    if name.startswith("interchange_"):
        return "interchange"
    if name.startswith("causal_trace_"):
        return {"severed": "causal_trace_severed", "facts": "causal_trace_facts"}.get(
            name.removeprefix("causal_trace_"), "causal_trace")
    return name   # path_patching_<study>, das_finetune, das_iia, das_graph


EXAMPLES = {}   # one committed file of each kind
for _rel in COMMITTED:
    EXAMPLES.setdefault(expected_kind(_rel), paths.REPO_ROOT / _rel)
# a field of each kind given a value of the wrong type ("*": a mapping's first key)
WRONG_FIELD = {
    "layer_scores": (("comparisons", 0, "scores", "*", "*", 0), "0.5"),
    "token_sets": (("pairs", "*", "*", 0, "id"), 1.5),
    "domain_effects": (("pairs", "*", "swap", "*", "per_layer", 0, "sides", "*", "kl", "mean"),
                       "x"),
    "causal_trace": (("scores", 0, 0), "high"),
    "causal_trace_severed": (("ordinary", 0), None),
    "causal_trace_facts": (("effects", 0, "layer"), "3"),
    "interchange": (("records",), [{"x": 1}]),
    "path_patching_capital": (("records", 0, "prob"), float("nan")),
    "path_patching_ioi": (("to_logits", 0, "head"), "h0"),
    "path_patching_eap": (("records", 0, "exact"), [1.0]),
    "path_patching_roles": (("heads", 0, "role"), 3),
    "circuit_faithfulness": (("curves", 0, "faithfulness", 0), "high"),
    "das_mlp_hand_built": (("iia", "*"), "1.0"),
    "das_mlp_equality": (("per_layer", "*", 0, "iia"), None),
    "das_mlp_abab": (("equal", "per_layer"), {"layer": 0}),
    "das_mlp_wrong_model": (("cells", 0, "train_model"), 1),
    "das_finetune": (("curve",), [{"x": 1}]),
    "das_iia": (("runs", 0, "iia"), "0.9"),
    "das_graph": (("graphs", 0, "cliques"), [[1.5]]),
    "das_convergence": (("runs", 0, "points", 0, "iia"), "0.9"),
}


def _set(data, where, value) -> str:
    """Put ``value`` at ``where`` in ``data``; returns the place as the schema names it."""
    keys = []
    for key in where:
        keys.append(next(iter(data)) if key == "*" else key)
        if len(keys) < len(where):
            data = data[keys[-1]]
    data[keys[-1]] = value
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def _current_copy(kind_name, target):
    """The committed example of a kind, written to ``target`` as current at this process's
    thread count; returns (its data, its parameters)."""
    data = json.loads(EXAMPLES[kind_name].read_text(encoding="utf-8"))
    import torch

    data["provenance"]["torch_threads"] = torch.get_num_threads()
    target.write_text(json.dumps(data), encoding="utf-8")
    return data, data["provenance"]["parameters"]


def test_every_kind_has_a_committed_example_and_a_wrong_field_case():
    assert COMMITTED, "no committed result files found"
    assert set(EXAMPLES) == set(KINDS) == set(WRONG_FIELD), (
        f"kinds {sorted(KINDS)}, committed examples {sorted(EXAMPLES)}, wrong-field cases "
        f"{sorted(WRONG_FIELD)}: every kind needs all three")


@pytest.mark.parametrize("rel", COMMITTED, ids=str)
def test_every_committed_result_passes_its_kind_and_stays_current(rel):
    import torch

    path = paths.REPO_ROOT / rel
    kind = KINDS[expected_kind(rel)]
    before = path.read_bytes()
    data = json.loads(before)
    assert schema.verdict(data, kind) == ("ok", ""), f"{rel}: {schema.verdict(data, kind)[1]}"
    fits = [k.name for k in KINDS.values() if k.fits(data)]
    assert fits == [kind.name], f"{rel} is a valid result of {fits}: it must be of one kind"
    assert schema.identify(data) is kind
    threads = torch.get_num_threads()
    torch.set_num_threads(data["provenance"]["torch_threads"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = io.read_current(path, data["provenance"]["parameters"], check=kind)
    finally:
        torch.set_num_threads(threads)
    assert found == data, f"{rel} is not current for its own parameters"
    assert path.read_bytes() == before and not list(path.parent.glob(f"{path.name}.set-aside*"))


@pytest.mark.parametrize("name", sorted(WRONG_FIELD))
def test_a_truncated_result_is_set_aside_and_recomputed_naming_its_kind(name, tmp_path):
    kind = KINDS[name]
    text = EXAMPLES[name].read_text(encoding="utf-8")
    payload = {k: v for k, v in json.loads(text).items() if k != "provenance"}
    target = tmp_path / EXAMPLES[name].name
    target.write_text(text[: len(text) // 2], encoding="utf-8")
    calls = []

    def compute():
        calls.append(1)
        return payload, io.provenance(None, {"P": 1})

    with pytest.warns(io.ResultFileWarning, match=rf"{target.name} could not be read"):
        got = io.load_or_compute(target, {"P": 1}, compute, check=kind, quiet=True)
    assert calls == [1], "a truncated file was not recomputed"
    assert (tmp_path / f"{target.name}.set-aside").exists(), "the truncated file was not kept aside"
    assert got["provenance"]["kind"] == name, "a new result does not name its kind"
    assert io.load_or_compute(target, {"P": 1}, compute, check=kind, quiet=True) == got
    assert calls == [1], "a result written with its kind is not current when read back"


@pytest.mark.parametrize("name", sorted(WRONG_FIELD))
def test_a_valid_result_of_another_kind_is_refused_and_nothing_moves(name, tmp_path):
    kind = KINDS[name]
    names = sorted(WRONG_FIELD)
    other = names[(names.index(name) + 1) % len(names)]
    target = tmp_path / "result.json"
    shutil.copy(EXAMPLES[other], target)
    before = target.read_bytes()
    for force in (False, True):
        with pytest.raises(io.WrongKindError) as err:
            io.load_or_compute(target, {}, lambda: pytest.fail("computed over another kind"),
                               check=kind, force=force)
        message = str(err.value)
        for part in ("result.json", f"holds a {other} result", f"not a {name} result",
                     "nothing was moved or overwritten", f"{kind.folder}="):
            assert part in message, f"{part!r} missing from the refusal: {message}"
    # a file that names another kind is refused even where it is malformed
    data = json.loads(before)
    data["provenance"]["kind"] = other
    _set(data, *WRONG_FIELD[other])
    (tmp_path / "named.json").write_text(json.dumps(data))
    with pytest.raises(io.WrongKindError, match=f"holds a {other} result"):
        io.read_current(tmp_path / "named.json", {}, check=kind)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.json", "result.json"]


@pytest.mark.parametrize("name", sorted(WRONG_FIELD))
def test_a_result_with_a_field_of_the_wrong_type_is_set_aside_and_recomputed(name, tmp_path):
    kind = KINDS[name]
    target = tmp_path / "result.json"
    data, parameters = _current_copy(name, target)
    payload = {k: v for k, v in json.loads(json.dumps(data)).items() if k != "provenance"}
    calls = []

    def compute():
        calls.append(1)
        return payload, io.provenance(None, parameters)

    # unchanged, the copy is current: reused, not computed
    assert io.load_or_compute(target, parameters, compute, check=kind, quiet=True) == data
    assert calls == [], "the unchanged copy was recomputed"
    where = _set(data, *WRONG_FIELD[name])
    target.write_text(json.dumps(data), encoding="utf-8")
    with pytest.warns(io.ResultFileWarning, match=rf"result.json could not be read \(not a valid "
                                                  rf"{name} result: at {re.escape(where)}"):
        got = io.load_or_compute(target, parameters, compute, check=kind, quiet=True)
    assert calls == [1], f"a {name} result with a wrong {where} was reused"
    assert (tmp_path / "result.json.set-aside").exists() and got["provenance"]["kind"] == name


def test_a_result_read_by_another_notebook_is_checked_and_never_moved(tmp_path):
    from lib.studies import domain_swap as ds

    shutil.copy(EXAMPLES["domain_effects"], tmp_path / "m.json")
    with pytest.raises(io.WrongKindError, match=r"m.json holds a domain_effects result.*not a "
                                                r"layer_scores result"):
        ds.load_scores("m", tmp_path)
    data = json.loads(EXAMPLES["layer_scores"].read_text())
    where = _set(data, *WRONG_FIELD["layer_scores"])
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(schema.SchemaError, match=rf"m.json: not a valid layer_scores result: at "
                                                 rf"{re.escape(where)}.*rerun 00_layer_scores "
                                                 r"with FORCE=True"):
        ds.load_scores("m", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_the_runner_refuses_another_notebooks_result_before_loading_the_model(tmp_path, capsys):
    """00 pointed at a folder that holds 02's result for the model: a clear error, exit 1, and
    the file is neither set aside nor overwritten (it used to be set aside)."""
    from lib import runner

    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    target = scores_dir / "tiny-random.json"
    shutil.copy(EXAMPLES["domain_effects"], target)
    before = target.read_bytes()
    rc = runner.main(["--notebooks", "00", "--models", "tiny-random", "--runs-dir",
                      str(tmp_path / "runs"), "-p", f"SCORES_DIR={scores_dir}", "-p",
                      f"GRAPHS_DIR={tmp_path / 'graphs'}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    for part in ("WrongKindError", "tiny-random.json holds a domain_effects result",
                 "not a layer_scores result", "nothing was moved or overwritten", "SCORES_DIR="):
        assert part in err, f"{part!r} missing from the runner's error: {err}"
    assert target.read_bytes() == before and sorted(os.listdir(scores_dir)) == ["tiny-random.json"]
    [failed] = (tmp_path / "runs").rglob("*.failed.ipynb")
    assert "d_model=" not in failed.read_text(), "the model was loaded before the refusal"


def _first_number(data, where=()):
    """The place of the first float (not an int, not a bool) of ``data``, provenance aside."""
    if isinstance(data, float):
        return where
    items = data.items() if isinstance(data, dict) else \
        enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if key == "provenance":
            continue
        found = _first_number(value, where + (key,))
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("name", sorted(WRONG_FIELD))
def test_a_result_holding_nan_is_set_aside_and_recomputed(name, tmp_path):
    """A valid file of the right kind but for one NaN (written as JSON's NaN, which this
    repository never writes: it stores null) is no current result: set aside, recomputed."""
    kind = KINDS[name]
    target = tmp_path / "result.json"
    data, parameters = _current_copy(name, target)
    payload = {k: v for k, v in json.loads(json.dumps(data)).items() if k != "provenance"}
    where = _first_number(data)
    assert where is not None, f"{name}'s example holds no number"
    _set(data, where, float("nan"))
    target.write_text(json.dumps(data), encoding="utf-8")   # allow_nan: the NaN literal
    calls = []

    def compute():
        calls.append(1)
        return payload, io.provenance(None, parameters)

    with pytest.warns(io.ResultFileWarning, match=r"result.json could not be read \(not a valid "
                                                  rf"{name} result: .*finite number, got nan"):
        got = io.load_or_compute(target, parameters, compute, check=kind, quiet=True)
    assert calls == [1] and (tmp_path / "result.json.set-aside").exists()
    assert got["provenance"]["kind"] == name


@pytest.mark.parametrize("name", sorted(WRONG_FIELD))
def test_a_result_of_other_parameters_is_recomputed_and_only_then_replaced(name, tmp_path):
    """A valid result of the right kind written with other parameters (one value changed) is
    not current: computed again and replaced once the new result is written, never set aside;
    a failing computation leaves it untouched."""
    kind = KINDS[name]
    target = tmp_path / "result.json"
    data, parameters = _current_copy(name, target)
    payload = {k: v for k, v in json.loads(json.dumps(data)).items() if k != "provenance"}
    other = {**parameters, "OTHER_PARAMETER": "changed"}
    before = target.read_bytes()

    def fails():
        raise RuntimeError("the computation failed")

    with pytest.raises(RuntimeError):
        io.load_or_compute(target, other, fails, check=kind, quiet=True)
    assert target.read_bytes() == before
    got = io.load_or_compute(target, other, lambda: (payload, io.provenance(None, other)),
                             check=kind, quiet=True)
    assert got["provenance"]["parameters"]["OTHER_PARAMETER"] == "changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
