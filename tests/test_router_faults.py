"""`python -m search.router` in front of replicas that misbehave: each fake backend is a real HTTP server
on 127.0.0.1 (a thread of the test) answering what the test sets, trickling it byte by byte or in a
shape no search.server answers; the router runs as users start it, a subprocess on a free port."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest

from search.sharded import shard_of
from tests.support.server_process import ROOT, ServerProcess

NUM_SHARDS = 2
IDS = [f"p{n}" for n in range(40)]


def ids_of(shards) -> list[str]:
    return [product_id for product_id in IDS if shard_of(product_id, NUM_SHARDS) in shards]


def hit(product_id: str, score: float, dim: int = 0, **extra) -> dict:
    hit = {"product_id": product_id, "shop_id": "shop-1", "score": score, "version": 1, "title": product_id,
           "image_url": "", "attributes": {}, **extra}
    if dim:  # a /v1/similar candidate: its vector (far from every other's: none collapses)
        number = int(product_id[1:]) if product_id[1:].isdigit() else 0
        hit["vector"] = [1.0 if i == number % dim else 0.0 for i in range(dim)]
    return hit


@dataclass
class Reply:
    body: object  # JSON, or bytes sent as they are
    status: int = 200
    drip: float = 0.0  # seconds between bytes; 0: all at once
    drip_for: float = 10.0  # after this long trickling, the rest at once (so a hang without the fix ends)


class FakeBackend:
    """A stand-in for a search.server replica serving `shards`: /healthz, /v1/search, /v1/similar and
    /v1/products/ID/vector answer as the server does unless `replies[route]` says otherwise (a Reply, or
    a function of the decoded product id for "vector"). It records the raw path of every request."""

    def __init__(self, shards, model="acme:m", dim=4, index="", facet_count=1):
        self.health = {"status": "ok", "model": model, "dim": dim, "index": index, "live_docs": 20,
                       "generation": 1, "num_shards": NUM_SHARDS, "shards": list(shards), "queries": [],
                       "filterable": ["brand"], "errors": {}}
        self.shards, self.dim, self.facet_count = list(shards), dim, facet_count
        self.replies: dict[str, object] = {}
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self.stopped = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.answer(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null"))

            def answer(self, body=None):
                backend.paths.append(self.path)
                backend.bodies.append(body)
                reply = backend.reply(urlsplit(self.path).path)
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    started, sent = time.monotonic(), 0
                    while reply.drip and sent < len(data) and time.monotonic() - started < reply.drip_for \
                            and not backend.stopped.is_set():
                        self.wfile.write(data[sent:sent + 1])
                        self.wfile.flush()
                        sent += 1
                        time.sleep(reply.drip)
                    self.wfile.write(data[sent:])
                    self.wfile.flush()
                except OSError:  # the router gave up on it
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def results(self, dim: int = 0) -> list[dict]:
        return [hit(product_id, 1.0 - n / 100, dim) for n, product_id in enumerate(ids_of(self.shards)[:5])]

    def reply(self, path: str) -> Reply:
        if path == "/healthz":
            return self.replies.get("healthz") or Reply({**self.health, "shards": self.shards})
        if path == "/v1/search":
            return self.replies.get("search") or Reply({
                "results": self.results(), "facets": {"brand": [{"value": "acme", "count": self.facet_count}]},
                "mode": "vector", "model": self.health["model"], "index": self.health["index"], "took_ms": 1.0})
        if path == "/v1/similar":
            return self.replies.get("similar") or Reply({"results": self.results(self.dim), "mode": "vector",
                                                         "model": self.health["model"], "took_ms": 1.0})
        if path.startswith("/v1/products/") and path.endswith("/vector"):
            product_id = unquote(path[len("/v1/products/"):-len("/vector")])
            custom = self.replies.get("vector")
            if custom is not None:
                return custom(product_id) if callable(custom) else custom
            if shard_of(product_id, NUM_SHARDS) in self.shards:
                return Reply({"product_id": product_id, "vector": [1.0] + [0.0] * (self.dim - 1),
                              "model": self.health["model"]})
        return Reply({"error": f"no live product here ({path})"}, status=404)

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pair():
    """Two fake replicas: shard 0 and shard 1 of 2."""
    first, second = FakeBackend([0], facet_count=3), FakeBackend([1], facet_count=5)
    yield first, second
    first.stop()
    second.stop()


def start_router(*backends: FakeBackend, args=("--timeout_secs", "1")) -> ServerProcess:
    return ServerProcess(None, "--backends", ",".join(b.url for b in backends), *args, module="search.router")


def search(router: ServerProcess, body=None) -> httpx.Response:
    return httpx.post(router.url + "/v1/search", json=body or {"vector": [1.0, 0.0, 0.0, 0.0], "k": 10}, timeout=30)


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_a_backend_trickling_its_answer_is_cut_off_at_the_timeout(pair):
    first, second = pair
    router = start_router(first, second)
    try:
        # A byte every 0.3 s: each read is quick, so only a deadline on the whole answer ends it.
        for route in ("search", "similar"):
            second.replies[route] = Reply({"results": [], "model": "acme:m", "took_ms": 1.0}, drip=0.3)
        response, took = timed(lambda: search(router))
        assert response.status_code == 200 and took < 3.0, (took, response.text)
        answer = response.json()
        assert answer["partial"] is True and answer["missing_shards"] == [1]
        assert "no whole answer within 1 s" in answer["errors"][second.url]
        assert answer["results"] and {shard_of(h["product_id"], NUM_SHARDS) for h in answer["results"]} == {0}
        product = ids_of([0])[0]
        response, took = timed(lambda: httpx.get(f"{router.url}/v1/products/{product}/similar", timeout=30))
        assert response.status_code == 200 and took < 3.0, (took, response.text)
        assert response.json()["partial"] is True and second.url in response.json()["errors"]
        second.replies["vector"] = Reply({"error": "gone"}, status=404, drip=0.3)
        response, took = timed(lambda: httpx.get(f"{router.url}/v1/products/{product}/vector", timeout=30))
        assert response.status_code == 200 and took < 3.0 and response.json()["product_id"] == product
    finally:
        router.stop()


def test_a_trickling_healthz_neither_stops_the_router_starting_nor_blocks_later_checks(pair):
    first, second = pair
    second.replies["healthz"] = Reply(second.health, drip=0.3)
    router, took = timed(lambda: start_router(first, second, args=("--timeout_secs", "1",
                                                                   "--health_every_secs", "0.3")))
    try:
        assert took < 6.0 and f"not answering: {second.url}" in router.ready_line, (took, router.ready_line)
        health, took = timed(lambda: httpx.get(router.url + "/healthz", timeout=30))
        assert took < 3.0, took
        assert health.json()["backends"][second.url]["status"] == "down"
        assert "no whole answer within 1 s" in health.json()["backends"][second.url]["error"]
        # A search starts a background check, which hangs on the trickle; once the backend answers again,
        # a later check must notice it (its shard known again: not partial) in a moment, not after the hang.
        assert search(router).json()["missing_shards"] == [1]
        time.sleep(0.2)
        second.replies.pop("healthz")
        deadline, answer = time.monotonic() + 5, {}
        while time.monotonic() < deadline and answer.get("partial") is not False:
            answer = search(router).json()
            time.sleep(0.3)
        assert answer["partial"] is False and answer["missing_shards"] == [], answer
    finally:
        router.stop()


BAD_SEARCH_ANSWERS = [
    {"foo": 1}, [], [1, 2], None, "results", {"results": {}}, {"results": [{"product_id": "p1"}]},
    {"results": [hit("p1", 0.5) | {"score": "0.5"}]}, {"results": [hit("p1", 0.5) | {"score": True}]},
    {"results": [{k: v for k, v in hit("p1", 0.5).items() if k != "score"}]},
    {"results": [hit("p1", 0.5) | {"product_id": 7}]},
    b'{"results": [' + json.dumps(hit("p1", 0.5)).replace("0.5", "NaN").encode() + b"]}",
    b'{"results": [' + json.dumps(hit("p1", 0.5)).replace("0.5", "1e999").encode() + b"]}",
    {"results": [], "facets": {"brand": [{"value": "acme", "count": "3"}]}},
    {"results": [], "facets": {"brand": [{"value": "acme", "count": True}]}},
    {"results": [], "facets": {"brand": {"acme": 3}}}, {"results": [], "facets": [["brand", 3]]},
    {"results": [], "facets": {"price": [{"value": [], "count": 1}]}},
    {"results": [], "facets": {"price": [{"value": [0, "x"], "count": 1}]}},
    {"results": [], "missing_shards": ["1"]}, {"results": [], "missing_shards": [[1]]},
]


def test_an_answer_of_an_unexpected_shape_counts_as_that_backend_failing(pair):
    first, second = pair
    second.replies["healthz"] = Reply({})  # a traceback at start-up once
    router = start_router(first, second)
    try:
        assert f"not answering: {second.url}" in router.ready_line
        health = httpx.get(router.url + "/healthz", timeout=30).json()
        assert "unexpected answer to GET /healthz" in health["backends"][second.url]["error"]
        for bad in ({"status": "ok"}, second.health | {"dim": True}, second.health | {"shards": [2]},
                    second.health | {"num_shards": "2"}, [second.health]):
            second.replies["healthz"] = Reply(bad)
            health = httpx.get(router.url + "/healthz", timeout=30)
            assert health.status_code == 200 and health.json()["backends"][second.url]["status"] == "down", bad
        second.replies.pop("healthz")
        assert httpx.get(router.url + "/healthz", timeout=30).json()["status"] == "ok"

        for bad in BAD_SEARCH_ANSWERS + [Reply([1], status=400), Reply({"error": 5}, status=413),
                                         Reply([1], status=500), Reply(b"not json", status=502)]:
            second.replies["search"] = bad if isinstance(bad, Reply) else Reply(bad)
            response = search(router)
            assert response.status_code == 200, (bad, response.text)
            answer = response.json()
            assert answer["partial"] is True and answer["missing_shards"] == [1] and second.url in answer["errors"]
            assert [h["product_id"] for h in answer["results"]] == ids_of([0])[:5], bad
            assert answer["facets"] == {"brand": [{"value": "acme", "count": 3}]}
        second.replies.pop("search")

        product = ids_of([0])[0]
        for bad in ({"results": [{k: v for k, v in hit("p1", 0.5, 4).items() if k != "vector"}]},
                    {"results": [hit("p1", 0.5, 3)]}, {"results": [hit("p1", 0.5, 4) | {"vector": ["x"] * 4}]},
                    {"results": [hit("p1", 0.5, 4) | {"vector": [True, 0, 0, 0]}]}, {"results": "none"}):
            second.replies["similar"] = Reply(bad)
            response = httpx.get(f"{router.url}/v1/products/{product}/similar", timeout=30)
            assert response.status_code == 200, (bad, response.text)
            assert response.json()["partial"] is True and second.url in response.json()["errors"]
        second.replies.pop("similar")
        assert httpx.get(f"{router.url}/v1/products/{product}/similar", timeout=30).json()["partial"] is False

        product = ids_of([1])[0]  # served by the backend that answers its vector badly
        for bad in ({"vector": "abc"}, {"product_id": product, "vector": [1.0, None, 0, 0]},
                    {"product_id": product, "vector": []}, {"product_id": "other", "vector": [1.0, 0, 0, 0]}, []):
            second.replies["vector"] = Reply(bad)
            for route in ("vector", "similar"):
                response = httpx.get(f"{router.url}/v1/products/{product}/{route}", timeout=30)
                assert response.status_code == 503, (bad, route, response.text)
                assert "1 did not" in response.json()["error"]
    finally:
        router.stop()


PRODUCT_IDS = ["gid://shopify/Product/1", ".", "..", "a/../b", "./x", "%2F", "50%", "x?y#z", " sp ace", "ü/é",
               "a//b/"]


def test_every_product_id_is_addressable_through_the_router(pair):
    first, second = pair
    asked = []

    def vector(product_id):  # any id: these are the ids of its shards
        asked.append(product_id)
        return Reply({"product_id": product_id, "vector": [1.0, 0, 0, 0], "model": "acme:m"})

    first.replies["vector"] = vector
    router = start_router(first, second)
    try:
        for product_id in PRODUCT_IDS:
            encoded = quote(product_id, safe="")
            segments = {"%2E" * len(encoded)} if encoded in (".", "..") else {encoded}
            if "." not in product_id and "?" not in product_id and "#" not in product_id and "%" not in product_id:
                segments.add(product_id)  # raw slashes route too
            for segment in segments:
                for route in ("vector", "similar"):
                    first.paths.clear()
                    response = httpx.get(f"{router.url}/v1/products/{segment}/{route}", timeout=30)
                    assert response.status_code == 200, (product_id, segment, route, response.text)
                    assert asked[-1] == product_id, (product_id, segment, asked[-1])
                    [path] = [p for p in first.paths if p.endswith("/vector")]
                    sent = path[len("/v1/products/"):-len("/vector")]
                    assert "/" not in sent and sent not in (".", "..") and unquote(sent) == product_id, path
                    if route == "vector":
                        assert response.json()["product_id"] == product_id
                    else:
                        assert first.bodies[-1]["exclude"] == product_id
    finally:
        router.stop()


def test_backends_of_different_alias_roots_are_refused_once_a_switch_would_be_over():
    old = FakeBackend([0], model="acme:m64", dim=64, index="v1")
    new = FakeBackend([1], model="acme:m32", dim=32, index="v2")
    new.replies["search"] = Reply({"error": "the index holds 32-d vectors; the query has 64"}, status=400)
    router = start_router(old, new, args=("--timeout_secs", "1", "--health_every_secs", "0.2",
                                          "--max_switch_secs", "3"))
    started = time.monotonic()
    try:
        # Mid-switch (under 3 s): merged, and a vector one index refuses is answered by the other, partially.
        answer = search(router, {"vector": [1.0] + [0.0] * 63, "k": 5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["partial"] is True and "32-d" in answer.json()["errors"][new.url]
        time.sleep(max(0.0, started + 3.5 - time.monotonic()))
        health = httpx.get(router.url + "/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "misconfigured", health.text
        assert "different indexes for over 3 s" in health.json()["error"]
        for response in (search(router, {"text": "shoes", "mode": "lexical"}),
                         httpx.get(f"{router.url}/v1/products/{ids_of([0])[0]}/similar", timeout=30)):
            assert response.status_code == 503 and "different indexes for over 3 s" in response.json()["error"]
        new.health |= {"model": "acme:m64", "dim": 64, "index": "v1"}  # it follows the same root again
        new.replies.pop("search")
        assert httpx.get(router.url + "/healthz", timeout=30).json()["status"] == "ok"
        assert search(router).json()["partial"] is False
    finally:
        router.stop()
        old.stop()
        new.stop()


@pytest.mark.parametrize("says_shards", [True, False], ids=["answer-names-its-shards", "hits-only"])
def test_a_backend_restarted_over_another_ones_shards_is_left_out_at_query_time(pair, says_shards):
    first, second = pair
    router = start_router(first, second, args=("--timeout_secs", "1", "--health_every_secs", "3600"))
    try:
        answer = search(router).json()
        assert answer["partial"] is False and answer["facets"]["brand"] == [{"value": "acme", "count": 8}]
        second.shards = [0, 1]  # restarted serving shard 0 too: its facet counts hold shard 0's again
        second.facet_count = 8
        if says_shards:
            second.replies["search"] = Reply({"results": [hit(ids_of([1])[0], 0.9)], "facets": {
                "brand": [{"value": "acme", "count": 8}]}, "model": "acme:m", "took_ms": 1, "shards": [0, 1]})
        answer = search(router).json()  # no health check due: the answer itself must show it
        assert answer["partial"] is True and answer["missing_shards"] == [1], answer
        assert "covers shard 0" in answer["errors"][second.url]
        assert answer["facets"]["brand"] == [{"value": "acme", "count": 3}]
        assert {shard_of(h["product_id"], NUM_SHARDS) for h in answer["results"]} == {0}
        deadline, response = time.monotonic() + 5, search(router)
        while time.monotonic() < deadline and response.status_code == 200:  # the re-check it started
            time.sleep(0.2)
            response = search(router)
        assert response.status_code == 503 and "shard 0 is served by both" in response.json()["error"]
    finally:
        router.stop()


@pytest.mark.parametrize("flag, value, message", [
    ("--timeout_secs", "0", "--timeout_secs: must be a number over 0, at most 600"),
    ("--timeout_secs", "601", "--timeout_secs: must be a number over 0, at most 600"),
    ("--timeout_secs", "inf", "--timeout_secs: must be a number over 0, at most 600"),
    ("--health_every_secs", "0.05", "--health_every_secs: must be a number in 0.1..3600"),
    ("--health_every_secs", "nan", "--health_every_secs: must be a number in 0.1..3600"),
    ("--health_every_secs", "3601", "--health_every_secs: must be a number in 0.1..3600"),
    ("--max_switch_secs", "0.5", "--max_switch_secs: must be a number in 1..86400"),
    ("--max_switch_secs", "-inf", "--max_switch_secs: must be a number in 1..86400"),
    ("--max_switch_secs", "1e9", "--max_switch_secs: must be a number in 1..86400"),
    ("--port", "70000", "is not a port (0-65535)"),
    ("--port", "-1", "is not a port (0-65535)"),
])
def test_every_numeric_flag_has_a_range(flag, value, message):
    argv = [sys.executable, "-m", "search.router", "--backends", "http://127.0.0.1:9", f"{flag}={value}"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()[-1]) < 200


def test_similar_takes_only_a_whole_k_and_ef_search_in_range(pair):
    first, second = pair
    router = start_router(first, second)
    product = ids_of([0])[0]
    try:
        for params, name in (({"k": "2.0"}, "k"), ({"k": "0"}, "k"), ({"k": "101"}, "k"), ({"k": "true"}, "k"),
                             ({"k": "-1"}, "k"), ({"k": "1e1"}, "k"), ({"k": ""}, "k"),
                             ({"ef_search": "0"}, "ef_search"), ({"ef_search": "2.5"}, "ef_search"),
                             ({"ef_search": "20001"}, "ef_search")):
            response = httpx.get(f"{router.url}/v1/products/{product}/similar", params=params, timeout=30)
            assert response.status_code == 400 and response.json()["error"].startswith(f"{name}:"), response.text
        response = httpx.get(f"{router.url}/v1/products/{product}/similar", params={"k": "2", "ef_search": "64"},
                             timeout=30)
        assert response.status_code == 200 and len(response.json()["results"]) == 2, response.text
        assert first.bodies[-1]["k"] == 2 and first.bodies[-1]["ef_search"] == 64
    finally:
        router.stop()
