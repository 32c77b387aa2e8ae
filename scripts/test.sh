#!/usr/bin/env bash
# The test job: set up .venv, then run the whole test suite (unit, I/O, the notebooks on
# tiny-random and end to end on the real smollm2-135m). Extra arguments go to pytest.
#
# Without extra arguments it then runs the unit tests once more under another CPU kernel
# choice than this machine's own (ATEN_CPU_CAPABILITY: avx2 on an AVX512 CPU, default on an
# AVX2 one): kernels round float32 differently, as another CPU's do, so a test that holds only
# on the kernels it was written on fails here rather than on the next machine.
# PORTABILITY_TIER=0 skips that run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/setup_env.sh | tail -n 1)
# One torch thread per worker (these small models run faster so on a shared CPU) and one worker
# per core, up to 4; each test file stays on one worker, so module fixtures run once.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORKERS=${TEST_WORKERS:-$("$PYBIN" -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
# lint first (pyproject.toml's [tool.ruff]): seconds, and a failure names the file and line
"$PYBIN" -m ruff check --quiet lib tests scripts benchmarks notebooks
# and a type check of lib/ (pyproject.toml's [tool.mypy], basic level)
"$PYBIN" -m mypy --no-error-summary
set +e
"$PYBIN" -m pytest tests -n "$WORKERS" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
if [ "$rc" -ne 0 ] || [ "$#" -ne 0 ] || [ "${PORTABILITY_TIER:-1}" = "0" ]; then
    exit "$rc"
fi
read -r OWN OTHER < <("$PYBIN" -c "
import torch
own = torch.backends.cpu.get_cpu_capability()
print(own, {'AVX512': 'avx2', 'AVX2': 'default'}.get(own, 'none'))")
if [ "$OTHER" = "none" ]; then
    echo "portability tier skipped: this CPU's kernels ($OWN) are already the plainest"
    exit 0
fi
echo "portability tier: the unit tests again with ATEN_CPU_CAPABILITY=$OTHER (this CPU: $OWN)"
# the unit tests compare computations; the notebook, runner and bad-input tiers test plumbing
ATEN_CPU_CAPABILITY=$OTHER "$PYBIN" -m pytest tests -n "$WORKERS" --dist loadfile -m "not slow" \
    -q -p no:cacheprovider --ignore=tests/test_notebooks_fast.py \
    --ignore=tests/test_bad_inputs.py --ignore=tests/test_runner.py
