#!/usr/bin/env bash
# Worker entrypoint: fail fast when a GPU worker has no usable GPU (a missing driver would
# otherwise surface as a slow CPU pipeline or a CUDA error hours later), then boot Beam's harness.
set -euo pipefail
if [[ "${EMBED_REQUIRE_GPU:-1}" == "1" ]]; then
  python /opt/embed/deploy/gpu_check.py
fi
exec /opt/apache/beam/boot "$@"
