#!/usr/bin/env bash
# First run on a fresh machine: create .venv with the CPU build of torch and this project, then run the demo.
# Extra arguments go to the demo, e.g.  bash scripts/quickstart.sh --visual-pruning longtail --kv-pruning h2o
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # CPU build; on a GPU machine install your CUDA torch first
  .venv/bin/python -m pip install -q -e ".[dev]"
fi
exec .venv/bin/python -m llava.demo "$@"
