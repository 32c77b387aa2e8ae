"""lib.core.params: the parameters-cell reader, the validator and the one parser each for layers,
positions, lists and sites (the same meaning in every notebook)."""

import papermill as pm
import pytest

from lib.core import paths
from lib.core.params import CliText, ParameterError, check_value, notebook_values, read_parameters
from lib.core.parsers import parse_layers, parse_list, parse_positions, parse_sites
from lib.runner import list_notebooks


def test_layers_mean_the_same_everywhere():
    assert parse_layers("all", 4) == [0, 1, 2, 3] == parse_layers("", 4)
    assert parse_layers("3, 0,-1", 5) == [0, 3, 4]
    assert parse_layers("-1", 30) == [29]
    assert parse_layers([1, 1], 3) == [1]
    assert parse_layers(2, 3) == [2]
    assert parse_positions(-1, 6) == [5]
    with pytest.raises(ValueError, match=r"LAYERS \[7\] out of range"):
        parse_layers("7", 4)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("first", 4)


def test_lists_and_sites():
    assert parse_list(["a", "b"]) == ["a", "b"]
    assert parse_list("0, 0.5", float) == [0.0, 0.5]
    assert parse_list((1, 2), float) == [1.0, 2.0]
    assert parse_sites("mlp_out, attn_in") == ["mlp_out", "attn_in"]
    assert parse_sites(["mlp_output", "attention_input", "mlp_out"]) == ["mlp_out", "attn_in"]
    with pytest.raises(ValueError, match="unknown component 'mlp'"):
        parse_sites("mlp")


@pytest.mark.parametrize("nb", list_notebooks(), ids=lambda p: p.stem)
def test_every_notebook_declares_typed_parameters_that_papermill_reads_alike(nb):
    declared = read_parameters(nb)  # also checks every default against its own rule
    inspected = pm.inspect_notebook(str(nb))
    assert list(declared) == list(inspected)
    for name, p in declared.items():
        assert p.type == inspected[name]["inferred_type_name"], name
    from lib.runner import takes_model

    if takes_model(nb):  # 08 has no language model and no MODEL
        assert declared["MODEL"].rule == "model"
    for name, p in declared.items():  # every bracket at the start of a comment is a real rule
        assert p.help.startswith("[") == (p.rule is not None), (name, p.help)


def test_rules_and_plain_brackets():
    from lib.core.params import rule_of

    assert rule_of("[0..] count") == "0.." and rule_of("[-1..4]") == "-1..4"
    assert rule_of("[a|b_c|d-e] x") == "a|b_c|d-e"
    assert rule_of("[some of hidden|mlp] x") == "some of hidden|mlp"
    assert rule_of("[layers] x") == "layers"
    assert rule_of("[0, L) the layers") is None and rule_of('[{"prompt"}] facts') is None
    assert rule_of("no rule") is None


def test_the_validator_converts_cli_text_by_declared_type():
    nb = paths.NOTEBOOKS / "02_all_model_causal.ipynb"
    ps = read_parameters(nb)
    assert check_value(ps["N_PROMPTS"], CliText("8")) == 8
    assert check_value(ps["ALPHAS"], CliText("[0, 1]")) == [0.0, 1.0]
    assert check_value(ps["FORCE"], CliText("True")) is True
    assert check_value(ps["LAYERS"], CliText("5")) == "5"
    assert check_value(ps["LAYERS"], CliText('"0,1"')) == "0,1"
    assert check_value(ps["INJECT_LAYER"], -1) == -1
    with pytest.raises(ParameterError, match="INJECT_LAYER.*at least -1"):
        check_value(ps["INJECT_LAYER"], -2)
    with pytest.raises(ParameterError, match="N_PROMPTS.*bool"):
        check_value(ps["N_PROMPTS"], True)


