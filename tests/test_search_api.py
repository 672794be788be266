"""One API contract, two backends: the storefront's HTTP answers from `python -m search.server` over the
embedded FAISS index and over a Qdrant collection, holding the same products: in the local mode
(`--qdrant_path`), and on a server (`--qdrant_url`, the local stand-in localstack.qdrant_server, with an
API key), written there by the sink over HTTP.

Every test in the first part runs against every server, each started as a user starts it; the last part
asks them the same questions and compares the answers where all are exact (vector scores, filters,
facets, pages, similar products). Keyword ranking is compared as behaviour only: the FAISS store ranks
by FTS5's BM25 with a stemmer, Qdrant by its own BM25 without one (docs/ARCHITECTURE.md §18).
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pytest
import requests

from search.fields import parse_filterable, typed
from search.qdrant.collection import QdrantTarget
from search.sharded import ShardedIndex
from search.store import StoreSettings
from localstack.qdrant_server import QdrantStandIn
from tests.conftest import DIM, TINY_CLIP
from tests.support.index_helpers import last_writer_wins, record
from tests.support.qdrant_helpers import write_collection
from tests.support.server_process import ServerProcess
from tests.test_storefront import passes

API_KEY = "stand-in-key-0123"
FIELDS = parse_filterable("brand,category,price:float,size:int,in_stock:bool")
SETTINGS = StoreSettings(filterable=FIELDS)
WORDS = ("linen", "wool", "denim", "silk")
BRANDS = ("acme", "zeta", "café")


def products() -> list:
    """48 products in two shops, some updated, patched or deleted afterwards: the same stream into both."""
    out = []
    for n in range(48):
        attributes = {"brand": BRANDS[n % 3], "category": ("shirt", "coat")[n % 2], "price": float(5 * n % 97),
                      "size": 36 + n % 5, "in_stock": n % 4 != 0}
        if n % 11 == 0:
            attributes["price"] = "ask"  # of another type: kept, neither filtered nor counted
        r = record(f"p{n}", 1, dim=DIM, shop_id=f"shop-{'ab'[n % 2]}", seed=n, model=TINY_CLIP)
        out.append(dataclasses.replace(r, attributes=attributes, title=f"{WORDS[n % 4]} {('shirt', 'coat')[n % 2]} {n}",
                                       description=f"a {WORDS[(n + 1) % 4]} blend"))
    later = [dataclasses.replace(record("p3", 2, "delete", dim=DIM, model=TINY_CLIP), shop_id="shop-b"),
             dataclasses.replace(record("p7", 2, "delete", dim=DIM, model=TINY_CLIP), shop_id="shop-b"),
             dataclasses.replace(out[5], version=3, op="patch", embedding=np.zeros(0, np.float32),
                                 attributes={**out[5].attributes, "brand": "zeta", "size": 40}),
             dataclasses.replace(out[4], version=2, title="silk coat 4 renewed",
                                 embedding=np.asarray(record("x", 1, dim=DIM, seed=999).embedding, np.float32))]
    return out + later


RECORDS = products()
LIVE = {pid: r for pid, r in last_writer_wins(RECORDS).items() if r.op != "delete"}
# A patch keeps the vector, title and words of the upsert it follows.
LIVE["p5"] = dataclasses.replace(RECORDS[5], attributes=LIVE["p5"].attributes, version=3)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    index_dir = root / "index"
    ShardedIndex.ensure_layout(index_dir, 1, TINY_CLIP, DIM, SETTINGS)
    writer = ShardedIndex.open_writer(index_dir, 0, TINY_CLIP, DIM, SETTINGS)
    writer.apply(RECORDS[:48])
    writer.apply(RECORDS[48:])
    writer.close()
    target = QdrantTarget(collection="products", path=str(root / "qdrant"))
    started = {}
    with QdrantStandIn(root / "qdrant-server", root / "qdrant-server.log", api_key=API_KEY) as engine:
        remote = QdrantTarget(collection="products", url=engine.url)
        for where in (target, remote):
            outputs = write_collection(where, RECORDS[:48], SETTINGS)
            outputs += write_collection(where, RECORDS[48:], SETTINGS)
            assert not [v for tag, v in outputs if tag != "commits"], outputs
        try:
            started["faiss"] = ServerProcess(index_dir)
            started["qdrant"] = ServerProcess(None, "--backend", "qdrant", "--qdrant_path", target.path,
                                              "--collection", "products")
            started["qdrant-server"] = ServerProcess(None, "--backend", "qdrant", "--qdrant_url", engine.url,
                                                     "--collection", "products")
            yield started
        finally:
            for server in started.values():
                server.stop()


@pytest.fixture(autouse=True, scope="module")
def api_key():
    """The key the stand-in asks of every request, given as users give it: QDRANT_API_KEY (the sink here,
    the server processes through their environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QDRANT_API_KEY", API_KEY)
        yield


@pytest.fixture(params=["faiss", "qdrant", "qdrant-server"])
def api(request, servers):
    return servers[request.param]


def search(server, **body) -> requests.Response:
    return requests.post(f"{server.url}/v1/search", json=body, timeout=30)


def vector_of(pid: str) -> list[float]:
    return np.asarray(LIVE[pid].embedding, np.float32).tolist()


def ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["product_id"] for hit in response.json()["results"]]


