#!/usr/bin/env bash
# The test job: set up .venv, then run the whole test suite (unit, I/O, and the end-to-end
# notebook runs on the real smollm2-135m). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/setup_env.sh | tail -n 1)
# One torch thread per worker (these small models run faster so on a shared CPU) and one worker
# per core, up to 4; each test file stays on one worker, so module fixtures run once.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORKERS=${TEST_WORKERS:-$("$PYBIN" -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
set +e
"$PYBIN" -m pytest tests -n "$WORKERS" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
