"""Parameter parsers: one each for layers, positions, list values and site kinds, so that a
parameter means the same in every notebook (``LAYERS="-1"`` is the last layer everywhere).

They take values that :mod:`lib.core.params` has checked (or a caller's own) and return what the
computation needs; a value they cannot use raises the validator's
:class:`~lib.core.params.ParameterError`, naming the parameter (``what``) and the fix.
:func:`parse_layers` and :func:`parse_positions` read ``"all"``, ``"0,3,5"``, an int or a list,
negative values counting from the end; :func:`parse_list` reads a list or a comma-separated
string; :func:`parse_sites` is :func:`parse_list` checked against :mod:`lib.core.sites`;
:func:`check_layers_within` refuses one layer list that is not inside another.
"""

from __future__ import annotations

from collections.abc import Sequence

from lib.core.params import SITE_ALIASES, ParameterError, split_items
from lib.core.sites import ALL_SITE_KINDS


def _parse_indices(spec, n: int, what: str, unit: str) -> list[int]:
    if isinstance(spec, bool):
        raise ParameterError(f"{what} must be 'all', an integer or a list of integers, got {spec!r}")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("all", ""):
            return list(range(n))
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ParameterError(f"{what} must be 'all' or comma-separated integers like "
                                 f"'0,3,5', got {spec!r}") from None
    elif isinstance(spec, int):
        values = [spec]
    else:
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            raise ParameterError(f"{what} must be 'all', an integer or a list of integers, got "
                                 f"{spec!r}") from None
    if not values:
        raise ParameterError(f"{what} is empty; use 'all' or a list of integers like '0,3,5'")
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise ParameterError(f"{what} {bad} out of range: there are {n} {unit}, 0 to {n - 1} "
                             f"(or -{n} to -1 counting from the end)")
    return sorted({v % n for v in values})


def parse_layers(spec: str | int | Sequence[int], n_layers: int, what: str = "LAYERS") -> list[int]:
    """``"all"`` (or ``""``), ``"0,3,5"``, an int or a list -> sorted distinct layers in
    ``[0, n_layers)``; negative values count from the end (``-1`` is the last layer)."""
    return _parse_indices(spec, n_layers, what, "layers")


def check_layers_within(sub, full, n_layers: int | None = None, what: str = "GRAPH_LAYERS",
                        of: str = "LAYERS") -> list[int] | None:
    """Refuse layers in ``sub`` that are not in ``full`` (two :func:`parse_layers` specs),
    naming both parameters; with ``n_layers``, return ``sub``'s layers. Without it (before the
    model is loaded) only specs of explicit non-negative layers can be compared; others are
    left for the call with it."""
    def explicit(spec):
        if isinstance(spec, str) and spec.strip().lower() not in ("", "all"):
            items = [v.strip() for v in spec.split(",") if v.strip()]
            return {int(v) for v in items} if all(v.isdigit() for v in items) else None
        return None
    if n_layers is None:
        a, b = explicit(sub), explicit(full)
    else:
        a, b = set(parse_layers(sub, n_layers, what)), set(parse_layers(full, n_layers, of))
    if a is not None and b is not None and a - b:
        raise ParameterError(f"{what}={sub!r}: layer(s) {sorted(a - b)} are not in {of}="
                             f"{full!r}; add them to {of} or choose {what} among them")
    return None if n_layers is None else sorted(a)


def parse_positions(spec: str | int | Sequence[int], n_positions: int,
                    what: str = "POSITIONS") -> list[int]:
    """Like :func:`parse_layers`, for token positions of a prompt of ``n_positions`` tokens."""
    return _parse_indices(spec, n_positions, what, "token positions")


def parse_list(value, cast=str, what: str = "value") -> list:
    """A list parameter: a list or tuple as is, or a comma-separated string (``"a, b"`` ->
    ``["a", "b"]``, never split into characters); ``cast`` is applied to each item."""
    items = list(value) if isinstance(value, (list, tuple)) else split_items(value)
    try:
        return [cast(x) for x in items]
    except (TypeError, ValueError):
        raise ParameterError(f"{what} must be a list of {getattr(cast, '__name__', cast)}, got "
                             f"{value!r}") from None


def parse_sites(spec: str | Sequence[str], what: str = "COMPONENTS") -> list[str]:
    """``"mlp_out,attn_in"`` or a list -> distinct site kinds of :mod:`lib.core.sites` (pyvene's
    ``mlp_output`` and ``attention_input`` are accepted as aliases)."""
    items = parse_list(spec, str, what)
    if not items:
        raise ParameterError(f"{what} is empty; give at least one site kind, e.g. "
                             "'mlp_out,attn_in'")
    out = []
    for item in items:
        kind = SITE_ALIASES.get(item, item)
        if kind not in ALL_SITE_KINDS:
            raise ParameterError(f"{what}: unknown component {item!r}; use site kinds of "
                                 f"lib.core.sites: {', '.join(ALL_SITE_KINDS)} (pyvene's "
                                 "'mlp_output' and 'attention_input' are accepted as aliases)")
        if kind not in out:
            out.append(kind)
    return out
