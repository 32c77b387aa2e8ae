#!/usr/bin/env bash
# The main job: set up .venv, then run every numbered notebook on the embedded default model
# (results go to scores/, token_sets/, full_compute/, graphs/; executed copies to runs/).
# Extra arguments go to the runner, e.g.: bash scripts/main.sh --models smollm2-135m gemma3-270m
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/setup_env.sh | tail -n 1)
exec "$PYBIN" -m lib.runner "$@"
