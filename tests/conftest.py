"""Shared fixtures: a recording image server on loopback, test images, and loaded backends."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from localstack.image_server import ImageServer
from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig

TINY_CLIP = "open_clip:tiny-clip-test"

logging.getLogger("apache_beam").setLevel(logging.WARNING)


def image_bytes(fmt: str = "JPEG", size=(320, 240), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A photo-like test image: smooth gradients plus noise, so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.fixture
def image_server():
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_clip():
    return load_backend(ModelConfig(spec=TINY_CLIP, device="cpu"))


@pytest.fixture(scope="session")
def packaged_backend():
    return load_backend(ModelConfig(device="cpu"))


# Emulators: started once per session on free loopback ports, stopped at the end.
@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    from localstack.pubsub_emulator import PubSubEmulator

    with PubSubEmulator(log_dir=tmp_path_factory.mktemp("pubsub")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory):
    from localstack.bigquery_emulator import BigQueryEmulator

    with BigQueryEmulator(log_dir=tmp_path_factory.mktemp("bigquery")) as emulator:
        yield emulator


@pytest.fixture
def unique_name(request):
    """A name no other test uses: topics, subscriptions and datasets are never shared."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return lambda kind: f"{kind}-{stem}-{uuid.uuid4().hex[:8]}"
