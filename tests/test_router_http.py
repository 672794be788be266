"""The router and the servers share one HTTP layer and one merge: exact facet counts through the router,
a query embedded once whatever the number of backends, and the same probes, metrics and API document."""

from __future__ import annotations

import dataclasses
import re

import httpx
import pytest

from model_handlers.config import ModelConfig
from search.fields import parse_filterable
from search.sharded import ShardedIndex, shard_of
from search.store import StoreSettings
from tests.conftest import DIM, TINY_CLIP
from tests.support.index_helpers import build_index, record
from tests.support.server_process import ServerProcess

MODEL = "acme:custom-8"  # vector queries only: the replicas start without loading a model


@pytest.fixture
def served(tmp_path):
    """Two replicas of one shard each, a server of both shards, and the router over the replicas."""
    processes = []

    def start(directory, *extra):
        whole = ServerProcess(directory, *extra)
        first, second = ServerProcess(directory, "--shards", "0", *extra), ServerProcess(directory, "--shards", "1",
                                                                                       *extra)
        processes.extend([whole, first, second])
        router = ServerProcess(None, "--backends", f"{first.url},{second.url}", "--timeout_secs", "20",
                               module="search.router")
        processes.append(router)
        return whole, first, second, router

    yield start
    for process in processes:
        process.stop()


def attributes(rank: int, shard: int) -> dict:
    """Per shard, 150 brands of 2 products each, then `a-rare` once: rare in each shard, so outside each
    one's top 100, but first in the total's (counted twice, and first by name among those that are);
    and every product's own sku: thousands of values."""
    out = {"sku": f"sku-{shard}-{rank:04d}", "size": rank % 7}
    if rank < 300:
        out["brand"] = f"{'ab'[shard]}{rank // 2:03d}"
    elif rank == 300:
        out["brand"] = "a-rare"
    return out


def test_facet_counts_through_the_router_equal_one_servers_whatever_the_number_of_values(tmp_path, served):
    directory = tmp_path / "index"
    ShardedIndex.ensure_layout(directory, 2, MODEL, 8, StoreSettings(filterable=parse_filterable("brand,sku,size:int")))
    writer = ShardedIndex.open(directory, read_only=False)
    per_shard: dict[int, list] = {0: [], 1: []}
    n = 0
    while min(len(v) for v in per_shard.values()) < 2801:
        pid = f"p{n}"
        n += 1
        shard = shard_of(pid, 2)
        rank = len(per_shard[shard])
        if rank >= 2801:
            continue
        per_shard[shard].append(dataclasses.replace(record(pid, 1, dim=8, model=MODEL, seed=n),
                                                    attributes=attributes(rank, shard)))
    for shard, records in per_shard.items():
        writer.shards[shard].apply(records)
    for shard in writer.shards:
        shard.close()
    whole, _first, _second, router = served(directory)
    for body in ({"vector": [1.0] + [0.0] * 7, "facets": ["brand", "size"]},
                 {"vector": [1.0] + [0.0] * 7, "facets": ["brand", "sku"], "facet_limit": 10_000},
                 {"vector": [1.0] + [0.0] * 7, "facets": ["sku"], "filter": {"brand": "a-rare"}}):
        expected = httpx.post(whole.url + "/v1/search", json=body, timeout=60).json()
        routed = httpx.post(router.url + "/v1/search", json=body, timeout=60).json()
        assert routed["facets"] == expected["facets"]
        assert [type(item["value"]) for item in routed["facets"].get("size", ())] == \
            [int] * len(expected["facets"].get("size", ()))  # 3, not 3.0 (which == 3 in Python)
        assert routed["partial"] is False
    top = httpx.post(router.url + "/v1/search", json={"vector": [1.0] + [0.0] * 7, "facets": ["brand"]},
                     timeout=60).json()["facets"]["brand"]
    assert len(top) == 100 and top[0] == {"value": "a-rare", "count": 2}
    every = httpx.post(router.url + "/v1/search", json={"vector": [1.0] + [0.0] * 7, "facets": ["sku"],
                                                       "facet_limit": 10_000}, timeout=60).json()["facets"]["sku"]
    assert len(every) == 5602 and all(item["count"] == 1 for item in every)


def embeddings(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r'^query_embeddings_total\{kind="\w+"\} (\S+)$', text, re.M))


def test_a_text_query_through_the_router_runs_the_query_model_once(tmp_path, served):
    build_index(tmp_path / "index", ModelConfig(spec=TINY_CLIP).model_id, DIM, products=60, shards=2)
    whole, first, second, router = served(tmp_path / "index", "--device", "cpu")
    before = embeddings(first.url) + embeddings(second.url)
    for text in ("a red dress", "linen shirt", "boots"):
        for mode in ("hybrid", "vector"):
            body = {"text": text, "k": 7, "mode": mode}
            routed = httpx.post(router.url + "/v1/search", json=body, timeout=60)
            expected = httpx.post(whole.url + "/v1/search", json=body, timeout=60).json()
            assert routed.status_code == 200, routed.text
            assert [h["product_id"] for h in routed.json()["results"]] == \
                [h["product_id"] for h in expected["results"]]
    keywords = httpx.post(router.url + "/v1/search", json={"text": "title", "mode": "lexical"}, timeout=60)
    assert keywords.status_code == 200 and keywords.json()["results"]
    # Six queries that need a vector, each embedded by one backend for both; keywords need none.
    assert embeddings(first.url) + embeddings(second.url) - before == 6
    # A vector of another model alone is refused; with its text, the text is embedded by the index's model.
    alone = httpx.post(first.url + "/v1/search", json={"vector": [1.0] * DIM, "vector_model": "other:m"}, timeout=30)
    assert alone.status_code == 400 and "this index holds" in alone.json()["error"]
    with_text = httpx.post(first.url + "/v1/search", json={"vector": [1.0] * DIM, "vector_model": "other:m",
                                                           "text": "a red dress"}, timeout=30)
    assert with_text.status_code == 200


def test_both_services_answer_head_probes_metrics_and_their_api_document(tmp_path, served):
    build_index(tmp_path / "index", MODEL, 8, products=20, shards=2)
    whole, _first, _second, router = served(tmp_path / "index")
    for service in (whole, router):
        for path in ("/healthz", "/livez", "/", "/metrics"):
            assert httpx.head(service.url + path, timeout=30).status_code == 200, (service.url, path)
        api = httpx.get(service.url + "/openapi.json", timeout=30).json()
        assert "/v1/search" in api["paths"] and "422" not in str(api["paths"]["/v1/search"])
        docs = httpx.get(service.url + "/docs", timeout=30).text
        scripts = re.findall(r'src="([^"]+)"', docs)
        assert scripts and all(src.startswith("/") for src in scripts), scripts  # served here, no CDN
        assert httpx.get(service.url + scripts[0], timeout=30).status_code == 200
    httpx.post(router.url + "/v1/search", json={"vector": [1.0] * 8}, timeout=30)
    metrics = httpx.get(router.url + "/metrics", timeout=30).text
    assert 'router_requests_total{outcome="ok",route="search"} 1.0' in metrics
