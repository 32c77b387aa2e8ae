#!/usr/bin/env bash
# The test job: set up .venv, then run the whole test suite (unit, I/O, and the end-to-end
# notebook runs on the real smollm2-135m). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/setup_env.sh | tail -n 1)
set +e
"$PYBIN" -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
