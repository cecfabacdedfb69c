#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine lent briefly, with no internet and no diffusers: correctness of the
# CUDA paths (pytest -m cuda), then speed and memory (benchmarks/bench_step.py), each part within a time budget, all
# within 8 minutes. Writes OUT_DIR/gpu_check.json, gpu_check.md and gpu_check.log (default OUT_DIR: out/gpu_check).
# Exits 1 only where something is wrong (a part failed, or preflight or tests did not finish); a measurement cut by its
# budget is reported as overrun, with what it had measured. Without CUDA, or with --dry-run, the same parts run on the
# CPU with tiny shapes in under 8 minutes: 2-3 with an empty compile cache, as on a fresh clone, and 2 with a warm
# one (tests/test_gpu_check.py runs it, with an empty cache). Details: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_wheels.sh                                         # here, with PyPI: fills .whl/
#   bash benchmarks/gpu_check.sh [--dry-run] [--budget PART=SECONDS] [--compile-cache DIR] [OUT_DIR]   # there
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_START=$(date +%s.%N)  # the budgets count from here: the wheel install is part of the 8 minutes
# Here the project's venv; on the GPU machine (a copy of the working tree, no .venv) python3, which holds its torch.
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

site=""
trap '[ -z "$site" ] || rm -rf "$site"' EXIT  # the installed wheels are for this run only
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
  # Only what the machine lacks or has older: its own newer packages, and its CUDA torch, stay as they are.
  needed=$("$PY" benchmarks/gpu_check.py --wheels-needed "${wheels[@]}")
  if [ -n "$needed" ]; then
    # Outside OUT_DIR: on a lent machine whatever is under OUT comes back, and only the results should.
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    names=$(for wheel in $needed; do printf '%s ' "${wheel##*/}"; done)
    echo "[gpu_check] installing ${names}into $site"
    # shellcheck disable=SC2086  # one path per word; wheel file names have no spaces
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" $needed
    # Ahead of the machine's site-packages, for this command and its children only.
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_WHEELS="$names"
  fi
fi
"$PY" benchmarks/gpu_check.py "$@"
