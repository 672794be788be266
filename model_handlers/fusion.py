"""One vector per product from its image and text vectors (DESIGN §7).

CLIP-like backends put images and text in one space: the product vector is the normalised
weighted sum of the image mean and the text vector. Backends with two spaces concatenate
the normalised, weighted parts; a missing part is a zero block, so a text-only product
still lives in the same space and compares by its text. Queries go through the same
function (an image query is a product with one image and no text), so a query and the
documents it searches are always in one space.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fuse", "l2_normalize"]


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def fuse(
    image_vector: np.ndarray | None,
    text_vector: np.ndarray | None,
    *,
    shared_space: bool,
    image_dim: int,
    text_dim: int,
    image_weight: float = 0.5,
) -> np.ndarray:
    """Returns the unit-length product vector; raises ValueError when there is nothing to fuse.

    `image_vector` is the product's image tower vector (the mean of its images' vectors).
    """
    has_image = image_vector is not None and len(image_vector) > 0
    has_text = text_vector is not None and len(text_vector) > 0
    if not (has_image or has_text):
        raise ValueError("a product needs an image or a text vector to be embedded")
    if not 0.0 < image_weight < 1.0:
        raise ValueError("image_weight must be strictly between 0 and 1")
    image = l2_normalize(image_vector) if has_image else None
    text = l2_normalize(text_vector) if has_text else None
    if shared_space:
        if image is not None and text is not None:
            fused = image_weight * image + (1.0 - image_weight) * text
        else:
            fused = image if image is not None else text
    else:
        image_part = image * image_weight if image is not None else np.zeros(image_dim, np.float32)
        text_part = text * (1.0 - image_weight) if text is not None else np.zeros(text_dim, np.float32)
        fused = np.concatenate([image_part, text_part])
    return l2_normalize(fused).astype(np.float32)
