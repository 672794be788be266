"""The gate's command line on small indexes of random vectors: what it cannot judge it says, and refuses to
pass; its flags are checked before anything is measured. (tests/test_gate.py runs it on real weights.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model_handlers.config import ModelConfig
from model_handlers.projection import build_head, save_projection
from search import aliases
from search.sharded import HEAD_FILE
from tests.conftest import DIM, TINY_CLIP
from tests.support import index_helpers
from tests.test_cli import cli

VECTOR_ONLY = "acme:custom-64"  # a team's own embedder: no backend of this product runs it


def build_index(directory: Path, model: str, dim: int = DIM, seed: int = 0) -> None:
    index_helpers.build_index(directory, model, dim, products=30, seed=seed)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """live -> v1 (vector-only model, 64-d); v2: the same model and vectors again; v3: the same model, other
    vectors for the same products; other: another vector-only model, 32-d; clip, clip-again: tiny CLIP
    (runs here); clip-head: tiny CLIP behind a head (another model id)."""
    root = tmp_path_factory.mktemp("gate-cli")
    build_index(root / "v1", VECTOR_ONLY, seed=1)
    build_index(root / "v2", VECTOR_ONLY, seed=1)
    build_index(root / "v3", VECTOR_ONLY, seed=2)
    build_index(root / "other", "acme:other-32", dim=32, seed=3)
    head = root / "head.pt"
    torch.manual_seed(0)
    save_projection(head, build_head([DIM, DIM]), model=TINY_CLIP, name="gate-cli", version=1, trained_on="test")
    build_index(root / "clip", ModelConfig(spec=TINY_CLIP).model_id, seed=4)
    build_index(root / "clip-again", ModelConfig(spec=TINY_CLIP).model_id, seed=4)
    build_index(root / "clip-head", ModelConfig(spec=TINY_CLIP, projection=str(head)).model_id, seed=6)
    shutil.copy(head, root / "clip-head" / HEAD_FILE)
    aliases.set_alias(str(root), "live", "v1")
    aliases.set_alias(str(root), "clip", "clip")
    return root


def gate(root, candidate, *extra, timeout=120):
    return cli("evaluation.gate", "--root", str(root), "--candidate", candidate, "--recall_queries", "20",
               "--device", "cpu", *extra, timeout=timeout)


def test_a_candidate_of_another_vector_only_model_and_dimension_is_not_passed(root):
    """Live products and recall say nothing about which model ranks better: no verdict, exit 2, and why."""
    result = gate(root, "other")
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert "passes" not in result.stdout and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "cannot judge other: it holds vectors of another model" in message
    assert "(acme:other-32, 32-d, against acme:custom-64, 64-d)" in message and "vector-only" in message
    # Asking for quality measures the indexes' models cannot answer is refused too, before measuring.
    for flags in (["--qrels", "evaluation/judged/demo.jsonl"], ["--photos", "fashion-mnist"]):
        asked = gate(root, "other", *flags)
        assert asked.returncode == 2 and not asked.stdout, asked.stdout + asked.stderr[-2000:]
        assert f"{flags[0]}: index v1 holds vectors of {VECTOR_ONLY}, which no backend" in asked.stderr


def test_a_candidate_of_another_model_that_runs_here_needs_a_quality_measure(root):
    result = gate(root, "clip-head", "--alias", "clip")
    assert result.returncode == 2 and "passes" not in result.stdout, result.stdout + result.stderr[-2000:]
    assert "cannot judge clip-head: it holds vectors of another model than the serving clip" in result.stderr
    assert "--qrels FILE" in result.stderr and "--photos fashion-mnist" in result.stderr


def test_judgements_that_fit_no_product_of_the_serving_index_judge_nothing(root, tmp_path):
    """nDCG would be 0 for both indexes and any candidate would pass: refused instead."""
    qrels = tmp_path / "qrels.jsonl"
    qrels.write_text('{"query": "red dress", "product_id": "not-in-the-catalogue", "label": "E"}\n')
    result = gate(root, "clip-head", "--alias", "clip", "--qrels", str(qrels))
    assert result.returncode == 2 and "passes" not in result.stdout, result.stdout + result.stderr[-2000:]
    assert "none of its 1 products judged relevant is live in the serving index clip" in result.stderr


def test_the_same_model_is_compared_and_what_was_not_measured_is_said(root, tmp_path):
    output = tmp_path / "reports" / "gates" / "v2.json"  # a directory that does not exist yet: created
    result = gate(root, "v2", "--output", str(output))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "gate: v2 passes"
    assert ("not measured: nDCG@10 and MRR of judged text queries, photo precision@10: acme:custom-64 runs on no "
            "backend of this product (a vector-only index)") in lines
    assert "note: both indexes hold acme:custom-64 vectors (64-d), which rank alike" in result.stdout
    figures = json.loads(output.read_text())
    assert figures["passed"] is True and len(figures["not_measured"]) == 1
    assert figures["figures"]["v2"]["same vectors as serving"] == 1.0
    clip = gate(root, "clip-again", "--alias", "clip")
    assert clip.returncode == 0, clip.stdout + clip.stderr[-2000:]
    assert "not measured: nDCG@10 and MRR of judged text queries (no --qrels)" in clip.stdout
    assert "not measured: photo precision@10 (no --photos)" in clip.stdout


@pytest.mark.parametrize("flag, value", [
    ("--tolerance", "nan"), ("--tolerance", "-5"), ("--tolerance", "inf"), ("--tolerance", "1"),
    ("--recall_queries", "0"), ("--recall_queries", "-3"), ("--photo_queries", "0"), ("--photo_queries", "60001"),
])
def test_numeric_flags_out_of_range_are_refused_before_the_run(root, flag, value):
    result = cli("evaluation.gate", "--root", str(root), "--candidate", "v2", flag, value, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert f"argument {flag}: must be " in result.stderr and f"got '{value}'" in result.stderr and "usage:" in result.stderr
    assert not result.stdout and "Warning" not in result.stderr and "Traceback" not in result.stderr


def test_an_output_that_cannot_be_written_is_refused_before_the_run(root, tmp_path):
    (tmp_path / "a-file").write_text("")
    for output, message in ((tmp_path, "is a directory"), (tmp_path / "a-file" / "gate.json", "is a file"),
                            ("gs://bucket/gate.json", "give a local file path")):
        result = gate(root, "v2", "--output", str(output))
        assert result.returncode == 2, result.stdout + result.stderr[-2000:]
        assert message in result.stderr and not result.stdout, result.stderr  # nothing was measured


def test_the_same_model_with_other_vectors_or_another_catalogue_does_not_pass(root, tmp_path):
    # As many live products and as good a recall: only the vectors tell v3 apart (random, not the model's).
    result = gate(root, "v3")
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "| same vectors as serving | 1.0000 | 0.0000 |" in result.stdout
    index_helpers.build_index(root / "elsewhere", VECTOR_ONLY, DIM, products=30, seed=1, prefix="q")
    other = gate(root, "elsewhere")
    assert other.returncode == 1 and "same vectors as serving" in other.stdout, other.stdout
