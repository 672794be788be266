"""Fail-fast GPU check run before Beam's SDK harness starts on a worker.

Exits non-zero with a message naming the likely cause when torch sees no CUDA device, when a
tiny CUDA computation fails, or when faiss was built without GPU support. Set
EMBED_REQUIRE_GPU=0 to run the image on CPU workers.
"""

from __future__ import annotations

import sys


def check() -> list[str]:
    problems = []
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the image always has torch
        return [f"torch is not importable: {e}"]
    if not torch.cuda.is_available():
        problems.append(
            "torch sees no CUDA device: is worker_accelerator set with install-nvidia-driver in "
            "--dataflow_service_options, and does the region have quota for that GPU type?")
    else:
        try:
            x = torch.ones(64, 64, device="cuda")
            torch.cuda.synchronize()
            if float((x @ x).sum()) != 64.0 ** 3:
                problems.append("a CUDA matmul returned a wrong result")
        except RuntimeError as e:
            problems.append(f"CUDA does not work: {e} (driver and CUDA 12 runtime mismatch?)")
    try:
        import faiss

        if faiss.get_num_gpus() < 1:
            problems.append("faiss sees no GPU (is faiss-cpu installed instead of faiss-gpu?)")
    except ImportError:
        pass  # the embed pipeline does not need faiss
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(f"GPU check failed: {problem}", file=sys.stderr)
    if not problems:
        print("GPU check passed", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
