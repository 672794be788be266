"""Fashion-MNIST (Zalando's product photos) from Debian's `dataset-fashion-mnist` package.

Real product photos that need no network: the retrieval evaluation measures on them, and the
sample catalogue (sample_catalogue.products) is built from them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "DATASET_DIR", "load_fashion_mnist"]

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load_fashion_mnist(split: str = "t10k", dataset_dir: Path = DATASET_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels uint8 N) of the `train` or `t10k` split."""
    images_path = dataset_dir / f"{split}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} is missing: install Debian's dataset-fashion-mnist (make apt-deps)")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(dataset_dir / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels
