"""What every benchmark shares: photo-like test images, percentiles, and writing results."""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def photo_jpeg(size: tuple[int, int], seed: int = 0, quality: int = 90, noise: float = 2.0) -> bytes:
    """A JPEG with photo-like content: smooth shading plus per-pixel noise of `noise` levels.

    Studio product photos are clean (noise ~2); `noise=10` stands in for grainy phone photos,
    whose entropy makes Huffman decoding, which no reduced-scale decoding can skip, dominate.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        image[..., channel] = 127 + 90 * np.sin(x / w * fx * 6.28 + phase) * np.cos(y / h * fy * 6.28)
    image += rng.normal(0, noise, image.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def percentiles(values, *qs) -> list[float]:
    return [round(float(np.percentile(values, q)), 3) for q in qs]


def write_result(name: str, result: dict, directory: Path = RESULTS) -> Path:
    """bench/results/NAME.json (or in `directory`): the figure, its baseline, the ratio, the target and
    whether it holds."""
    result = {"name": name, "machine": f"{platform.machine()}, {platform.python_version()}", **result}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
