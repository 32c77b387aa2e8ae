"""Shared bits of the benchmark scripts: timing and writing ``benchmarks/results/<name>.json``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def timed(fn, device_type: str = "cpu"):
    """``(value, seconds)`` of ``fn()``, synchronising CUDA around it."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def write_result(name: str, payload: dict) -> Path:
    """Write one benchmark's figures (with thread count and load average) as JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "torch_threads": torch.get_num_threads(),
               "load_average_end": round(os.getloadavg()[0], 2), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
