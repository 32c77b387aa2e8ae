"""Result kinds: each kind of result file has a name and a declared shape, checked on every read.

A file that parses as JSON can still be the wrong thing: a valid result of *another* notebook
(``SCORES_DIR=full_compute`` makes 00 look at 02's file), or the right kind with a field of the
wrong type (``"records": [{"x": 1}]``), which would otherwise fail much later as a bare
``KeyError`` inside a figure. So every kind declares, next to the code that writes it, a
:class:`Kind`: a name, the notebook that writes it, and its shape, written with Python's types:

=======================  =========================================================================
``str``, ``int``,        that type (a ``bool`` is no ``int``)
``bool``
``float``                a finite number, int or float (JSON's ``NaN`` / ``Infinity`` are refused,
                         in undeclared fields too; the writer stores NaN as null, so a field that
                         can be NaN is ``maybe``)
``dict``, ``list``,      any object, any list, anything
``ANY``
``[shape]``              a list whose every item has ``shape``
``{"key": shape}``       an object with these keys (more are allowed); ``optional(shape)`` for a
                         key that may be missing
``maybe(shape)``         null or ``shape``
``map_of(shape)``        an object whose every value has ``shape`` (its keys are data: pair
                         names, causal models ...)
``nonempty([shape])``    a non-empty list of ``shape``
``names``                a non-empty list of strings, not a string split into characters
``one_of(a, b, ...)``    any of them
=======================  =========================================================================

New files name their kind (``provenance.kind``, written by :func:`lib.core.io.write_json`);
committed files written before that are recognised by their shape (:func:`identify`), so they
stay current and are not rewritten. :func:`lib.core.io.read_current` uses :func:`verdict` to
tell the three cases apart: the expected kind (read), a valid result of another kind (refused
with :class:`WrongKindError`: nothing moved or overwritten), and a malformed file (set aside).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class SchemaError(ValueError):
    """A result does not have its kind's shape; the message says where and what was found."""


class WrongKindError(Exception):
    """A result file holds a valid result of another kind than the one asked for. Not a
    ``ValueError``: nothing that sets unreadable files aside may catch it."""


ANY = object()


# the wrappers of the shape grammar (made by the functions below): one inner shape each, and
# the class says what it means
@dataclass(frozen=True, eq=False)   # compared by identity, as before
class _Wrapped:
    shape: Any


class _Optional(_Wrapped):
    pass


class _Maybe(_Wrapped):
    pass


class _MapOf(_Wrapped):
    pass


class _NonEmpty(_Wrapped):
    pass


class _OneOf:
    def __init__(self, shapes):
        self.shapes = shapes


class _Names:
    pass


def optional(shape) -> _Optional:
    """A key of an object that may be missing (when present, it has ``shape``)."""
    return _Optional(shape)


def maybe(shape) -> _Maybe:
    """null or ``shape``."""
    return _Maybe(shape)


def map_of(shape) -> _MapOf:
    """An object whose keys are data (pair names, ...) and whose every value has ``shape``."""
    return _MapOf(shape)


def nonempty(shape: list) -> _NonEmpty:
    """A non-empty list: ``nonempty([item])``."""
    if not isinstance(shape, list) or len(shape) != 1:
        raise TypeError(f"nonempty takes a list shape [item], got {shape!r}")
    return _NonEmpty(shape[0])


def one_of(*shapes) -> _OneOf:
    """Any of ``shapes``."""
    return _OneOf(shapes)