def test_a_default_that_breaks_its_own_rule_is_refused(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('MODEL: str = "m"  # [model]\nN: int = -1  # [0..] count')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    nbformat.write(nb, str(tmp_path / "00_x.ipynb"))
    with pytest.raises(ParameterError, match="N=-1"):
        read_parameters(tmp_path / "00_x.ipynb")


def test_graph_layers_must_be_among_the_trained_layers():
    from lib.core.params import ParameterError
    from lib.core.parsers import check_layers_within

    check_layers_within("22", "14,22")                 # fine, before the model is known
    check_layers_within("-1", "14,22")                 # undecidable without the model: later
    with pytest.raises(ParameterError, match=r"GRAPH_LAYERS='5'.*\[5\].*not in LAYERS='14,22'"):
        check_layers_within("5", "14,22")
    with pytest.raises(ParameterError, match=r"\[29\] are not in LAYERS"):
        check_layers_within("-1", "14,22", n_layers=30)
    assert check_layers_within("-1", "14,29", n_layers=30) == [29]


def test_notebook_values_are_the_checked_parameters_in_cell_order():
    notebook = paths.NOTEBOOKS / "08_das_mlp.ipynb"
    declared = read_parameters(notebook)
    namespace = {name: p.default for name, p in declared.items()}
    namespace["unrelated"] = 1
    values = notebook_values(notebook, namespace)
    assert list(values) == list(declared)
    assert values["LAYERS"] == "0,1,2"
    with pytest.raises(ParameterError, match="SEED"):
        notebook_values(notebook, {**namespace, "SEED": -1})
    del namespace["SEED"]
    with pytest.raises(ParameterError, match="SEED"):
        notebook_values(notebook, namespace)


# seeds and indices (checked against the model or prompt once it is known) have no upper bound
UNBOUNDED = {"SEED", "SPLIT_SEED", "PROMPT_INDEX", "LAYER", "INJECT_LAYER", "SEVERED_TOKEN",
             "BAR_POSITION", "CUMULATIVE_POSITIONS"}


def test_every_size_parameter_has_an_upper_bound():
    """A count, size or batch without a bound could ask for more memory than any machine has
    (09's DAS_N_TEST=1e9 took 21.7 GB before the kernel was killed): every one is bounded."""
    missing = []
    for nb in list_notebooks():
        for name, p in read_parameters(nb).items():
            if p.type not in ("int", "list[int]") or name in UNBOUNDED:
                continue
            if not (p.rule and "..".join(p.rule.split("..")[1:]).strip()):
                missing.append(f"{nb.stem}:{name} [{p.rule}]")
    assert not missing, f"size parameters without an upper bound: {missing}"


# --- every declared rule, broken on each side, refused by the runner before any kernel -------

#: one value each named rule refuses (the rules of lib.core.params)
BAD_NAMED = {"layers": "first", "positions": "last", "sites": "mlp", "name": "../escaped",
             "text": "   ", "device": "gpu", "dtype": "float64", "noise": "loud",
             "prompt files": '["nope.json"]'}


def _number(value: float, type_: str) -> str:
    """CLI text of ``value`` for a parameter of ``type_`` (a list holds it as its one item)."""
    text = str(int(value)) if "int" in type_ else repr(float(value))
    return f"[{text}]" if type_.startswith("list") else text


def _broken_values():
    """(notebook, parameter, CLI text, why) for every ruled parameter of every notebook: a
    value below and one above a numeric range (where it has that side), an unknown choice,
    or a value its named rule refuses."""
    from lib.core.params import _range

    cases = []
    for nb in list_notebooks():
        for name, p in read_parameters(nb).items():
            rule = p.rule
            if rule is None or name == "MODEL":   # MODEL: --models, tested in test_bad_inputs
                continue
            if ".." in rule and "|" not in rule:
                lo, hi = _range(rule)
                if lo is not None:
                    below = lo - 1 if "int" in p.type else lo - max(abs(lo), 1e-3)
                    cases.append((nb, name, _number(below, p.type), "below"))
                if hi is not None:
                    above = hi + 1 if "int" in p.type else hi + max(abs(hi), 1.0)
                    cases.append((nb, name, _number(above, p.type), "above"))
            elif "|" in rule:
                bad = "zz_unknown"
                cases.append((nb, name, f'["{bad}"]' if p.type.startswith("list") else bad,
                              "choice"))
            else:
                cases.append((nb, name, BAD_NAMED[rule], rule))
    return cases


BROKEN = _broken_values()


def test_every_rule_kind_is_broken_somewhere():
    whys = {why for *_, why in BROKEN}
    assert {"below", "above", "choice"} <= whys and set(BAD_NAMED) - {"model"} <= whys, whys


@pytest.mark.parametrize("nb, name, text, why", BROKEN,
                         ids=[f"{nb.stem[:2]}-{name}-{why}" for nb, name, _, why in BROKEN])
def test_every_parameter_outside_its_rule_is_refused_before_any_kernel(nb, name, text, why,
                                                                     tmp_path):
    from lib import runner

    with pytest.raises(ParameterError) as err:
        runner.check_run([nb], ["tiny-random"], runner.parse_params([f"{name}={text}"]),
                         tmp_path / "runs")
    assert name in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ipynb"))
