"""The 06 benchmark's exact-work ceiling, against a count done by hand on the tiny Llama."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_tracing import exact_work_ceiling  # noqa: E402
from lib.studies.tracing import Restoration  # noqa: E402


def test_exact_work_ceiling_by_hand(llama):
    # tiny Llama: d 64, 4 query heads and 2 key/value heads of 16, MLP 128, 2 blocks, vocab 259
    d, kv_width, mlp, vocab = 64, 32, 128, 259
    kv = 2 * d * kv_width
    per_block = 2 * d * d + kv + 3 * d * mlp
    head = vocab * d
    jobs = [Restoration(restore=(("resid_post", 0, 2),)),                    # block 1 from token 2
            Restoration(restore=(("mlp_out", 0, 0), ("mlp_out", 1, 0))),     # block 1 from token 0
            Restoration(restore=(("resid_post", 1, 3),))]                    # nothing but the head
    T = 5
    got = exact_work_ceiling(llama, T, jobs)
    # the last block is counted at its last position plus the other changed positions' keys/values
    exact = (per_block + kv * (T - 2 - 1) + head) + (per_block + kv * (T - 0 - 1) + head) + head
    full = 3 * T * (2 * per_block + head)
    assert got["per_block_per_token"] == per_block == 36864
    assert got["head_per_token"] == head
    assert got["multiply_adds_exact_minimum"] == exact
    assert got["multiply_adds_causal_tracer"] == full
    assert got["ceiling"] == pytest.approx(full / exact)