names = _Names()
#: a finite number or null (NaN is written as null)
NUM = maybe(float)
#: the summary of a sampled quantity (:func:`lib.core.stats.summarize`): mean, spread, interval, n
STAT = {"mean": NUM, "n": int, "std": optional(NUM), "ci_low": optional(NUM),
        "ci_high": optional(NUM)}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(shape, value: Any, where: str = "$") -> None:
    """Raise :class:`SchemaError` naming the first place where ``value`` does not have ``shape``
    (the grammar is in the module docstring)."""
    if shape is ANY:
        return
    if isinstance(shape, _Maybe):
        if value is not None:
            check(shape.shape, value, where)
        return
    if isinstance(shape, _Optional):
        check(shape.shape, value, where)
        return
    if isinstance(shape, _OneOf):
        errors = []
        for option in shape.shapes:
            try:
                check(option, value, where)
                return
            except SchemaError as err:
                errors.append(str(err))
        raise SchemaError(" or ".join(errors))
    if shape is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"at {where}: expected a number, got {_type_name(value)} "
                              f"{_short(value)}")
        if not math.isfinite(value):
            raise SchemaError(f"at {where}: expected a finite number, got {value}")
        return
    if shape in (int, str, bool, dict, list):
        if isinstance(value, bool) and shape is int or not isinstance(value, shape):
            raise SchemaError(f"at {where}: expected {shape.__name__}, got {_type_name(value)} "
                              f"{_short(value)}")
        return
    if isinstance(shape, _Names):
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) and v for v in value):
            raise SchemaError(f"at {where}: expected a non-empty list of names, got "
                              f"{_short(value)}")
        if len(value) > 1 and all(len(v) == 1 for v in value):
            raise SchemaError(f"at {where}: a string split into characters: {_short(value)}")
        return
    if isinstance(shape, (list, _NonEmpty)):
        if isinstance(shape, list) and len(shape) != 1:
            raise TypeError(f"a list shape has one item shape, got {shape!r}")
        item = shape[0] if isinstance(shape, list) else shape.shape
        if not isinstance(value, list):
            raise SchemaError(f"at {where}: expected a list, got {_type_name(value)} "
                              f"{_short(value)}")
        if isinstance(shape, _NonEmpty) and not value:
            raise SchemaError(f"at {where}: expected a non-empty list, got []")
        for i, v in enumerate(value):
            check(item, v, f"{where}[{i}]")
        return
    if isinstance(shape, _MapOf):
        if not isinstance(value, dict):
            raise SchemaError(f"at {where}: expected an object, got {_type_name(value)} "
                              f"{_short(value)}")
        for k, v in value.items():
            check(shape.shape, v, f"{where}.{k}")
        return
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise SchemaError(f"at {where}: expected an object, got {_type_name(value)} "
                              f"{_short(value)}")
        missing = [k for k, s in shape.items() if k not in value and not isinstance(s, _Optional)]
        if missing:
            raise SchemaError(f"at {where}: missing keys {missing}")
        for k, s in shape.items():
            if k in value:
                check(s, value[k], f"{where}.{k}")
        return
    raise TypeError(f"not a shape: {shape!r}")


