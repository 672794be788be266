#!/usr/bin/env bash
# Worker entrypoint: fail fast when a GPU worker has no usable GPU (a missing driver would
# otherwise surface as a slow CPU pipeline or a CUDA error hours later), then boot Beam's harness.
set -euo pipefail
if [[ "${EMBED_REQUIRE_GPU:-1}" == "1" ]]; then
  python /opt/embed/deploy/gpu_check.py
fi
# tcmalloc for every process of the harness (see model_handlers/allocator.py).
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [[ -f "$TCMALLOC" ]]; then
  export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec /opt/apache/beam/boot "$@"
