"""evaluation.run end to end on a small slice: real photos, the real decoder and model path, both
embeddings scored, the head saved as a versioned projection artifact, the results written, the cache used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import run as evaluation_run
from evaluation.charts import METRICS
from evaluation.photo_retrieval import embed_split
from model_handlers.projection import load_projection
from tests.conftest import TINY_CLIP


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval")
    argv = ["--model", TINY_CLIP, "--limit", "60", "--train_limit", "120", "--cache_dir", str(tmp_path / "cache"),
            "--head_dir", str(tmp_path / "heads"), "--results_dir", str(tmp_path / "results")]
    return tmp_path, argv, evaluation_run.main(argv)[TINY_CLIP]


def test_small_evaluation_writes_pretrained_and_top_tuned_metrics(evaluated):
    tmp_path, _, results = evaluated
    for variant in ("pretrained", "top_tuned"):
        assert set(METRICS) <= set(results[variant])
        assert all(0.0 <= results[variant][m] <= 1.0 for m in METRICS)
        assert set(results["hnsw"][variant]) == set(results[variant])
    written = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert written[TINY_CLIP]["queries"] == 60 and (tmp_path / "results" / "quality.png").exists()
    table = (tmp_path / "results" / "quality.md").read_text()
    assert "| open_clip:tiny-clip-test | image → image | top_tuned |" in table


def test_the_head_is_a_versioned_projection_artifact(evaluated):
    _, _, results = evaluated
    head = load_projection(results["head"])
    assert head.model == TINY_CLIP and head.version == 1 and head.dim_in == 64
    assert results["tuned_model_id"] == head.model_id != TINY_CLIP
    assert head.model_id.startswith(f"{TINY_CLIP}+proj:fashion-mnist-v1@")


def test_shared_space_backends_get_text_to_image_retrieval(evaluated):
    tmp_path, _, results = evaluated
    for variant in ("pretrained", "top_tuned"):
        assert all(0.0 <= results["text_to_image"][variant][m] <= 1.0 for m in METRICS)
    assert "| text → image | pretrained |" in (tmp_path / "results" / "quality.md").read_text()


def test_a_rerun_reads_the_cache_and_a_given_projection_is_scored_not_retrained(evaluated):
    tmp_path, argv, results = evaluated
    assert len(list((tmp_path / "cache").iterdir())) == 2
    again = evaluation_run.main(argv + ["--projection", results["head"]])[TINY_CLIP]
    assert again["train"] == 0 and again["head"] == results["head"]
    assert again["pretrained"] == results["pretrained"] and again["top_tuned"] == results["top_tuned"]


def test_a_projection_trained_on_another_model_is_refused(evaluated, tmp_path):
    _, _, results = evaluated
    with pytest.raises(SystemExit, match="trained on open_clip:tiny-clip-test"):
        evaluation_run.main(["--limit", "10", "--cache_dir", str(tmp_path), "--results_dir", str(tmp_path),
                             "--projection", results["head"]])


def test_index_dir_without_judgements_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        evaluation_run.main(["--index_dir", str(tmp_path)])


def test_reduced_precision_is_embedded_under_autocast_and_reported_as_its_own_row(evaluated):
    tmp_path, argv, fp32 = evaluated
    bf16 = evaluation_run.main(argv + ["--precision", "bf16"])[f"{TINY_CLIP} @bf16"]
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert bf16["head"] != fp32["head"] and "-bf16-" in bf16["head"]
    written = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert {TINY_CLIP, f"{TINY_CLIP} @bf16"} <= set(written)
    # Its own cached embeddings: close to fp32's, but not fp32's.
    cache = tmp_path / "cache"
    full, _ = embed_split(TINY_CLIP, "t10k", 60, cache)
    reduced, _ = embed_split(TINY_CLIP, "t10k", 60, cache, precision="bf16")
    cosines = (full * reduced).sum(axis=1) / np.linalg.norm(full, axis=1) / np.linalg.norm(reduced, axis=1)
    assert not np.array_equal(full, reduced) and cosines.min() > 0.98
