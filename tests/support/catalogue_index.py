"""An index of the demo catalogue (real Fashion-MNIST photos) embedded in process, for a given model and head."""

from __future__ import annotations

import json
from pathlib import Path

from media.decode import decode_image
from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig
from search.fields import parse_filterable
from search.sharded import HEAD_FILE, ShardedIndex
from search.store import StoreSettings
from sample_catalogue.products import build_catalogue
from transforms.events import parse_event
from transforms.records import embedding_record

FILTERABLE = "brand,category,material,price:float,in_stock:bool"


def build_catalogue_index(index_dir: Path, config: ModelConfig, products: int, photos: Path, batch: int = 16) -> str:
    """Embeds the first `products` of the demo catalogue with `config` into a one-shard index (its head, if
    any, kept with it as the index pipeline keeps it); returns the model id."""
    backend = load_backend(config)
    catalogue = build_catalogue(photos, "http://127.0.0.1/", products)
    records = []
    for start in range(0, len(catalogue), batch):
        part = catalogue[start:start + batch]
        events = [parse_event(json.dumps(p.event)) for p in part]
        inputs = [([decode_image(p.image_path.read_bytes(), backend.preprocess)], e.text) for p, e in zip(part, events)]
        for event, vectors in zip(events, backend.embed_products(inputs)):
            records.append(embedding_record(event, vectors, backend.model_id, event.image_urls[0]))
    ShardedIndex.ensure_layout(index_dir, 1, backend.model_id, backend.embedding_dim,
                               StoreSettings(filterable=parse_filterable(FILTERABLE)))
    writer = ShardedIndex.open(index_dir, read_only=False)
    writer.shards[0].apply(records)
    writer.close()
    if config.projection:
        (Path(index_dir) / HEAD_FILE).write_bytes(Path(config.projection).read_bytes())
    return backend.model_id
