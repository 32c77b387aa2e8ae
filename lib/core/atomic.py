"""Atomic file writes: a temporary file in the target's folder, renamed over the target, so an
interrupted run never leaves a half-written file; the temporaries of killed writers are removed
by the next write of the same file. Used by JSON results (:mod:`lib.core.io`) and tensor files
(:mod:`lib.core.tensorfiles`) alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lib.core import paths


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a fresh temporary file (unique per writer, so concurrent writers
    never collide); it then gets the shared file mode and replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, paths.file_mode())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    remove_stale_temporaries(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` files of ``path`` left by processes that are gone."""
    for stray in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stray.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and not _pid_alive(int(pid))):
            stray.unlink(missing_ok=True)
