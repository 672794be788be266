"""GPU readiness: what the model path sends to the device, and reduced precision against fp32.

    python -m bench.gpu_readiness [--device auto|cpu|cuda] [--images 64] [--rounds 5]

Checks, on whatever device runs it (this machine has no GPU; `--device cuda` runs the same on one):
- pixels stay uint8 until the device: every batch reaching `normalize_on_device` is uint8, a
  quarter of the bytes a float32 batch would copy;
- on cuda the host batch is pinned and copied non-blocking (recorded from the copy itself);
- fp16 and bf16 under autocast: images/s against fp32 (the baseline; the precisions are timed in
  turn, the best of the rounds counts, so drift and each first batch's set-up hit none of them
  alone) and the smallest cosine similarity of their vectors to fp32's (tolerance: >= 0.99).
Writes bench/results/gpu_readiness.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import model_handlers.backend as backend_module
from bench.common import write_result
from model_handlers.backends import image_preprocess, load_backend
from model_handlers.config import DEFAULT_MODEL, ModelConfig

TOLERANCE = 0.99


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per precision, taken in turn; the best counts")
    args = parser.parse_args(argv)

    seen = []
    original = backend_module.normalize_on_device
    original_pin = torch.Tensor.pin_memory

    def recording(pixels, spec, device, dtype=torch.float32):
        seen.append({"dtype": str(pixels.dtype), "bytes": pixels.numel() * pixels.element_size(),
                     "float32_bytes": pixels.numel() * 4, "device": device.type})
        return original(pixels, spec, device, dtype)

    def recording_pin(tensor, *a, **kw):
        seen[-1]["pinned"] = True
        return original_pin(tensor, *a, **kw)

    backend_module.normalize_on_device = recording
    torch.Tensor.pin_memory = recording_pin
    try:
        rows = {}
        size = image_preprocess(args.model).crop_size
        images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
        # Loaded per precision, as a job loads it (on the CPU, fp32 runs a frozen graph).
        backends = {precision: load_backend(ModelConfig(spec=args.model, device=args.device, precision=precision))
                    for precision in ("fp32", "bf16", "fp16")}
        best = dict.fromkeys(backends, float("inf"))
        vectors = {}
        for backend in backends.values():
            backend.encode_images(images)  # warm-up at the timed size: oneDNN sets up per batch size
        for _ in range(args.rounds):  # in turn, so the machine's drift hits every precision alike
            for precision, backend in backends.items():
                started = time.perf_counter()
                vectors[precision] = backend.encode_images(images)
                best[precision] = min(best[precision], time.perf_counter() - started)
        reference = vectors["fp32"]
        for precision, own in vectors.items():
            cosine = (own * reference).sum(axis=1)
            rows[precision] = {"images_per_s": round(args.images / best[precision], 1),
                               "min_cosine_to_fp32": round(float(cosine.min()), 5),
                               "max_abs_diff_to_fp32": round(float(np.abs(own - reference).max()), 5)}
    finally:
        backend_module.normalize_on_device = original
        torch.Tensor.pin_memory = original_pin
    device = backends["fp32"].device.type
    uint8 = all(s["dtype"] == "torch.uint8" for s in seen)
    pinned = all(s.get("pinned") for s in seen) if device == "cuda" else None
    within = all(r["min_cosine_to_fp32"] >= TOLERANCE for r in rows.values())
    print(f"device {device}, model {args.model}, {args.images} images of {size}x{size}")
    print(f"uint8 until the device: {uint8} ({seen[0]['bytes']:,} bytes per batch instead of "
          f"{seen[0]['float32_bytes']:,}); pinned + non-blocking copy: "
          f"{'n/a on cpu' if pinned is None else pinned}")
    for precision, row in rows.items():
        print(f"{precision}: {row['images_per_s']} images/s, min cosine to fp32 {row['min_cosine_to_fp32']}, "
              f"max |diff| {row['max_abs_diff_to_fp32']}")
    holds = uint8 and within and pinned is not False
    write_result("gpu_readiness", {
        "device": device, "model": args.model, "images": args.images,
        "uint8_until_device": uint8, "pinned_non_blocking": pinned if pinned is not None else "n/a on cpu",
        "bytes_per_batch": seen[0]["bytes"], "float32_bytes_per_batch": seen[0]["float32_bytes"],
        "figure": {p: r for p, r in rows.items() if p != "fp32"},
        "baseline": {"fp32": rows["fp32"]},
        "ratio": {p: round(rows[p]["images_per_s"] / rows["fp32"]["images_per_s"], 2) for p in ("bf16", "fp16")},
        "target": f"uint8 until the device; fp16/bf16 vectors within cosine {TOLERANCE} of fp32",
        "holds": holds,
        "precisions": rows,
    })
    return rows


if __name__ == "__main__":
    main()
