"""The GPU measurement script, kept from rotting: its CPU dry run, as the suite would be run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_dry_runs_on_the_cpu_and_writes_every_section(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--device", "cpu", "--quick", "--pipeline_workers", "2",
                             "--output_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": str(Path(os.sys.executable))})
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads((tmp_path / "models.json").read_text())
    measured = [row for row in models["rows"] if "images_per_s" in row]
    assert {(r["precision"], r["batch"]) for r in measured} == {("fp32", 4), ("fp32", 8), ("bf16", 4), ("bf16", 8)}
    assert all(r["images_per_s"] > 0 and r["h2d_bytes_per_image"] == 64 * 64 * 3 for r in measured)  # uint8
    (pipeline,) = json.loads((tmp_path / "pipeline.json").read_text())["rows"].values()
    assert pipeline["pipeline_images_per_s"] > 0 and pipeline["ratio"] > 0
    workers = pipeline["workers_2"]  # the same pipeline in two processes, the input split between them
    assert workers["pipeline_images_per_s"] > 0 and workers["whole_job_images_per_s"] > 0
    assert pipeline["gpu_utilisation"].startswith("n/a")
    faiss = json.loads((tmp_path / "faiss.json").read_text())
    assert faiss["ivf_cpu_vectors_per_s"] > 0 and faiss["hnsw_cpu_vectors_per_s"] > 0
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["device"] == "cpu" and suite["targets"]["vit_pipeline_ratio"]["holds"] is None
    assert "images/s" in result.stdout and "pipeline" in result.stdout  # the table


def test_asking_for_cuda_without_a_gpu_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        return  # on a GPU machine this is the real run, not a refusal
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--output_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(Path(os.sys.executable))})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "bench.gpu_suite: --device cuda, but torch sees no GPU (use --device cpu for a dry run)")
