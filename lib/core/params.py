"""Notebook parameters: one reader of the ``parameters`` cell and one validator (the parsers
of the checked values: :mod:`lib.core.parsers`).

Every notebook declares its parameters in one cell tagged ``parameters``, one typed literal a
line, with a comment that may start with a *rule* in square brackets::

    N_PROMPTS: int = 0                # [0..] pairs per prompt file; 0 means all
    LAYERS: str = "all"               # [layers] "all" or "0,3,5"; negative counts from the end
    COMPONENTS: list[str] = ["mlp_out"]  # [sites] site kinds of lib.core.sites
    ASSIGNMENT: str = "source"        # [source|base] how the token lists are filed
    KINDS: str = "hidden,mlp"         # [some of hidden|mlp|attention] comma-separated

The annotation gives the type (``str``, ``int``, ``float``, ``bool``, ``list``, ``list[str]``,
``list[int]``, ``list[float]``; any other annotation is passed on unchecked); the rule gives
the range:

* ``[lo..hi]``, ``[lo..]``, ``[..hi]``: numbers in that closed range (each item of a list);
* ``[a|b|c]``: one of these strings (each item of a list);
* ``[some of a|b|c]``: a comma-separated string (or list) of some of these, at least one;
* a named rule: ``layers``, ``positions`` (``"all"`` or comma-separated integers, negative ones
  counting from the end), ``sites`` (site kinds of :mod:`lib.core.sites`), ``name`` (a file-name
  part: letters, digits, ``.``, ``_``, ``-``; it cannot leave its folder), ``text`` (a non-empty
  string), ``model`` (a non-empty model name), ``device``, ``dtype``, ``noise`` (``auto``,
  ``subject`` or a positive number), ``prompt files`` (files that exist in ``prompt_set/`` or as
  paths).

:func:`check_value` is the one validator: the runner calls it for every ``-p NAME=VALUE``
before any notebook starts, and each notebook calls :func:`check_namespace` on its own
parameters in the cell after the parameters cell (so papermill and JupyterLab runs are checked
too). Values that the runner reads from the command line (:class:`CliText`) are converted to
the declared type first: for a ``str`` parameter the text itself (``-p LAYERS=5`` is ``"5"``),
for the others JSON (``-p N_PROMPTS=8``, ``-p COMPONENTS='["mlp_out"]'``).

The parsers that turn checked values into what the computation needs live beside it, in
:mod:`lib.core.parsers`.
"""

from __future__ import annotations

import ast
import difflib
import io as _io
import json
import math
import os
import re
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.core.sites import ALL_SITE_KINDS

SITE_ALIASES = {"mlp_output": "mlp_out", "attention_input": "attn_in"}
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
TYPES = ("str", "int", "float", "bool", "list", "list[str]", "list[int]", "list[float]")
NAMED_RULES = ("layers", "positions", "sites", "name", "text", "model", "device", "dtype",
               "noise", "prompt files")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class ParameterError(ValueError):
    """A notebook parameter with an unknown name, a wrong type or a value out of range."""


class CliText(str):
    """A ``-p NAME=VALUE`` value exactly as typed, converted once the declared type is known."""


@dataclass(frozen=True)
class Param:
    """One declared parameter of one notebook."""

    name: str
    type: str          # one of TYPES
    default: Any
    help: str          # the comment, rule included
    rule: str | None   # the text inside the leading [...] of the comment
    notebook: str      # the notebook's stem

    def describe(self) -> str:
        shown = str(self.default) if isinstance(self.default, bool) else json.dumps(self.default)
        return f"{self.name}: {self.type} = {shown}" + (
            f"  # {self.help}" if self.help else "")


# --- reading the parameters cell ------------------------------------------------------------

def _parameters_source(notebook: Path) -> str:
    try:
        nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ParameterError(f"cannot read notebook {notebook}: {err}") from err
    cells = [c for c in nb.get("cells", [])
             if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{notebook} must have exactly one code cell tagged 'parameters', "
                             f"it has {len(cells)}")
    src = cells[0]["source"]
    return "".join(src) if isinstance(src, list) else src


