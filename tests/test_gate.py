"""The rollout's quality gate, run as a user runs it: `python -m evaluation.gate`, on indexes of real weights."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation.gate import compare
from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig
from model_handlers.projection import build_head, save_projection
from search import aliases
from tests.support.catalogue_index import build_catalogue_index
from tests.test_cli import cli

PRODUCTS = 90


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Serving: the packaged model (real weights) over the demo catalogue; candidates: the same model again
    (equal), and the model behind a head of random weights with a narrow middle layer (worse for photos)."""
    root = tmp_path_factory.mktemp("gate")
    config = ModelConfig(device="cpu")
    image_dim = load_backend(config).image_dim
    torch.manual_seed(0)
    head = root / "random-head.pt"
    save_projection(head, build_head([image_dim, 64, image_dim]), model=config.spec, name="random", version=1,
                    trained_on="nothing: random weights")
    for name, candidate in (("v1", config), ("v1-again", config),
                            ("random-head", ModelConfig(device="cpu", projection=str(head)))):
        build_catalogue_index(root / name, candidate, PRODUCTS, root / "photos")
    aliases.set_alias(str(root), "live", "v1")
    return root


def gate(root, candidate, *extra):
    return cli("evaluation.gate", "--root", str(root), "--candidate", candidate, "--photos", "fashion-mnist",
               "--photo_queries", "120", "--recall_queries", "50", "--device", "cpu", *extra, timeout=600)


def test_the_gate_refuses_a_head_of_random_weights(root, tmp_path):
    result = gate(root, "random-head", "--output", str(tmp_path / "gate.json"))
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert rows["photo precision@10"].rstrip(" |").endswith("WORSE")
    assert "random-head is WORSE than v1: not rolled out" in result.stdout
    figures = json.loads((tmp_path / "gate.json").read_text())
    assert figures["passed"] is False
    drop = figures["figures"]["v1"]["photo precision@10"] - figures["figures"]["random-head"]["photo precision@10"]
    assert drop > 0.05


def test_the_gate_passes_an_equal_candidate_with_judged_queries(root):
    result = gate(root, "v1-again", "--qrels", "evaluation/judged/demo.jsonl")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "gate: v1-again passes" in result.stdout
    assert "| nDCG@10 (vector) |" in result.stdout and "| nDCG@10 (hybrid) |" in result.stdout
    assert "WORSE" not in result.stdout


def test_the_gate_names_what_it_cannot_compare(root):
    missing = gate(root, "v9")
    assert missing.returncode == 2 and "no index 'v9'" in missing.stderr
    no_alias = gate(root, "v1", "--alias", "staging")
    assert no_alias.returncode == 2 and "no alias 'staging'" in no_alias.stderr


def test_coverage_and_tolerance():
    serving = {"live products": 1000.0, "recall@10 vs exact": 0.99, "photo precision@10": 0.55}
    assert all(ok for *_, ok in compare(serving, {**serving, "photo precision@10": 0.535}, 0.02))
    rows = {name: ok for name, _, _, ok in compare(serving, {**serving, "live products": 980.0,
                                                             "photo precision@10": 0.52}, 0.02)}
    assert rows == {"live products": False, "recall@10 vs exact": True, "photo precision@10": False}


def test_a_gate_that_cannot_compare_exits_2_not_1(root, tmp_path):
    """Exit 1 is the verdict "worse": unreadable input (judgements nested thousands deep) must not read as one."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"query": ' + "[" * 5000 + "]" * 5000 + "}\n")
    result = gate(root, "v1-again", "--qrels", str(deep))
    assert result.returncode == 2 and "nested too deep" in result.stderr and "Traceback" not in result.stderr
