#!/usr/bin/env bash
# The one command for a lent GPU machine: install the wheels carried in .whl/ (no network there),
# then run benchmarks/gpu_check.py within its time budget. Results go to $OUT (summary.md,
# summary.json, pytest.log, workers.log). Extra arguments go to gpu_check.py (e.g. --standin).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "note: wheel install failed; going on with what is installed"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONDONTWRITEBYTECODE=1 CI=true
exec timeout -k 5 415 python3 benchmarks/gpu_check.py "$@"
