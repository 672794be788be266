"""Known answer on real weights: the packaged backend groups real product photos by what they show.

A few hundred Fashion-MNIST photos go through the whole pipeline (HTTP, decode, batch,
RunInference, fuse, write); the nearest neighbour of each by `image_embedding` alone must
be of the same class for at least 60% of them (chance: 10%).
"""

import glob
import json

import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline

from localstack.image_server import ImageServer
from model_handlers.config import ModelConfig
from pipelines import embed
from pipelines.options import EmbedJobConfig
from media.download import FetchConfig
from sample_catalogue.products import build_catalogue
from transforms.images import ImageOptions


def test_nearest_neighbours_by_image_embedding_share_the_class(tmp_path):
    with ImageServer(tmp_path / "images") as server:
        products = build_catalogue(tmp_path / "images", server.url(""), 300, seed=7)
        (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(p.event) for p in products))
        job = EmbedJobConfig(
            model=ModelConfig(device="cpu"),
            images=ImageOptions(FetchConfig(allow_private_hosts=True)),
            input_file=str(tmp_path / "events.jsonl"),
            output_dir=str(tmp_path / "out"),
        )
        with TestPipeline(runner="FnApiRunner") as p:
            embed.build_pipeline(p, job)

    records = [json.loads(line) for path in glob.glob(str(tmp_path / "out/embeddings/*")) for line in open(path)]
    assert len(records) == 300
    labels = {p.event["product_id"]: p.label for p in products}
    vectors = np.array([r["image_embedding"] for r in records], np.float32)
    classes = np.array([labels[r["product_id"]] for r in records])
    assert vectors.shape == (300, 1280)
    assert all(len(r["embedding"]) == 1664 and r["model"] == "packaged:effnet-lite0+minilm" for r in records)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    accuracy = float((classes[similarity.argmax(axis=1)] == classes).mean())
    print(f"nearest-neighbour class agreement: {accuracy:.3f}")
    assert accuracy >= 0.60