FILTERS = [
    {"brand": "acme"},
    {"brand": "café"},
    {"category": {"in": ["coat", "hat"]}, "in_stock": True},
    {"price": {"gte": 20, "lt": 60}},
    {"price": {"eq": 25}},
    {"size": {"in": [36, 40]}},
    {"size": 38.0},
    {"or": [{"brand": "zeta"}, {"and": [{"price": {"lte": 10}}, {"in_stock": False}]}]},
    {"shop_id": "shop-b", "brand": {"in": ["acme", "zeta"]}},
]


def test_health_names_the_model_and_counts_the_live_products(api):
    health = requests.get(f"{api.url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == TINY_CLIP and health["dim"] == DIM
    assert health["live_docs"] == len(LIVE) and set(health["filterable"]) == {str(f) for f in FIELDS}
    assert "text" in health["queries"]


def test_a_products_own_vector_finds_it_first_with_every_field(api):
    for pid in ("p0", "p4", "p5", "p30"):
        response = search(api, vector=vector_of(pid), k=3)
        top = response.json()["results"][0]
        assert top["product_id"] == pid and top["score"] == pytest.approx(1, abs=1e-4)
        assert top["version"] == LIVE[pid].version and top["title"] == LIVE[pid].title
        assert top["attributes"] == LIVE[pid].attributes and top["shop_id"] == LIVE[pid].shop_id
        assert set(top) == {"product_id", "shop_id", "score", "version", "title", "image_url", "attributes",
                            "embedded_at", "generation"}


def test_deleted_products_are_never_answered(api):
    for pid in ("p3", "p7"):
        assert pid not in ids(search(api, vector=np.asarray(RECORDS[int(pid[1:])].embedding).tolist(), k=50))
        assert requests.get(f"{api.url}/v1/products/{pid}/vector", timeout=10).status_code == 404
        assert requests.get(f"{api.url}/v1/products/{pid}/similar", timeout=10).status_code == 404


@pytest.mark.parametrize("condition", FILTERS, ids=[json.dumps(f, ensure_ascii=False) for f in FILTERS])
def test_filters_answer_exactly_the_products_that_pass(api, condition):
    expected = {pid for pid, r in LIVE.items() if passes(r.attributes, r.shop_id, condition)}
    got = ids(search(api, vector=vector_of("p0"), k=100, filter=condition))
    assert set(got) == expected and len(got) == len(expected)


def test_shop_scope_and_a_filter_together(api):
    got = ids(search(api, vector=vector_of("p1"), k=100, shop_id="shop-a", filter={"in_stock": True}))
    assert set(got) == {pid for pid, r in LIVE.items() if r.shop_id == "shop-a" and r.attributes["in_stock"]}
    assert ids(search(api, vector=vector_of("p1"), shop_id="shop-none")) == []


def test_facets_count_the_filtered_products_values_and_buckets(api):
    condition = {"in_stock": True}
    body = search(api, vector=vector_of("p0"), k=1, filter=condition, facets=["brand", "size", "in_stock", "price"],
                  facet_buckets={"price": [0, 25, 50, 100]}).json()
    live = [r for r in LIVE.values() if passes(r.attributes, r.shop_id, condition)]
    for name in ("brand", "size", "in_stock"):
        field = next(f for f in FIELDS if f.name == name)
        truth = collections.Counter(v for r in live if (v := typed(field, r.attributes.get(name))) is not None)
        assert {item["value"]: item["count"] for item in body["facets"][name]} == dict(truth), name
    prices = [p for r in live if (p := typed(FIELDS[2], r.attributes.get("price"))) is not None]
    assert [item["count"] for item in body["facets"]["price"]] == list(np.histogram(prices, bins=[0, 25, 50, 100])[0])
    assert [item["value"] for item in body["facets"]["price"]] == [[0, 25], [25, 50], [50, 100]]


def test_pages_are_slices_of_one_long_answer(api):
    whole = ids(search(api, vector=vector_of("p2"), k=20, filter={"category": "coat"}))
    pages = [ids(search(api, vector=vector_of("p2"), k=5, offset=o, filter={"category": "coat"})) for o in (0, 5, 10, 15)]
    assert sum(pages, []) == whole


def test_keywords_find_the_products_with_the_word_in_the_shop(api):
    got = ids(search(api, text="denim", mode="lexical", k=50, shop_id="shop-a"))
    holding = {pid for pid, r in LIVE.items() if r.shop_id == "shop-a" and
               "denim" in f"{r.title} {r.description}".split()}
    assert got and set(got) == holding
    assert all("denim" in LIVE[pid].title for pid in got[:3])  # the title weighs most


def test_hybrid_answers_fuse_both_lists_within_the_filter(api):
    response = search(api, text="silk coat", k=10, filter={"brand": "acme"})
    body = response.json()
    assert response.status_code == 200 and body["mode"] == "hybrid" and len(body["results"]) == 10
    assert all(hit["attributes"]["brand"] == "acme" for hit in body["results"])
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_products_leave_the_product_out_and_keep_the_scope(api):
    response = requests.get(f"{api.url}/v1/products/p6/similar", params={"k": 5, "shop_id": "shop-a"}, timeout=10)
    got = ids(response)
    assert len(got) == 5 and "p6" not in got and all(LIVE[pid].shop_id == "shop-a" for pid in got)
    vector = requests.get(f"{api.url}/v1/products/p6/vector", timeout=10).json()
    assert np.allclose(vector["vector"], vector_of("p6"), atol=1e-6) and vector["model"] == TINY_CLIP


@pytest.mark.parametrize("body, message", [
    ({"text": "a", "filter": {"colour": "red"}}, "filter.colour: not a filterable field"),
    ({"text": "a", "filter": {"price": {"lt": "10"}}}, 'filter.price.lt: "10" is not a number'),
    ({"text": "a", "facets": ["price"]}, "price is a float field"),
    ({"vector": [1.0, 2.0]}, f"{DIM}-d"),
    ('{"text": "a", "filter": {"price": {"lt": 1e400}}}', "not a finite number"),
])
def test_bad_requests_are_400s_naming_the_problem(api, body, message):
    response = requests.post(f"{api.url}/v1/search", data=body, timeout=30) if isinstance(body, str) else \
        search(api, **body)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_hostile_bodies_are_400s_and_the_server_answers_on(api):
    deep = '{"text": "a", "filter": ' + '{"or": [' * 3000 + '{"brand": "acme"}' + ']}' * 3000 + '}'
    response = requests.post(f"{api.url}/v1/search", data=deep, timeout=30)
    assert response.status_code == 400 and response.json()["error"]
    nested = {"or": [{"or": [{"or": [{"or": [{"or": [{"or": [{"or": [{"or": [{"brand": "acme"}]}]}]}]}]}]}]}]}
    response = search(api, text="a", filter=nested)
    assert response.status_code == 400 and "nested deeper" in response.json()["error"]
    response = requests.post(f"{api.url}/v1/search", data=b'{"text": "\xff\xfe"}', timeout=10)
    assert response.status_code == 400
    assert requests.get(f"{api.url}/v1/products/none/similar", timeout=10).status_code == 404
    assert requests.get(f"{api.url}/v1/products/p1/similar", params={"k": "2.5"}, timeout=10).status_code == 400
    assert ids(search(api, vector=vector_of("p0"), k=1)) == ["p0"]


def test_metrics_and_the_page_are_served(api):
    search(api, vector=vector_of("p0"), k=1)
    metrics = requests.get(f"{api.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and 'search_requests_total{outcome="ok"}' in metrics.text
    assert f"index_live_docs {len(LIVE)}.0" in metrics.text
    page = requests.get(f"{api.url}/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


# Both backends, the same questions: equal answers wherever both are exact.
QUESTIONS = [
    {"vector": "p9", "k": 10},
    {"vector": "p9", "k": 7, "offset": 7, "filter": {"category": "shirt"}},
    {"vector": "p12", "k": 48, "filter": {"or": [{"brand": "café"}, {"size": {"gte": 39}}]},
     "facets": ["brand", "category", "size", "in_stock", "price"], "facet_buckets": {"price": [0, 10, 50, 97]}},
    {"vector": "p20", "k": 5, "shop_id": "shop-b", "facets": ["brand"]},
]


@pytest.mark.parametrize("other", ["qdrant", "qdrant-server"])
@pytest.mark.parametrize("question", QUESTIONS, ids=[json.dumps(q) for q in QUESTIONS])
def test_the_backends_give_the_same_answer(servers, question, other):
    body = {**question, "vector": vector_of(question["vector"])}
    faiss, qdrant = (search(servers[name], **body).json() for name in ("faiss", other))
    assert [h["product_id"] for h in faiss["results"]] == [h["product_id"] for h in qdrant["results"]]
    assert np.allclose([h["score"] for h in faiss["results"]], [h["score"] for h in qdrant["results"]], atol=1e-5)
    for name in faiss["facets"]:
        assert sorted(map(json.dumps, faiss["facets"][name])) == sorted(map(json.dumps, qdrant["facets"][name])), name
    assert faiss["facets"].keys() == qdrant["facets"].keys()


def test_the_backends_give_the_same_similar_products_and_keywords(servers):
    for pid, params in (("p10", {"k": 6}), ("p11", {"k": 4, "filter": json.dumps({"in_stock": True})})):
        answers = [ids(requests.get(f"{servers[name].url}/v1/products/{pid}/similar", params=params, timeout=10))
                   for name in ("faiss", "qdrant", "qdrant-server")]
        assert answers[0] == answers[1] == answers[2] and len(answers[0]) == params["k"]
    # Qdrant's BM25 is one formula in the local mode and behind the server's REST API (equal scores may
    # come in another order: each engine breaks ties by its own point order).
    local, remote = ({(h["product_id"], round(h["score"], 5)) for h in
                      search(servers[name], text="wool coat", mode="lexical", k=48).json()["results"]}
                     for name in ("qdrant", "qdrant-server"))
    assert local == remote and len(local) == len({pid for pid, r in LIVE.items()
                                                  if {"wool", "coat"} & set(f"{r.title} {r.description}".split())})


def test_a_server_refuses_requests_without_the_key(servers, tmp_path):
    import subprocess
    import sys

    from tests.support.server_process import ROOT

    url = servers["qdrant-server"].ready_line and servers["qdrant-server"]
    engine = next(a for a in url.process.args if a.startswith("http://127.0.0.1"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "QDRANT_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "search.server", "--port", "0", "--backend", "qdrant",
                             "--qdrant_url", engine, "--collection", "products"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1 and API_KEY not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert f"{engine} refused the API key (401; no key given" in line and "Traceback" not in result.stderr
    for module, argv, code in (("search.aliases", [], 1), ("evaluation.gate", ["--candidate", "products"], 2)):
        result = subprocess.run([sys.executable, "-m", module, "--qdrant_url", engine, *argv], cwd=ROOT,
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == code and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert f"{engine} refused the API key (401;" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["--backend", "qdrant", "--qdrant_path", "{tmp}/q"], 2, "exactly one of --collection and --alias"),
    (["--index_dir", "{tmp}/i", "--collection", "products"], 2, "--collection needs --backend qdrant"),
    (["--backend", "qdrant", "--collection", "products"], 2, "exactly one of --qdrant_url and --qdrant_path"),
    (["--backend", "qdrant", "--collection", "a b", "--qdrant_path", "{tmp}/q"], 2, "must be a collection name"),
    (["--backend", "qdrant", "--collection", "missing", "--qdrant_path", "{tmp}/q"], 1, "does not exist"),
    (["--backend", "qdrant", "--collection", "products", "--qdrant_url", "http://127.0.0.1:{port}",
      "--qdrant_timeout_secs", "2"], 1, "search.server: "),
])
def test_the_qdrant_flags_are_refused_in_one_line(tmp_path, argv, code, message):
    import subprocess
    import sys

    from localstack.emulator import free_port
    from tests.support.server_process import ROOT

    argv = [a.format(tmp=tmp_path, port=free_port()) for a in argv]
    result = subprocess.run([sys.executable, "-m", "search.server", "--port", "0", *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == code and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["faiss", "qdrant", "qdrant-server"])
def test_a_filter_value_that_is_not_valid_unicode_is_a_400(servers, backend):
    for body in ('{"vector": %s, "filter": {"brand": "\\udc00"}}' % json.dumps(vector_of("p0")),
                 '{"text": "coat", "mode": "lexical", "filter": {"category": {"in": ["coat", "\\ud800"]}}}'):
        response = requests.post(f"{servers[backend].url}/v1/search", data=body, timeout=30)
        assert response.status_code == 400 and "not valid Unicode" in response.json()["error"], response.text
    response = requests.get(f"{servers[backend].url}/v1/products/p1/similar",
                            params={"filter": '{"brand": "\\ud800"}'}, timeout=10)
    assert response.status_code == 400 and "not valid Unicode" in response.json()["error"]


def test_keywords_match_without_their_accents_on_both_backends(servers):
    """FTS5 folds diacritics away; the Qdrant backend folds its keywords and queries the same way."""
    expected = {pid for pid, r in LIVE.items() if r.attributes.get("brand") == "café"}
    for backend in ("faiss", "qdrant", "qdrant-server"):
        for word in ("cafe", "café", "CAFÉ"):
            got = set(ids(search(servers[backend], text=word, mode="lexical", k=48)))
            assert got == expected, (backend, word)


def test_an_engine_that_stops_answering_is_a_503_and_the_service_recovers(tmp_path):
    """The search service on a Qdrant server that goes down: searches and /healthz answer 503 with the
    reason (a load balancer takes the replica out), counted; when the engine is back, so is search."""
    from localstack.qdrant_server import QdrantStandIn

    data, log = tmp_path / "engine", tmp_path / "engine.log"
    engine = QdrantStandIn(data, log).__enter__()
    try:
        target = QdrantTarget(collection="products", url=engine.url)
        write_collection(target, RECORDS[:48], SETTINGS)
        server = ServerProcess(None, "--backend", "qdrant", "--qdrant_url", engine.url, "--collection", "products",
                               "--qdrant_timeout_secs", "2")
        try:
            assert ids(search(server, vector=vector_of("p0"), k=1)) == ["p0"]
            engine.__exit__(None, None, None)
            response = search(server, vector=vector_of("p0"), k=1)
            assert response.status_code == 503 and engine.url in response.json()["error"], response.text
            assert requests.get(f"{server.url}/v1/products/p0/vector", timeout=10).status_code == 503
            import time

            time.sleep(1.2)  # the service reads the engine's state at most every second
            health = requests.get(f"{server.url}/healthz", timeout=10)
            assert health.status_code == 503 and health.json()["status"] == "unavailable", health.text
            metrics = requests.get(f"{server.url}/metrics", timeout=10).text
            assert 'search_requests_total{outcome="unavailable"} 2.0' in metrics
            engine = QdrantStandIn(data, log, port=engine.port).__enter__()  # back, same place
            time.sleep(1.2)
            assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
            assert ids(search(server, vector=vector_of("p0"), k=1)) == ["p0"]
        finally:
            server.stop()
    finally:
        engine.__exit__(None, None, None)


@pytest.mark.parametrize("module, argv", [
    ("search.server", ["--port", "0", "--backend", "qdrant", "--collection", "products"]),
    ("search.aliases", []),
])
def test_a_url_with_credentials_or_no_scheme_is_refused_by_every_command(tmp_path, module, argv):
    import subprocess
    import sys

    from tests.support.server_process import ROOT

    for url, message in (("http://user:pw@127.0.0.1:6333", "must not carry credentials"),
                         ("127.0.0.1:6333", "is not http(s)://HOST[:PORT]")):
        result = subprocess.run([sys.executable, "-m", module, *argv, "--qdrant_url", url], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "pw" not in result.stderr, result.stderr[-2000:]