def _comments(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(_io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def read_parameters(notebook: str | os.PathLike) -> dict[str, Param]:
    """The declared parameters of ``notebook`` (an ``.ipynb`` path), in cell order."""
    notebook = Path(notebook)
    source = _parameters_source(notebook)
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ParameterError(f"{notebook}: the parameters cell is not valid Python ({err})") from err
    comments = _comments(source)
    out: dict[str, Param] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, annotation, value = node.target.id, ast.unparse(node.annotation), node.value
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            name, annotation, value = node.targets[0].id, None, node.value
        else:
            continue
        if value is None:
            default = None
        else:
            try:
                default = ast.literal_eval(value)
            except ValueError:
                default = ast.unparse(value)
        annotation = annotation or type(default).__name__
        if annotation not in TYPES:
            annotation = "any"  # e.g. dict: passed on unchecked (only the rule, if any, applies)
        assert node.end_lineno is not None  # ast.parse sets it on every statement
        help_text = comments.get(node.end_lineno, "")
        rule = rule_of(help_text)
        param = Param(name, annotation, default, help_text, rule, notebook.stem)
        if rule is not None:
            check_value(param, default)  # a default that breaks its own rule is a bug
        out[name] = param
    return out


def rule_of(comment: str) -> str | None:
    """The rule at the start of a parameter's comment, or None. Bracketed text that is not a
    rule (``[0, L) ...``) is plain help; ``tests/test_params.py`` checks that the repository's
    notebooks use only real rules."""
    match = re.match(r"^\[([^\]]*)\]", comment)
    if not match:
        return None
    rule = match.group(1).strip()
    if rule in NAMED_RULES:
        return rule
    if rule.startswith("some of ") and "|" in rule:
        return rule
    if "|" in rule and re.fullmatch(r"[\w.-]+(\s*\|\s*[\w.-]+)+", rule):
        return rule
    number = r"-?\d+(\.\d+)?([eE][-+]?\d+)?"
    if re.fullmatch(rf"({number})?\.\.({number})?", rule) and rule != "..":
        return rule
    return None


# --- the validator --------------------------------------------------------------------------

def _fail(p: Param, value: Any, problem: str, fix: str) -> ParameterError:
    shown = repr(str(value)) if isinstance(value, CliText) else repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ParameterError(f"parameter {p.name}={shown} ({p.notebook}): {problem}; {fix}")


def _example(p: Param) -> str:
    if p.type == "str":
        return f"-p {p.name}={p.default}" if p.default else f"-p {p.name}=TEXT"
    return f"-p {p.name}='{json.dumps(p.default)}'" if p.type.startswith("list") else \
        f"-p {p.name}={json.dumps(p.default)}"


def _from_cli(p: Param, text: str) -> Any:
    if p.type == "str":
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return str(text)
    if p.type == "bool" and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
            p.type, "a JSON list")
        raise _fail(p, text, f"expected {kind} ({p.type}), got text that is not",
                    f"write it as {_example(p)}") from None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_type(p: Param, value: Any) -> Any:
    t = p.type
    if t == "any":
        return value
    if t == "str":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _fail(p, value, f"expected a string (str), got {type(value).__name__}",
                        f"quote it: {p.name}=\"{value}\"")
        return str(value)
    if t == "bool":
        if not isinstance(value, bool):
            raise _fail(p, value, f"expected true or false (bool), got {type(value).__name__}",
                        f"write {p.name}=true or {p.name}=false")
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(p, value, f"expected an integer (int), got {type(value).__name__}",
                        f"write it as {_example(p)}")
        return value
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(p, value, f"expected a number (float), got {type(value).__name__}",
                        f"write it as {_example(p)}")
        if not math.isfinite(value):
            raise _fail(p, value, "must be a finite number", "give a finite value")
        return float(value)
    # lists
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(p, value, f"expected a list ({t}), got {type(value).__name__}",
                    f"write it as a JSON list, e.g. {_example(p)}")
    item_type = t[5:-1] if t != "list" else None
    if item_type is not None:
        inner = Param(p.name, item_type, None, "", None, p.notebook)
        for i, item in enumerate(value):
            try:
                _check_type(inner, item)
            except ParameterError:
                raise _fail(p, value, f"item {i} ({item!r}) is not of type {item_type}",
                            f"give a list of {item_type}, e.g. {_example(p)}") from None
        value = [float(v) for v in value] if item_type == "float" else list(value)
    return list(value)


def _range(rule: str) -> tuple[float | None, float | None]:
    lo, hi = rule.split("..", 1)
    return (float(lo) if lo.strip() else None, float(hi) if hi.strip() else None)


def _check_rule(p: Param, value: Any) -> None:
    rule = p.rule
    items = value if isinstance(value, list) else [value]
    if rule is None:
        return
    if ".." in rule and "|" not in rule:
        lo, hi = _range(rule)
        for v in items:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                span = f"{'' if lo is None else _num(lo)} to {'' if hi is None else _num(hi)}"
                where = (f"at least {_num(lo)}" if hi is None and lo is not None else
                         f"at most {_num(hi)}" if lo is None and hi is not None else
                         f"from {span}")
                raise _fail(p, value, f"out of range: must be {where}",
                            f"choose a value {where}")
        return
    if rule.startswith("some of "):
        choices = [c.strip() for c in rule[len("some of "):].split("|")]
        parts = split_items(value)
        bad = [x for x in parts if x not in choices]
        if bad or not parts:
            raise _fail(p, value, f"unknown {bad}" if bad else "is empty",
                        f"give a comma-separated list of some of {', '.join(choices)}")
        return
    if "|" in rule:
        choices = [c.strip() for c in rule.split("|")]
        for v in items:
            if v not in choices:
                close = difflib.get_close_matches(str(v), choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _fail(p, value, f"{v!r} is not one of {', '.join(choices)}{hint}",
                            f"choose one of {', '.join(choices)}")
        return
    checker = _NAMED[rule]
    checker(p, value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def split_items(value) -> list[str]:
    """A list (items as text) or a comma-separated string -> its non-empty items, stripped."""
    if isinstance(value, (list, tuple)):
        return [str(x).strip() for x in value if str(x).strip()]
    return [x.strip() for x in str(value).split(",") if x.strip()]


def _indices_rule(p: Param, value) -> None:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", ""):
            return
        try:
            [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise _fail(p, value, "must be 'all' or comma-separated integers",
                        f"write e.g. {p.name}=\"0,3,5\" or {p.name}=\"-1\" (the last)") from None
        if not [x for x in text.split(",") if x.strip()]:
            raise _fail(p, value, "lists no integers", f"write e.g. {p.name}=\"0,3,5\"")


def _sites_rule(p: Param, value) -> None:
    parts = split_items(value)
    bad = [x for x in parts if SITE_ALIASES.get(x, x) not in ALL_SITE_KINDS]
    if bad or not parts:
        raise _fail(p, value, f"unknown site kinds {bad}" if bad else "is empty",
                    f"use site kinds of lib.core.sites: {', '.join(ALL_SITE_KINDS)}")


def _name_rule(p: Param, value) -> None:
    if not _NAME_RE.fullmatch(value) or ".." in value:   # fullmatch: no trailing newline
        raise _fail(p, value, "is not a plain file-name part (it could leave its folder)",
                    "use only letters, digits, '.', '_' and '-', not starting with '.' "
                    "and without '..' or '/'")


def _text_rule(p: Param, value) -> None:
    if not value.strip():
        raise _fail(p, value, "is empty", f"give a non-empty {p.name}")


def _model_rule(p: Param, value) -> None:
    if not value.strip():
        raise _fail(p, value, "is empty", "give a model name such as smollm2-135m")


def _device_rule(p: Param, value) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise _fail(p, value, "is not a device", "use auto, cpu, cuda, cuda:N or mps")
    if value.startswith("cuda") or value == "mps":   # this machine runs the kernels
        import torch

        count = torch.cuda.device_count() if value.startswith("cuda") else \
            int(torch.backends.mps.is_available())
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= count:
            raise _fail(p, value, f"is not on this machine ({count} such device"
                        f"{'' if count == 1 else 's'})", "use auto (the GPU when there is one, "
                        "else the CPU) or cpu")


def _dtype_rule(p: Param, value) -> None:
    if value not in DTYPES:
        raise _fail(p, value, "is not a dtype", f"use one of {', '.join(DTYPES)}")


def _noise_rule(p: Param, value) -> None:
    if value in ("auto", "subject"):
        return
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise _fail(p, value, "is neither 'auto', 'subject' nor a positive number",
                    "use auto, subject or a number such as 0.1")


def _prompt_files_rule(p: Param, value) -> None:
    from lib.core import paths

    if not value:
        raise _fail(p, value, "is empty", "give at least one pair file, e.g. cpp_python.json")
    for item in value:
        path = Path(item)
        found = (path if path.is_absolute() else paths.REPO_ROOT / path).exists() or \
            (paths.PROMPT_SET / path).exists()
        if not found:
            names = ", ".join(sorted(q.name for q in paths.PROMPT_SET.glob("*.json")))
            raise _fail(p, value, f"prompt file {item!r} does not exist",
                        f"give a file of prompt_set/ ({names}) or a path to one")


_NAMED = {"layers": _indices_rule, "positions": _indices_rule, "sites": _sites_rule,
          "name": _name_rule, "text": _text_rule, "model": _model_rule,
          "device": _device_rule, "dtype": _dtype_rule, "noise": _noise_rule,
          "prompt files": _prompt_files_rule}


def check_value(p: Param, value: Any) -> Any:
    """``value`` checked against ``p``'s type and rule (converted first when it is
    :class:`CliText`); returns the value to pass on. Raises :class:`ParameterError` naming the
    parameter, the notebook, the problem and the fix."""
    if isinstance(value, CliText):
        value = _from_cli(p, str(value)) if p.type != "any" else _json_or_text(str(value))
    value = _check_type(p, value)
    _check_rule(p, value)
    return value


def unknown_names(given: Sequence[str], declared: dict[str, dict[str, Param]]) -> list[str]:
    """Messages for the names in ``given`` that no notebook in ``declared`` (stem -> params)
    declares."""
    everything = sorted({n for ps in declared.values() for n in ps})
    out = []
    for name in given:
        if not any(name in ps for ps in declared.values()):
            close = difflib.get_close_matches(name, everything, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            out.append(f"parameter {name} is not declared by any selected notebook "
                       f"({', '.join(declared)}); {hint}`python -m lib.runner --help` lists "
                       "each notebook's parameters")
    return out


def check_params(notebooks: Sequence[str | os.PathLike], params: dict) -> dict[Path, dict]:
    """Check ``params`` for ``notebooks`` before anything runs; returns each notebook's own
    checked values (only the parameters it declares). Every problem is reported at once."""
    declared = {Path(nb): read_parameters(nb) for nb in notebooks}
    problems = unknown_names(list(params), {nb.stem: ps for nb, ps in declared.items()})
    out: dict[Path, dict] = {}
    for nb, ps in declared.items():
        out[nb] = {}
        for name, value in params.items():
            if name in ps:
                try:
                    out[nb][name] = check_value(ps[name], value)
                except ParameterError as err:
                    problems.append(str(err))
    if problems:
        raise ParameterError("\n".join(dict.fromkeys(problems)))
    return out


def check_namespace(notebook: str | os.PathLike, namespace: dict) -> None:
    """Check the current values of ``notebook``'s parameters in ``namespace`` (a notebook's
    ``globals()``); used in the cell after each parameters cell."""
    problems = []
    for name, p in read_parameters(notebook).items():
        if name in namespace:
            try:
                check_value(p, namespace[name])
            except ParameterError as err:
                problems.append(str(err))
    if problems:
        raise ParameterError("\n".join(problems))


def notebook_values(notebook: str | os.PathLike, namespace: dict) -> dict[str, Any]:
    """The values of ``notebook``'s parameters in ``namespace``, checked (:func:`check_namespace`)
    and in the order of its parameters cell: what a study module receives instead of a retyped
    dict. A parameter missing from ``namespace`` is an error naming it."""
    check_namespace(notebook, namespace)
    declared = read_parameters(notebook)
    missing = [name for name in declared if name not in namespace]
    if missing:
        raise ParameterError(f"{Path(notebook).name}: parameters {missing} are not set; run the "
                             "parameters cell first")
    return {name: namespace[name] for name in declared}
