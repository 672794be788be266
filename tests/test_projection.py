"""Top-tuned projections: the artifact, the model id that names it, and tuned vectors end to end
(embed pipeline → index pipeline → search service), never mixed with untuned ones."""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions

from localstack.image_server import Route
from model_handlers.backends import embedding_dim, load_backend
from model_handlers.config import ModelConfig, split_model_id
from model_handlers.projection import build_head, load_projection, save_projection
from pipelines import index
from pipelines.options import EmbedJobConfig
from search.server import open_service
from search.sharded import HEAD_FILE, ShardedIndex
from tests.conftest import TINY_CLIP, image_bytes
from tests.support.embed_helpers import config as embed_config, event, run_files

TUNED_DIM = 16


def write_head(path, seed: int = 0, model: str = TINY_CLIP, layers=(64, 32, TUNED_DIM)) -> str:
    torch.manual_seed(seed)
    save_projection(path, build_head(layers), model=model, name="test-head", version=3, trained_on="nothing")
    return str(path)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> str:
    return write_head(tmp_path_factory.mktemp("heads") / "head.pt")


def test_the_artifact_round_trips_and_its_id_names_head_version_and_content(head, tmp_path):
    loaded = load_projection(head)
    assert (loaded.model, loaded.name, loaded.version, loaded.layers) == (TINY_CLIP, "test-head", 3, (64, 32, 16))
    assert loaded.model_id == ModelConfig(spec=TINY_CLIP, projection=head).model_id \
        == f"{TINY_CLIP}+proj:test-head-v3@{loaded.digest[:12]}"
    assert split_model_id(loaded.model_id) == (TINY_CLIP, f"test-head-v3@{loaded.digest[:12]}")
    assert split_model_id(TINY_CLIP) == (TINY_CLIP, "")
    other = load_projection(write_head(tmp_path / "other.pt", seed=1))
    assert other.model_id != loaded.model_id  # same name and version, other weights: another space


def test_tuned_vectors_are_unit_and_come_from_the_head(head):
    projection = load_projection(head)
    vectors = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    tuned = projection(vectors)
    assert tuned.shape == (5, TUNED_DIM)
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        raw = projection.head(torch.from_numpy(vectors)).numpy()
    np.testing.assert_allclose(tuned, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match="takes"):
        projection(vectors[:, :10])


