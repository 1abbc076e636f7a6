#!/usr/bin/env bash
# One-shot set-up on a fresh machine: creates .venv and installs the project with torch pinned
# (constraints.txt), so no CUDA wheels are pulled on CPU machines. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# MONAI Label 0.8.5 for monailabel_app/ (the monaibundle app): its listed runtime deps minus
# torchvision (the PyPI build does not import with CPU torch), sam2 and numpymaxflow (would
# downgrade numpy), see monailabel_app/requirements.txt; then monailabel itself without deps.
.venv/bin/python -m pip install -q -c constraints.txt -r monailabel_app/requirements.txt
.venv/bin/python -m pip install -q -c constraints.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
