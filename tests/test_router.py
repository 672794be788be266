"""Search replicas that split the shards, and the router in front of them, run as users start them."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from search.fields import parse_filterable
from search.sharded import ShardedIndex, shard_of
from search.store import StoreSettings
from tests.support.index_helpers import record
from tests.support.server_process import ROOT, ServerProcess

MODEL = "acme:custom-16"  # served for vector queries only: the replicas start without loading a model
SHOPS = [None, "shop-0", "shop-1", "shop-2", "shop-3", "no-such-shop"]
BRANDS = ["acme", "zeta", "moda"]
WORDS = ["linen", "wool", "shirt", "coat", "boot"]


@pytest.fixture
def index_dir(tmp_path):
    directory = tmp_path / "index"
    ShardedIndex.ensure_layout(directory, 3, MODEL, 16, StoreSettings(filterable=parse_filterable("brand,price:float")))
    writer = ShardedIndex.open(directory, read_only=False)
    records = [dataclasses.replace(record(f"p{n}", 1, dim=16, model=MODEL, shop_id=f"shop-{n % 4}", seed=n),
                                   title=f"{WORDS[n % 5]} {WORDS[n % 7 % 5]}",
                                   attributes={"brand": BRANDS[n % 3], "price": float(n % 50)})
               for n in range(400)]
    for n, shard in enumerate(writer.shards):
        shard.apply([r for r in records if shard_of(r.product_id, 3) == n])
    writer.shards[0].compact(force=True)  # one shard searched through its graph, the others exactly
    for shard in writer.shards:
        shard.close()
    return directory


def search(url: str, body: dict) -> dict:
    response = httpx.post(url + "/v1/search", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_router_answers_as_one_server_over_all_shards_and_partially_when_a_replica_is_down(index_dir):
    whole = ServerProcess(index_dir)
    first, second = ServerProcess(index_dir, "--shards", "0,2"), ServerProcess(index_dir, "--shards", "1")
    router = ServerProcess(None, "--backends", f"{first.url},{second.url}", "--timeout_secs", "1.5",
                           module="search.router")
    try:
        assert "shards 0,2 of 3, model acme:custom-16" in first.ready_line
        assert "router over 2 backends, 3 shards" in router.ready_line
        rng = np.random.default_rng(7)
        for _ in range(200):
            vector = rng.normal(size=16)
            body = {"vector": (vector / np.linalg.norm(vector)).tolist(), "k": int(rng.integers(1, 40)),
                    "ef_search": int(rng.choice([16, 64, 256]))}
            shop = SHOPS[rng.integers(len(SHOPS))]
            if shop:
                body["shop_id"] = shop
            if rng.random() < 0.3:  # a deep page: each backend must be asked for offset + k
                body["offset"] = int(rng.integers(1, 60))
            if rng.random() < 0.3:
                body["filter"] = {"brand": BRANDS[rng.integers(3)], "price": {"lt": float(rng.integers(5, 50))}}
            if rng.random() < 0.3:
                body["facets"], body["facet_buckets"] = ["brand", "price"], {"price": [0, 10, 25, 50]}
            if rng.random() < 0.2:  # keywords need no model
                body = {**{k: v for k, v in body.items() if k != "vector"}, "text": WORDS[rng.integers(5)],
                        "mode": "lexical"}
            expected, routed = search(whole.url, body), search(router.url, body)
            assert [h["product_id"] for h in routed["results"]] == [h["product_id"] for h in expected["results"]]
            assert [h["score"] for h in routed["results"]] == pytest.approx([h["score"] for h in expected["results"]])
            assert routed["facets"] == expected["facets"] and routed["mode"] == expected["mode"]
            assert routed["partial"] is False and routed["missing_shards"] == []
        for n in range(0, 400, 37):  # similar products: collapsed across replicas as one server collapses them
            params = {"k": 7, **({"shop_id": "shop-1"} if n % 2 else {})}
            expected = httpx.get(f"{whole.url}/v1/products/p{n}/similar", params=params, timeout=30).json()
            routed = httpx.get(f"{router.url}/v1/products/p{n}/similar", params=params, timeout=30).json()
            assert [h["product_id"] for h in routed["results"]] == [h["product_id"] for h in expected["results"]]
            assert "vector" not in routed["results"][0] and f"p{n}" not in {h["product_id"] for h in routed["results"]}
        assert httpx.get(f"{router.url}/v1/products/p5/vector", timeout=30).json() == \
            httpx.get(f"{whole.url}/v1/products/p5/vector", timeout=30).json()
        unknown = httpx.get(f"{router.url}/v1/products/nope/similar", timeout=30)
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        bad = httpx.get(f"{router.url}/v1/products/p1/similar", params={"k": "many"}, timeout=30)
        assert bad.status_code == 400 and "k" in bad.json()["error"]
        deep = '{"and":[' * 900 + '{"brand":"acme"}' + ']}' * 900
        for response in (httpx.get(f"{router.url}/v1/products/p1/similar", params={"filter": deep}, timeout=30),
                         httpx.post(router.url + "/v1/search", timeout=30,
                                    content='{"vector": [1.0], "filter": ' + deep + '}')):
            assert response.status_code == 400, response.text  # nested too deep: read as bad, not a crash
        for body, message in (({"k": 10, "offset": 995}, "offset + k is 1005"), ({"k": True, "offset": 3}, "k")):
            answer = httpx.post(router.url + "/v1/search", json={"vector": [1.0] + [0.0] * 15, **body}, timeout=30)
            assert answer.status_code == 400 and message in answer.json()["error"], answer.text
        health = httpx.get(router.url + "/healthz", timeout=10).json()
        assert health["status"] == "ok" and health["live_docs"] == 400
        assert httpx.get(router.url + "/livez", timeout=10).json() == {"status": "alive"}
        missing = httpx.get(router.url + "/no-such-path", timeout=10)
        assert missing.status_code == 404 and set(missing.json()) == {"error"}
        assert {url: b["shards"] for url, b in health["backends"].items()} == {first.url: [0, 2], second.url: [1]}
        bad = httpx.post(router.url + "/v1/search", json={"vector": [1.0], "k": 5}, timeout=10)
        assert bad.status_code == 400 and "the index holds 16-d vectors" in bad.json()["error"]

        os.kill(second.process.pid, signal.SIGSTOP)  # hung: answers nothing
        body = {"vector": [1.0] + [0.0] * 15, "k": 30}
        for _ in range(3):
            # One timeout (1.5 s) and the merge. A health check falling due meanwhile (every 5 s) must
            # not add its own: waiting on the hung /healthz too would take 3 s or more.
            started = time.monotonic()
            answer = search(router.url, body)
            assert time.monotonic() - started < 2.8
            time.sleep(2.5)
        assert answer["partial"] is True and answer["missing_shards"] == [1]
        assert answer["results"] and all(shard_of(h["product_id"], 3) in (0, 2) for h in answer["results"])
        os.kill(second.process.pid, signal.SIGCONT)
        second.stop()  # gone: refused at once
        answer = search(router.url, body)
        assert answer["partial"] is True and answer["missing_shards"] == [1] and second.url in answer["errors"]
        health = httpx.get(router.url + "/healthz", timeout=10).json()
        assert health["status"] == "degraded" and health["missing_shards"] == [1]
        assert health["backends"][second.url]["status"] == "down"
    finally:
        for server in (router, first, second, whole):
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
                server.stop()


def test_replicas_may_not_overlap_and_shards_must_exist(index_dir):
    first, whole = ServerProcess(index_dir, "--shards", "0-1"), ServerProcess(index_dir)
    try:
        result = subprocess.run([sys.executable, "-m", "search.router", "--backends", f"{first.url},{whole.url}",
                                 "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "shard 0 is served by both" in result.stderr.strip().splitlines()[-1]
    finally:
        first.stop()
        whole.stop()
    result = subprocess.run([sys.executable, "-m", "search.server", "--index_dir", str(index_dir), "--shards", "2-5",
                             "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "the index has shards 0-2" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--backends", "localhost:8081"], "http(s):// URLs"),
    (["--backends", "http://127.0.0.1:1,http://127.0.0.1:1/"], "a URL is listed twice"),
    (["--backends", "http://127.0.0.1:1", "--timeout_secs", "nan"], "--timeout_secs: must be a number over 0"),
])
def test_the_router_refuses_a_bad_backend_list(argv, message):
    result = subprocess.run([sys.executable, "-m", "search.router", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("shards, message", [("", "'' is not a shard number"), ("2-1", "a reversed range")])
def test_a_replica_refuses_an_empty_or_reversed_shard_list(index_dir, shards, message):
    result = subprocess.run([sys.executable, "-m", "search.server", "--index_dir", str(index_dir), "--shards", shards,
                             "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1]
