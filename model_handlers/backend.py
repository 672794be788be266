"""The embedding backend contract: pixels and text in, unit vectors out, on one device.

A backend owns the model weights, its device and precision, and the space its vectors
live in. Products (`embed_products`) and queries (`embed_query`) go through the same
fusion, so a query always lands in the space of the index it searches.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch

from model_handlers.fusion import fuse, l2_normalize
from model_handlers.config import model_id
from model_handlers.preprocess import ImagePreprocess
from model_handlers.projection import Projection

__all__ = ["EmbeddingBackend", "ProductVectors", "normalize_on_device", "resolve_device"]

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device on this worker")
    return torch.device(device)


def normalize_on_device(pixels: torch.Tensor, spec: ImagePreprocess, device: torch.device, dtype=torch.float32):
    """uint8 NHWC on the host → normalised float NCHW on `device` (a channels-last view).

    The copy is made from pinned memory and non-blocking when the device is a GPU, so the
    transfer overlaps with the previous batch's compute. `(x/255 - mean)/std` is one
    multiply-add, `x * scale + shift`, in place on the float pixels, with the per-channel
    constants laid out along a whole row of pixels, so the kernel runs over rows of W×3
    contiguous values; broadcasting them per channel over NCHW runs 3 values at a time and took
    7-10x as long on the CPU.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    scale, shift = _row_affine(spec, pixels.shape[2], device, dtype)
    x = pixels.to(dtype)
    torch.addcmul(shift, x, scale, out=x)
    return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=32)
def _row_affine(spec: ImagePreprocess, width: int, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (width, 3): `x * scale + shift == (x/255 - mean)/std` for one row."""
    mean = torch.tensor(spec.mean, dtype=torch.float64)
    std = torch.tensor(spec.std, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return (scale.repeat(width).view(width, 3).to(device, dtype), shift.repeat(width).view(width, 3).to(device, dtype))


@dataclasses.dataclass(frozen=True)
class ProductVectors:
    """What the model produced for one product; `embedding` is the fused index vector."""

    embedding: np.ndarray
    image_embedding: np.ndarray
    text_embedding: np.ndarray
    image_count: int


class EmbeddingBackend(abc.ABC):
    """Subclasses set the attributes below in `__init__` and implement the two feature hooks."""

    spec: str  # the model spec it runs; `model_id` adds the head's tag when one is applied
    preprocess: ImagePreprocess
    image_dim: int
    text_dim: int
    shared_space: bool
    projection: Projection | None = None

    def __init__(self, device: str = "auto", precision: str = "fp32", image_batch_size: int = 64,
                 image_weight: float = 0.5):
        self.device = resolve_device(device)
        self.precision = precision
        self.image_batch_size = image_batch_size
        self.image_weight = image_weight

    @property
    def embedding_dim(self) -> int:
        return self.image_dim if self.shared_space else self.image_dim + self.text_dim

    @property
    def model_id(self) -> str:
        """What its vectors are labelled with (docs/ARCHITECTURE.md §8)."""
        return model_id(self.spec, self.projection.tag if self.projection is not None else "")

    def project(self, projection: Projection) -> "EmbeddingBackend":
        """Serve tuned vectors: image vectors (and text ones in a shared space) go through the head."""
        projection.check_model(self.spec)
        if projection.dim_in != self.image_dim:
            raise ValueError(f"projection {projection.name} takes {projection.dim_in}-d vectors, "
                             f"{self.spec} makes {self.image_dim}-d")
        self.projection = projection
        self.image_dim = projection.dim_out
        if self.shared_space:
            self.text_dim = projection.dim_out
        return self

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        return self.projection(vectors) if self.projection is not None else vectors

    @abc.abstractmethod
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW on the device → (N, image_dim) features."""

    @abc.abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Texts → (N, text_dim) features; truncation is the tokenizer's own."""

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → unit (N, image_dim) float32, in chunks of `image_batch_size`, projected."""
        if len(pixels) == 0:
            return np.zeros((0, self.image_dim), np.float32)
        out = []
        for start in range(0, len(pixels), self.image_batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + self.image_batch_size]))
            with torch.inference_mode(), self._autocast():
                x = normalize_on_device(chunk, self.preprocess, self.device)
                features = self._image_features(x)
            out.append(features.float().cpu().numpy())
        return self._project(l2_normalize(np.concatenate(out)))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → unit (N, text_dim) float32."""
        if not texts:
            return np.zeros((0, self.text_dim), np.float32)
        with torch.inference_mode(), self._autocast():
            features = self._text_features(list(texts))
        vectors = l2_normalize(features.float().cpu().numpy())
        return self._project(vectors) if self.shared_space else vectors

    def embed_products(self, products: Sequence[tuple[Sequence[np.ndarray], str]]) -> list[ProductVectors]:
        """Each product is (uint8 images, text); all images and texts of the batch share forward
        passes, and the batch is fused as arrays, not product by product."""
        counts = np.array([len(product_images) for product_images, _ in products])
        has_image = counts > 0
        has_text = np.array([bool(text) for _, text in products])
        image_means = np.zeros((len(products), self.image_dim), np.float32)
        if has_image.any():
            vectors = self.encode_images(np.stack([image for product_images, _ in products for image in product_images]))
            # Each product's images are consecutive rows: sum them per product, then average.
            sums = np.add.reduceat(vectors, (np.cumsum(counts) - counts)[has_image], axis=0)
            image_means[has_image] = l2_normalize(sums / counts[has_image, None])
        text_vectors = np.zeros((len(products), self.text_dim), np.float32)
        if has_text.any():
            text_vectors[has_text] = self.encode_texts([text for _, text in products if text])
        fused = fuse(image_means, text_vectors, shared_space=self.shared_space, image_weight=self.image_weight)
        empty = np.zeros(0, np.float32)
        return [ProductVectors(embedding=fused[i],
                               image_embedding=image_means[i] if has_image[i] else empty,
                               text_embedding=text_vectors[i] if has_text[i] else empty,
                               image_count=int(counts[i]))
                for i in range(len(products))]

    def embed_query(self, text: str | None = None, image: np.ndarray | None = None) -> np.ndarray:
        """A text or image query as a vector of the index space."""
        if not text and image is None:
            raise ValueError("a query needs text or an image")
        images = [image] if image is not None else []
        return self.embed_products([(images, text or "")])[0].embedding
