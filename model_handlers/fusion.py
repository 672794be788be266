"""One vector per product from its image and text vectors (docs/ARCHITECTURE.md §8).

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


def fuse(image_vectors: np.ndarray, text_vectors: np.ndarray, *, shared_space: bool,
         image_weight: float = 0.5) -> np.ndarray:
    """Rows of products → unit product vectors, one per row, in a few array operations.

    Row i of `image_vectors` is product i's image tower vector (the mean of its images' vectors),
    of `text_vectors` its text vector; a part the product lacks is a row of zeros. Raises
    ValueError when a row has neither.
    """
    if not 0.0 < image_weight < 1.0:
        raise ValueError("image_weight must be strictly between 0 and 1")
    has_image, has_text = image_vectors.any(axis=1), text_vectors.any(axis=1)
    if not (has_image | has_text).all():
        raise ValueError("a product needs an image or a text vector to be embedded")
    # A zero row stays zero through l2_normalize, so a missing part drops out of either form.
    image = l2_normalize(image_vectors) * image_weight
    text = l2_normalize(text_vectors) * (1.0 - image_weight)
    fused = image + text if shared_space else np.concatenate([image, text], axis=1)
    return l2_normalize(fused).astype(np.float32)