def test_bad_artifacts_are_refused_with_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="cannot read"):
        load_projection(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not a projection artifact"):
        load_projection(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="not a projection artifact"):
        load_projection(str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="trained on packaged"):
        ModelConfig(spec=TINY_CLIP, projection=write_head(tmp_path / "packaged.pt", model="packaged:effnet-lite0+minilm",
                                                          layers=(1280, 16))).model_id


def test_a_projected_backend_serves_tuned_image_and_text_vectors(head, tiny_clip, tmp_path):
    tuned = load_backend(ModelConfig(spec=TINY_CLIP, device="cpu", projection=head))
    projection = load_projection(head)
    assert tuned.model_id == projection.model_id and tuned.embedding_dim == TUNED_DIM
    assert embedding_dim(TINY_CLIP, head) == TUNED_DIM and embedding_dim(TINY_CLIP) == 64
    pixels = np.random.default_rng(1).integers(0, 256, (3, tuned.preprocess.crop_size, tuned.preprocess.crop_size, 3), dtype=np.uint8)
    np.testing.assert_allclose(tuned.encode_images(pixels), projection(tiny_clip.encode_images(pixels)), atol=1e-5)
    # One space for images and text: text goes through the same head.
    np.testing.assert_allclose(tuned.encode_texts(["red shirt"]), projection(tiny_clip.encode_texts(["red shirt"])),
                               atol=1e-5)
    wide = write_head(tmp_path / "wide.pt", layers=(128, TUNED_DIM))
    with pytest.raises(ValueError, match="takes 128-d"):
        load_backend(ModelConfig(spec=TINY_CLIP, device="cpu", projection=wide))


def test_the_embed_pipeline_checks_the_head_at_launch(head, tmp_path):
    base = ["--input_file", "in.jsonl", "--output_dir", "out", "--model", TINY_CLIP]
    job = EmbedJobConfig.from_options(PipelineOptions(base + ["--projection", head]), preflight=False)
    assert job.model.model_id == load_projection(head).model_id
    with pytest.raises(SystemExit, match="cannot read projection"):
        EmbedJobConfig.from_options(PipelineOptions(base + ["--projection", str(tmp_path / "missing.pt")]),
                                    preflight=False)
    with pytest.raises(SystemExit, match="trained on open_clip:tiny-clip-test"):
        EmbedJobConfig.from_options(PipelineOptions(["--input_file", "in.jsonl", "--output_dir", "out",
                                                     "--projection", head]), preflight=False)


def test_tuned_records_get_their_own_model_id_and_the_index_never_mixes_them(head, tmp_path, image_server):
    image_server.routes["/a.jpg"] = Route(body=image_bytes("JPEG", seed=1), headers={"Content-Type": "image/jpeg"})
    lines = [event(1, title="Linen shirt", image_urls=[image_server.url("a.jpg")]), event(2, title="Wool coat"),
             json.dumps({"event_id": "e3", "product_id": "p3", "op": "delete", "version": 9}).encode()]
    untuned_job = embed_config(tmp_path / "untuned")
    tuned_job = embed_config(tmp_path / "tuned")
    tuned_job = dataclasses.replace(tuned_job, model=dataclasses.replace(tuned_job.model, projection=head))
    (tmp_path / "untuned").mkdir()
    (tmp_path / "tuned").mkdir()
    untuned, _ = run_files(tmp_path / "untuned", lines, untuned_job)
    tuned, letters = run_files(tmp_path / "tuned", lines, tuned_job)
    tuned_id = load_projection(head).model_id
    assert not letters and len(tuned) == len(untuned) == 3
    assert {r["model"] for r in untuned} == {TINY_CLIP} and {r["model"] for r in tuned} == {tuned_id}
    for record in tuned:
        if record["op"] == "upsert":
            assert len(record["embedding"]) == len(record["image_embedding"] or [0] * TUNED_DIM) == TUNED_DIM
            assert abs(np.linalg.norm(record["embedding"]) - 1) < 1e-5

    # Both kinds of record arrive at an index of untuned vectors: only the untuned ones go in.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "part-0.jsonl").write_text("".join(open(p).read() for p in
                                                glob.glob(str(tmp_path / "*" / "out" / "embeddings" / "*.jsonl"))))
    index.run(["--input_dir", str(mixed), "--index_dir", str(tmp_path / "plain-index"), "--model", TINY_CLIP,
               "--dead_letter_dir", str(tmp_path / "dead")])
    letters = [json.loads(line) for p in glob.glob(str(tmp_path / "dead" / "*")) for line in open(p)]
    assert sorted(d["product_id"] for d in letters) == ["p1", "p2", "p3"]
    assert {d["stage"] for d in letters} == {"sink"} and all(tuned_id in d["error"] for d in letters)
    assert set(ShardedIndex.open(tmp_path / "plain-index").shards[0].live_products()) == {"p1", "p2"}

    # With the head, the index pipeline builds a tuned index and keeps the head with it: a service loads
    # it from there; without it (nor --projection) the service refuses to start.
    index.run(["--input_dir", str(tmp_path / "tuned" / "out" / "embeddings"), "--index_dir",
               str(tmp_path / "tuned-index"), "--model", TINY_CLIP, "--projection", head])
    tuned_index = ShardedIndex.open(tmp_path / "tuned-index")
    assert (tuned_index.model, tuned_index.dim) == (tuned_id, TUNED_DIM)
    kept = tmp_path / "tuned-index" / HEAD_FILE
    assert kept.read_bytes() == Path(head).read_bytes()
    _, follows = open_service(str(tmp_path / "tuned-index"), device="cpu")
    assert follows.backend.model_id == tuned_id
    kept.unlink()
    with pytest.raises(ValueError, match="pass that --projection"):
        open_service(str(tmp_path / "tuned-index"), device="cpu")
    with pytest.raises(ValueError, match="would not be comparable"):
        open_service(str(tmp_path / "plain-index"), projection=head, device="cpu")
    served, embedder = open_service(str(tmp_path / "tuned-index"), projection=head, device="cpu")
    hits = served.search(embedder.text("Linen shirt"), k=2)
    assert {hit.product_id for hit in hits} == {"p1", "p2"}
