"""Memory estimates before allocation: a size parameter that will not fit is refused first.

An upper bound in a parameters cell (``# [1..1000000]``) keeps a size finite, but what fits
depends on the machine: ``DAS_N_TEST=1000000`` fits a workstation and not a small container,
and finding out by running means minutes of work and then the kernel killed, with no message
naming the cause. So a step that allocates in proportion to a size parameter first calls
:func:`check_fits` with a simple estimate, ``value x per_unit_bytes`` (plus ``fixed_bytes``),
and a size that would take more than :data:`SHARE` of the memory available now is refused with
a :class:`WontFitError` naming the parameter, the estimate, the memory available and the
largest value that fits, before any model is loaded or any data is built.

Available memory: ``MemAvailable`` of ``/proc/meminfo`` (Linux; psutil's ``available`` where
installed and ``/proc`` is not), and on a CUDA device the free memory ``torch.cuda.mem_get_info``
reports. Where neither can be read, nothing is refused. Estimates are per-unit costs written
beside the code that allocates (each says what it counts and how it was measured); they are
meant to catch sizes off by orders of magnitude, not to budget the last megabyte, hence the
:data:`SHARE`: the rest is for the model, the interpreter and what an estimate leaves out.
"""

from __future__ import annotations

from lib.core.params import ParameterError

#: the share of the available memory one size parameter's estimate may take
SHARE = 0.8


class WontFitError(ParameterError):
    """A size parameter whose estimated memory exceeds what is available; the message names
    the parameter, the estimate, the memory available and the largest value that fits."""


def available_bytes(device: str = "cpu") -> int | None:
    """Memory available now on ``device`` ("cpu", "cuda", "cuda:1" ...), in bytes, or None
    where it cannot be read."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except (ImportError, AttributeError, OSError):
        return None


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def check_fits(parameter: str, value: int, per_unit_bytes: float, fixed_bytes: float = 0,
               device: str = "cpu", what: str = "") -> None:
    """Refuse ``parameter = value`` (:class:`WontFitError`) when ``fixed_bytes + value *
    per_unit_bytes`` exceeds :data:`SHARE` of the memory available on ``device``; ``what``
    says in a few words what the estimate counts (for the message)."""
    if value <= 0 or per_unit_bytes <= 0:
        return
    available = available_bytes(device)
    if available is None:
        return
    budget = SHARE * available
    needed = fixed_bytes + value * per_unit_bytes
    if needed <= budget:
        return
    largest = max(0, int((budget - fixed_bytes) // per_unit_bytes))
    counts = f" ({what})" if what else ""
    raise WontFitError(
        f"{parameter}={value} needs about {_size(needed)}{counts}, more than "
        f"{SHARE:.0%} of the {_size(available)} available on {device}; the largest "
        f"{parameter} that fits is about {largest}: lower it, or free memory")

