"""Runner targets on several cores: a list split into balanced groups, one process per group
with its own log, and the failed ones reported.

Used by ``das_sweep.py`` (09's grid split by causal model) and ``das_convergence.py`` (the
budget grid split by causal model). These small models run fastest at one torch thread per
process, so a 2-core machine runs two processes of one thread each.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def groups(items: list, n: int) -> list[list]:
    """``items`` in ``n`` contiguous groups (fewer if there are fewer items), sizes differing
    by at most one, larger first."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


@dataclass
class Worker:
    """One started process: its index, the items it was given, its folder and log."""
    index: int
    share: list
    folder: Path
    proc: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"


def start(index: int, share: list, folder: Path, command: list[str], cwd: Path) -> Worker:
    """``command`` started in ``cwd`` with its output (stdout and stderr) in ``folder/log.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "log.txt").open("w") as log:   # the child holds its own descriptor
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return Worker(index, share, folder, proc)


def wait_all(workers: list[Worker], what: str, started: float,
             report: Callable[[Worker], str] | None = None, every_s: float = 300.0
             ) -> list[Worker]:
    """Wait for every worker, printing each exit code within ``every_s`` seconds of its end;
    returns the failed ones with the end of their logs printed. With ``report``, every
    ``every_s`` seconds while some still run, one line of each running worker's
    ``report(worker)`` (e.g. its runs trained so far), when a line changed. Interrupted
    (Ctrl-C), every worker is stopped."""
    failed, running, last = [], list(workers), ""
    try:
        while running:
            try:
                running[0].proc.wait(timeout=every_s)
            except subprocess.TimeoutExpired:
                pass
            for w in [w for w in running if w.proc.poll() is not None]:
                running.remove(w)
                rc = w.proc.returncode
                print(f"worker {w.index} ({what} {w.share}) finished with exit code {rc} after "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                if rc:
                    failed.append(w)
            if report and running:
                line = "; ".join(f"worker {w.index}: {report(w)}" for w in running)
                if line != last:
                    minutes = (time.perf_counter() - started) / 60
                    print(f"{minutes:.0f} min: {line}", flush=True)
                    last = line
    except KeyboardInterrupt:
        for w in workers:
            w.proc.terminate()
        raise
    failed.sort(key=lambda w: w.index)
    for w in failed:
        tail = w.log.read_text(errors="replace")[-3000:]
        print(f"--- worker {w.index} failed; the end of {w.log}:\n{tail}")
    return failed
