"""Labelled search evaluation: the judgement format, and the search service's rankings scored with it."""

from __future__ import annotations

import json

import pytest

from background_server import BackgroundServer
from evaluation import run as evaluation_run
from evaluation.qrels import read_judgements
from schemas import ProductEvent
from search.server import create_app, open_service
from search.sharded import ShardedIndex
from tests.conftest import TINY_CLIP
from transforms.records import embedding_record


def write_lines(path, rows) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def test_judgements_are_read_per_query(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        {"query": "red shirt", "product_id": "p1", "label": "E"},
        {"query": "red shirt", "product_id": "p2", "label": "C"},
        "",
        {"query": "coat", "product_id": "p1", "label": "I"},
    ])
    assert read_judgements(path) == {"red shirt": {"p1": "E", "p2": "C"}, "coat": {"p1": "I"}}


@pytest.mark.parametrize("line, message", [
    ("{oops", ":1: not JSON"),
    ("[1, 2]", "expected an object"),
    (json.dumps({"product_id": "p1", "label": "E"}), "query must be"),
    (json.dumps({"query": "q", "label": "E"}), "product_id must be"),
    (json.dumps({"query": "q", "product_id": "p1", "label": "exact"}), "label 'exact' is not one of E, S, C, I"),
])
def test_a_bad_line_is_named_with_its_number(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        read_judgements(write_lines(tmp_path / "q.jsonl", [line]))


def test_contradicting_and_missing_judgements_are_refused(tmp_path):
    row = {"query": "q", "product_id": "p1", "label": "E"}
    with pytest.raises(ValueError, match=":2: .* already labelled E"):
        read_judgements(write_lines(tmp_path / "q.jsonl", [row, {**row, "label": "S"}]))
    with pytest.raises(ValueError, match="holds no judgements"):
        read_judgements(write_lines(tmp_path / "empty.jsonl", [""]))


@pytest.fixture(scope="module")
def served_index(tmp_path_factory, tiny_clip):
    index_dir = tmp_path_factory.mktemp("qrels") / "index"
    ShardedIndex.ensure_layout(index_dir, 1, TINY_CLIP, tiny_clip.embedding_dim)
    (shard,) = ShardedIndex.open(index_dir, read_only=False).shards
    titles = ["red linen shirt", "blue wool coat", "black leather boots", "white cotton dress", "green scarf"]
    records = []
    for n, title in enumerate(titles):
        event = ProductEvent(f"e{n}", f"p{n}", "upsert", 1, shop_id="s", title=title)
        records.append(embedding_record(event, tiny_clip.embed_products([((), title)])[0], TINY_CLIP, ""))
    shard.apply(records)
    return index_dir


def test_the_services_rankings_are_scored_with_graded_labels(served_index, tmp_path):
    index, embedder = open_service(str(served_index), device="cpu")
    ranked = {q: [hit.product_id for hit in index.search(embedder.text(q), k=5)] for q in ("red shirt", "coat")}
    qrels = write_lines(tmp_path / "q.jsonl", [
        {"query": "red shirt", "product_id": ranked["red shirt"][0], "label": "E"},   # first: RR 1
        {"query": "coat", "product_id": ranked["coat"][1], "label": "E"},             # second: RR 1/2
        {"query": "coat", "product_id": ranked["coat"][0], "label": "I"},
        {"query": "jacket", "product_id": "not-in-the-index", "label": "E"},         # never found: 0
    ])
    common = ["--qrels", qrels, "--k", "5", "--results_dir", str(tmp_path / "results"), "--mode", "vector"]
    served = evaluation_run.main(common + ["--index_dir", str(served_index)])
    assert served["run"]["vector"]["red shirt"] == ranked["red shirt"]
    assert served["run"]["vector"]["coat"] == ranked["coat"]
    metrics = served["metrics"]["vector"]
    assert metrics["MRR"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert metrics["mR@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["recall@5"] == pytest.approx(2 / 3, abs=1e-4)
    written = json.loads((tmp_path / "results" / "search_quality.json").read_text())[f"{served_index} (vector)"]
    assert written["queries"] == 3 and written["MRR"] == metrics["MRR"] and written["mode"] == "vector"

    # A service that is already running is scored the same way over its URL.
    with BackgroundServer(create_app(index, embedder)) as running:
        assert evaluation_run.main(common + ["--search_url", running.url])["metrics"]["vector"] == metrics

    # Every mode, one row each: keywords put the one coat first.
    every = evaluation_run.main(common[:-2] + ["--index_dir", str(served_index)])
    assert set(every["metrics"]) == {"vector", "lexical", "hybrid"} and every["metrics"]["vector"] == metrics
    assert every["run"]["lexical"]["coat"] == ["p1"] and every["run"]["hybrid"]["coat"][0] == "p1"


def test_judged_evaluation_needs_one_target_and_a_matching_index(served_index, tmp_path):
    qrels = write_lines(tmp_path / "q.jsonl", [{"query": "q", "product_id": "p1", "label": "E"}])
    with pytest.raises(SystemExit, match="exactly one of"):
        evaluation_run.main(["--qrels", qrels])
    with pytest.raises(SystemExit, match="would not be comparable"):
        evaluation_run.main(["--qrels", qrels, "--index_dir", str(served_index), "--model", "packaged:effnet-lite0+minilm"])
    with pytest.raises(SystemExit, match="no index"):
        evaluation_run.main(["--qrels", qrels, "--index_dir", str(tmp_path / "nothing")])


def test_the_shipped_judged_queries_are_what_their_rules_make(tmp_path):
    """evaluation/judged/demo.jsonl is the generator's output for make demo's catalogue, and its labels
    follow the stated rules: Exact only in the query's category with every named attribute."""
    from evaluation import judged_queries

    made = judged_queries.main(["--output", str(tmp_path / "demo.jsonl")])
    assert made.read_text() == judged_queries.DEFAULT_OUTPUT.read_text()
    judgements = read_judgements(made)
    assert len(judgements) == len(judged_queries.queries()) == 53
    assert judged_queries.judge({"category": "Dress", "brand": "Umami"}, "Dress", {"brand": "Umami"}) == "E"
    assert judged_queries.judge({"category": "Dress", "brand": "Lumen"}, "Dress", {"brand": "Umami"}) == "S"
    assert judged_queries.judge({"category": "Bag", "brand": "Umami"}, "Dress", {"brand": "Umami"}) == "C"
    assert judged_queries.judge({"category": "Coat", "brand": "Umami"}, "Dress", {}) == "I"
