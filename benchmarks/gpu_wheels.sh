#!/usr/bin/env bash
# Fills the git-ignored .whl/ with the pure-Python wheels (Python 3.12) that the lent GPU machine lacks or has older
# than this repo was tested with; benchmarks/gpu_check.sh installs them there, since that machine has no internet.
# Run here, where PyPI is reachable, after `make .venv/.installed`: the versions are the venv's.
#
# That machine (device KINDS.md, 2026-11) has torch 2.11 (CUDA), transformers 5.17, huggingface_hub 1.33,
# accelerate 1.15, safetensors 0.8, tokenizers 0.23.2, pytest; no diffusers, no open_clip_torch.
#   diffusers        missing there.
#   transformers     theirs is older than the 5.24 the tests here ran with (its needs, hub >= 1.31 and
#                    tokenizers 0.23.x, are met there).
#   open_clip_torch  only for its CLIP BPE file, from which examples/make_tiny_pipeline.py builds the real tokenizer.
# Not huggingface_hub: their 1.33 meets diffusers' >= 1.32, and ours (2.x) would need httpx2, which they lack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT_BYTES=30000000  # 30 MB: the wheels travel with the working tree to every device call
[ -x "$PY" ] || { echo "no $PY: run 'make .venv/.installed' first (the wheels take its versions)" >&2; exit 1; }

specs=()
for package in diffusers transformers open_clip_torch; do
  specs+=("$package==$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package")")
done
rm -rf .whl  # one version of each: two of one package would stop the install there
# --implementation py --abi none --platform any: pure-Python wheels only, which install on any machine.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any -d .whl "${specs[@]}"
total=$(cat .whl/*.whl | wc -c)
for wheel in .whl/*.whl; do
  awk -v b="$(wc -c <"$wheel")" -v n="${wheel#.whl/}" 'BEGIN { printf "%8.2f MB  %s\n", b / 1e6, n }'
done
awk -v b="$total" -v l="$LIMIT_BYTES" 'BEGIN { printf "%8.2f MB  total (limit %d MB)\n", b / 1e6, l / 1e6 }'
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "the wheels are over the limit" >&2
  exit 1
fi