def check_finite(value: Any, where: str = "$") -> None:
    """Raise :class:`SchemaError` at the first NaN or infinity anywhere in ``value``, in fields
    its shape declares and in those it does not: results are written with NaN as null
    (:func:`lib.core.io.write_json`), so a file holding one was not written as it reads."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(f"at {where}: expected a finite number, got {value} (results "
                              "store NaN as null)")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{where}[{i}]")


def require_keys(*keys: str, lists: tuple[str, ...] = ()) -> Callable[[dict], None]:
    """A schema check by key names alone, for :func:`lib.core.io.write_json` /
    :func:`lib.core.io.read_current` where no :class:`Kind` is declared: the payload is an object
    with ``keys``, and each key in ``lists`` holds a non-empty list whose items are not single
    characters of a split string (the ``["m", "l", "p", ...]`` of a string taken for a list)."""
    def check(payload: dict) -> None:
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
        missing = [k for k in keys + lists if k not in payload]
        if missing:
            raise ValueError(f"missing keys {missing}")
        for key in lists:
            value = payload[key]
            if not isinstance(value, list) or not value:
                raise ValueError(f"{key!r} must be a non-empty list, got {value!r:.80}")
            if len(value) > 1 and all(isinstance(v, str) and len(v) == 1 for v in value):
                raise ValueError(f"{key!r} is a string split into characters: {value!r:.80}")
    return check


_KINDS: dict[str, "Kind"] = {}
_KIND_MODULES: list[str] = []


class Kind:
    """One kind of result file: ``name`` (written into ``provenance.kind``), ``writer`` (the
    notebook that writes it, for messages), ``shape`` (an object shape, see the module
    docstring), ``extra`` (checks across fields that a shape cannot say: lengths that must
    agree ...; raising ``ValueError``) and ``folder`` (the parameter that chooses the folder it
    is written to, for the fix in a refusal). Calling it checks a payload (so it is a
    ``check=`` of :func:`lib.core.io.write_json` and :func:`lib.core.io.load_or_compute`).
    Creating one registers it, so that files of every kind can be recognised."""

    def __init__(self, name: str, writer: str, shape: dict,
                 extra: Callable[[dict], Any] | None = None, folder: str = "FULL_COMPUTE_DIR"):
        if not isinstance(shape, dict) or not shape:
            raise TypeError(f"kind {name}: its shape must be a non-empty object shape")
        self.name, self.writer, self.shape, self.extra, self.folder = \
            name, writer, shape, extra, folder
        self.keys = frozenset(k for k, s in shape.items() if not isinstance(s, _Optional))
        _KINDS[name] = self

    def __repr__(self) -> str:
        return f"Kind({self.name!r}, written by {self.writer})"

    def __call__(self, payload: Any) -> None:
        """Raise :class:`SchemaError` (a ``ValueError``) when ``payload`` is not of this kind."""
        declared = declared_kind(payload)
        if declared not in (None, self.name):
            raise SchemaError(f"it names its kind {declared!r}, not {self.name!r}")
        try:
            check(self.shape, payload)
            check_finite(payload)
            if self.extra is not None:
                self.extra(payload)
        except SchemaError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise SchemaError(str(err)) from err

    def fits(self, payload: Any) -> bool:
        """Whether ``payload`` is a valid result of this kind."""
        try:
            self(payload)
            return True
        except SchemaError:
            return False


def declare_modules(*modules: str) -> None:
    """Name the modules that declare kinds (the study layer does, for every study), so that
    :func:`all_kinds` can recognise a file of a kind whose module is not imported yet."""
    _KIND_MODULES.extend(m for m in modules if m not in _KIND_MODULES)


def all_kinds() -> list[Kind]:
    """Every declared kind (importing the modules of :func:`declare_modules` first)."""
    for module in _KIND_MODULES:
        importlib.import_module(module)
    return list(_KINDS.values())


def declared_kind(payload: Any) -> str | None:
    """The kind a file names (``provenance.kind``), or None (files written before kinds)."""
    prov = payload.get("provenance") if isinstance(payload, dict) else None
    kind = prov.get("kind") if isinstance(prov, dict) else None
    return kind if isinstance(kind, str) else None


def identify(payload: Any) -> Kind | None:
    """The kind of a result: the one it names, else the first declared kind it is a valid
    result of (files written before kinds were named), else None."""
    named = declared_kind(payload)
    kinds = all_kinds()
    if named is not None:
        return next((k for k in kinds if k.name == named), None)
    return next((k for k in kinds if k.fits(payload)), None)


def verdict(payload: dict, expected: Kind) -> tuple[str, str]:
    """How a parsed result file relates to the ``expected`` kind: ``("ok", "")``; ``("other",
    description)`` for a result of another kind (it names another kind, is a valid result of
    another kind, or lacks the expected kind's keys while having all of another's); or
    ``("bad", why)`` for a malformed file of the expected kind or of none."""
    named = declared_kind(payload)
    if named is not None and named != expected.name:
        other = next((k for k in all_kinds() if k.name == named), None)
        return "other", describe(other) if other else f"a {named} result"
    try:
        expected(payload)
        return "ok", ""
    except SchemaError as err:
        why = f"not a valid {expected.name} result: {err}"
    if named is not None:
        return "bad", why
    others = [k for k in all_kinds() if k is not expected]
    valid = next((k for k in others if k.fits(payload)), None)
    if valid is not None:
        return "other", describe(valid)
    if not expected.keys <= set(payload):
        alike = next((k for k in others if k.keys <= set(payload)), None)
        if alike is not None:
            return "other", describe(alike) + " (itself malformed)"
    return "bad", why


def describe(kind: Kind) -> str:
    """``a <name> result (written by <writer>)``."""
    return f"a {kind.name} result (written by {kind.writer})"


def refusal(path, expected: Kind, found: str) -> WrongKindError:
    """The error for a file at ``path`` that holds ``found`` (:func:`describe`) where
    ``expected`` was asked for: what is there, what was expected, that nothing was touched,
    and the fix."""
    return WrongKindError(
        f"{path} holds {found}, not {describe(expected)}; nothing was moved or overwritten. "
        f"Write this result to another folder ({expected.folder}=...), or move that file away "
        "yourself if it is no longer needed")
