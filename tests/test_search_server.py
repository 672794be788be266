"""The query service over HTTP: search by text, vector and image, scoping, errors, live updates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import requests

from background_server import BackgroundServer
from localstack.image_server import Route
from search.server import create_app
from search.sharded import ShardedIndex, shard_of
from tests.conftest import DIM, TINY_CLIP, image_bytes

@pytest.fixture
def server(colour_index, query_embedder):
    index_dir, _, _ = colour_index
    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder, refresh_secs=0.0)) as running:
        yield running


def search(server, **body):
    return requests.post(f"{server.url}/v1/search", json=body, timeout=30)


def test_text_queries_return_products_with_every_field(server):
    response = search(server, text="red shirt 3", k=5)
    assert response.status_code == 200
    data = response.json()
    assert len(data["results"]) == 5 and data["took_ms"] > 0
    assert set(data["results"][0]) == {"product_id", "shop_id", "score", "version", "title", "image_url",
                                       "attributes", "embedded_at", "generation"}
    assert data["mode"] == "hybrid" and data["facets"] == {}
    scores = [hit["score"] for hit in data["results"]]
    assert scores == sorted(scores, reverse=True)


def test_a_products_own_vector_finds_it_first(server, colour_index):
    _, _, records = colour_index
    for record in records[:5]:
        (top,) = search(server, vector=record.embedding.tolist(), k=1).json()["results"]
        assert top["product_id"] == record.product_id and top["score"] == pytest.approx(1, abs=1e-4)


def test_image_url_queries_are_embedded_like_products(server, image_server):
    image_server.routes["/query.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    response = search(server, image_url=image_server.url("query.jpg"), k=3)
    assert response.status_code == 200 and len(response.json()["results"]) == 3


def test_k_and_ef_search_are_separate(server):
    assert len(search(server, text="shirt", k=20, ef_search=5).json()["results"]) == 20
    assert len(search(server, text="shirt", k=2, ef_search=500).json()["results"]) == 2


def test_shop_scoped_queries_stay_in_the_shop(server):
    for shop in ("shop-0", "shop-1"):
        hits = search(server, text="shirt", k=24, shop_id=shop).json()["results"]
        assert len(hits) == 12 and {hit["shop_id"] for hit in hits} == {shop}
    assert search(server, text="shirt", shop_id="shop-x").json()["results"] == []


@pytest.mark.parametrize("body, message", [
    ({}, "exactly one of text, vector, image_url"),
    ({"text": "a", "vector": [1.0] * DIM}, "exactly one"),
    ({"text": "a", "k": 0}, "k"),
    ({"text": "a", "k": 5000}, "k"),
    ({"text": "a", "ef_search": 0}, "ef_search"),
    ({"text": "a", "colour": "red"}, "colour"),
    ({"text": "   "}, "text is empty"),
    ({"vector": [1.0, 2.0]}, "64-d"),
    ({"vector": [0.0] * DIM}, "not all zero"),
    ({"image_url": "http://169.254.169.254/latest/meta-data"}, "link-local"),
    ({"image_url": "ftp://example.com/a.jpg"}, "non-http"),
    ({"text": "a", "filter": {"brand": "acme"}}, "filter.brand: not a filterable field of this index"),
    ({"text": "a", "filter": {"price": {"lt": "10"}}}, 'filter.price.lt: "10" is not a number'),
    ({"text": "a", "filter": "colour=red"}, "filter"),
    ({"text": "a", "facets": ["brand"]}, "facets: 'brand' is not a filterable field"),
    ({"text": "a", "facets": ["price"]}, "price is a float field: give its bucket edges"),
    ({"text": "a", "facets": ["price"], "facet_buckets": {"price": [5, 1]}}, "increasing edges"),
    ({"text": "a", "k": 10, "offset": 995}, "offset + k is 1005, over 1000"),
    ({"vector": [1.0] * DIM, "mode": "lexical"}, "mode lexical needs a text query"),
])
def test_bad_requests_get_a_400_with_a_clear_message(server, body, message):
    response = search(server, **body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_unfetchable_query_images_are_a_400(server, image_server):
    response = search(server, image_url=image_server.url("missing.jpg"))
    assert response.status_code == 400 and "404" in response.json()["error"]


def test_health_and_metrics(server):
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["live_docs"] == 24 and health["model"] == TINY_CLIP
    search(server, text="shirt")
    search(server, text="")
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'search_requests_total{outcome="ok"}' in metrics
    assert 'search_requests_total{outcome="bad_request"}' in metrics
    assert "index_live_docs 24.0" in metrics and "search_latency_seconds_bucket" in metrics


def test_new_commits_are_searchable_without_a_restart(server, colour_index):
    _, writer, records = colour_index
    newest = records[0]
    vector = np.roll(np.array(newest.embedding), 7)
    vector /= np.linalg.norm(vector)
    moved = dataclasses.replace(newest, version=2, embedding=tuple(float(x) for x in vector), title="moved")
    shard = writer.shards[shard_of(newest.product_id, 2)]
    shard.apply([moved])
    (top,) = search(server, vector=moved.embedding.tolist(), k=1).json()["results"]
    assert (top["product_id"], top["version"], top["title"]) == (newest.product_id, 2, "moved")
    shard.apply([dataclasses.replace(newest, version=3, op="delete", embedding=())])
    hits = search(server, vector=moved.embedding.tolist(), k=24).json()["results"]
    assert newest.product_id not in {hit["product_id"] for hit in hits}


def test_filters_facets_and_pages_over_http(server, colour_index):
    _, _, records = colour_index
    red = search(server, text="shirt", k=24, filter={"colour": "red", "price": {"gte": 6}}, facets=["in_stock"]).json()
    expected = {r.product_id for r in records if r.attributes["colour"] == "red" and r.attributes["price"] >= 6}
    assert {hit["product_id"] for hit in red["results"]} == expected
    assert all(hit["attributes"]["colour"] == "red" for hit in red["results"])
    in_stock = sum(r.attributes["in_stock"] for r in records if r.product_id in expected)
    assert red["facets"] == {"in_stock": [{"value": True, "count": in_stock},
                                          {"value": False, "count": len(expected) - in_stock}]}
    priced = search(server, text="shirt", facets=["colour", "price"], facet_buckets={"price": [0, 12, 24]}).json()
    assert priced["facets"]["price"] == [{"value": [0, 12], "count": 12}, {"value": [12, 24], "count": 12}]
    assert sorted(f["count"] for f in priced["facets"]["colour"]) == [8, 8, 8]
    whole = [hit["product_id"] for hit in search(server, vector=records[0].embedding.tolist(), k=20).json()["results"]]
    pages = [hit["product_id"] for offset in (0, 7, 14) for hit in
             search(server, vector=records[0].embedding.tolist(), k=7, offset=offset).json()["results"]]
    assert pages[:20] == whole


def test_keyword_and_hybrid_modes(server, colour_index):
    lexical = search(server, text="shirt 13", k=3, mode="lexical").json()
    assert lexical["mode"] == "lexical" and lexical["results"][0]["product_id"] == "p13"
    hybrid = search(server, text="shirt 13", k=3).json()
    assert hybrid["mode"] == "hybrid" and hybrid["results"][0]["product_id"] == "p13"
    assert search(server, vector=[1.0] * DIM, k=3).json()["mode"] == "vector"


def test_similar_products_over_http(server, colour_index):
    _, _, records = colour_index
    response = requests.get(f"{server.url}/v1/products/p0/similar", params={"k": 5}, timeout=30)
    assert response.status_code == 200
    ids = [hit["product_id"] for hit in response.json()["results"]]
    # Solid-colour photos with near-identical titles: the other reds are copies of p0 and collapse.
    assert "p0" not in ids and 1 <= len(ids) <= 5
    shop = requests.get(f"{server.url}/v1/products/p0/similar", timeout=30,
                        params={"k": 5, "shop_id": "shop-1", "filter": '{"colour": "green"}'}).json()["results"]
    assert shop and all(h["shop_id"] == "shop-1" and h["attributes"]["colour"] == "green" for h in shop)
    missing = requests.get(f"{server.url}/v1/products/nope/similar", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad = requests.get(f"{server.url}/v1/products/p0/similar", params={"filter": "{"}, timeout=30)
    assert bad.status_code == 400 and "filter: not valid JSON" in bad.json()["error"]
    deep = requests.get(f"{server.url}/v1/products/p0/similar", timeout=30,
                        params={"filter": '{"and":[' * 900 + '{"colour":"red"}' + ']}' * 900})
    assert deep.status_code == 400 and "filter:" in deep.json()["error"]


def test_a_filter_nested_thousands_deep_is_a_400_not_a_crash(server):
    body = '{"text": "a", "filter": ' + '{"and": [' * 3000 + '{"colour": "red"}' + ']}' * 3000 + '}'
    response = requests.post(f"{server.url}/v1/search", data=body, timeout=30)
    assert response.status_code == 400 and set(response.json()) == {"error"}
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
