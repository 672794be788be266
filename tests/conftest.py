"""Shared fixtures: a recording image server on loopback, test images, loaded backends, the
emulators, and the search service's colour index."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from localstack.image_server import ImageServer, Route
from media.decode import decode_image
from media.download import FetchConfig
from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig
from schemas import ProductEvent
from search.fields import parse_filterable
from search.query.embedder import QueryEmbedder
from search.sharded import ShardedIndex, shard_of
from search.store import StoreSettings
from transforms.records import embedding_record

TINY_CLIP = "open_clip:tiny-clip-test"
DIM = 64  # tiny CLIP's vectors

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


# The search service's test index: 24 products in three colours, embedded by tiny CLIP.
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200)}


def solid_jpeg(rgb) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), rgb).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def query_embedder():
    """Tiny CLIP query embedder that may fetch images from loopback."""
    return QueryEmbedder(TINY_CLIP, DIM, device="cpu", fetch=FetchConfig(allow_private_hosts=True))


@pytest.fixture
def colour_index(tmp_path, image_server, query_embedder):
    """A small index of products embedded by the real backend, images on the image server."""
    index_dir = tmp_path / "index"
    ShardedIndex.ensure_layout(index_dir, 2, TINY_CLIP, DIM,
                               StoreSettings(filterable=parse_filterable("colour,price:float,in_stock:bool")))
    writer = ShardedIndex.open(index_dir, read_only=False)
    records = []
    for n in range(24):
        colour = list(COLOURS)[n % 3]
        image_server.routes[f"/{n}.jpg"] = Route(body=solid_jpeg(COLOURS[colour]), headers={"Content-Type": "image/jpeg"})
        event = ProductEvent(f"e{n}", f"p{n}", "upsert", 1, shop_id=f"shop-{n % 2}", title=f"{colour} shirt {n}",
                             image_urls=(image_server.url(f"{n}.jpg"),),
                             attributes={"colour": colour, "price": float(n), "in_stock": n % 4 != 0})
        pixels = decode_image(solid_jpeg(COLOURS[colour]), query_embedder.backend.preprocess)
        vectors = query_embedder.backend.embed_products([([pixels], event.text)])[0]
        records.append(embedding_record(event, vectors, TINY_CLIP, event.image_urls[0]))
    for n, shard in enumerate(writer.shards):
        shard.apply([r for r in records if shard_of(r.product_id, 2) == n])
    return index_dir, writer, records
