"""evaluation.run end to end on a small slice: real photos, the real decoder and model path, both
embeddings scored, the head saved as a versioned artifact, the results written, the cache used."""

from __future__ import annotations

import json

import torch

from evaluation import run as evaluation_run
from tests.conftest import TINY_CLIP


def test_small_evaluation_writes_pretrained_and_top_tuned_metrics(tmp_path):
    argv = ["--model", TINY_CLIP, "--limit", "60", "--train_limit", "120", "--cache_dir", str(tmp_path / "cache"),
            "--head_dir", str(tmp_path / "heads"), "--results_dir", str(tmp_path / "results")]
    results = evaluation_run.main(argv)[TINY_CLIP]
    for variant in ("pretrained", "top_tuned"):
        assert set(evaluation_run.METRICS) <= set(results[variant])
        assert all(0.0 <= results[variant][m] <= 1.0 for m in evaluation_run.METRICS)
        assert set(results["hnsw"][variant]) == set(results[variant])
    written = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert written[TINY_CLIP]["queries"] == 60 and (tmp_path / "results" / "quality.png").exists()
    assert "| open_clip:tiny-clip-test | top_tuned |" in (tmp_path / "results" / "quality.md").read_text()
    head = torch.load(results["head"])
    assert head["version"] == 1 and head["model"] == TINY_CLIP and head["dim_in"] == 64
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2
    assert evaluation_run.main(argv)[TINY_CLIP]["pretrained"] == results["pretrained"]  # from the cache
