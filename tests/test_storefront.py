"""Storefront search in the store and across shards: filters against a brute-force filter, facets
against exact counts, keywords (FTS5) and their fusion with vectors, pages, similar products."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.fields import Field, parse_filterable, typed
from search.filters import FilterError, parse_filter
from search.hybrid import fts_query, fuse
from search.merge_policy import MergePolicy
from search.segment import SegmentParams
from search.sharded import ShardedIndex, shard_of
from search.store import IndexStore, StoreSettings
from tests.support.index_helpers import MODEL, last_writer_wins, record

FIELDS = parse_filterable("brand,category,price:float,size:int,in_stock:bool")
SETTINGS = StoreSettings(filterable=FIELDS, merge=MergePolicy(delta_limit=6, max_delta_segments=3, max_built_segments=2,
                                                              tombstone_ratio=0.3))
WORDS = ("linen", "wool", "shirt", "coat", "boot")


def with_attributes(r, attributes: dict, title: str = ""):
    return dataclasses.replace(r, attributes=attributes, title=title or r.title, description="soft " + title)


# Attribute values, some absent and some of the wrong type (kept, never filtered on).
attribute_values = st.fixed_dictionaries({}, optional={
    "brand": st.sampled_from(["acme", "zeta", "ünï", 7]),
    "category": st.sampled_from(["shirt", "coat"]),
    "price": st.one_of(st.floats(0, 100, allow_nan=False).map(lambda x: round(x, 1)), st.just("cheap")),
    "size": st.integers(36, 40),
    "in_stock": st.one_of(st.booleans(), st.just(1)),
})
ops = st.tuples(st.sampled_from([f"p{i}" for i in range(8)]), st.integers(0, 5),
                st.sampled_from(["upsert", "upsert", "delete"]), st.sampled_from(["shop-a", "shop-b"]),
                attribute_values, st.sampled_from(WORDS))

leaf = st.one_of(
    st.builds(lambda v: {"brand": v}, st.sampled_from(["acme", "zeta", "ünï", "none"])),
    st.builds(lambda vs: {"category": {"in": vs}}, st.lists(st.sampled_from(["shirt", "coat", "hat"]), min_size=1)),
    st.builds(lambda op, v: {"price": {op: v}}, st.sampled_from(["gt", "gte", "lt", "lte", "eq"]),
              st.sampled_from([0, 25.5, 50, 99.9])),
    st.builds(lambda lo, hi: {"size": {"gte": lo, "lt": hi}}, st.integers(35, 41), st.integers(35, 41)),
    st.builds(lambda v: {"in_stock": v}, st.booleans()),
    st.builds(lambda v: {"shop_id": v}, st.sampled_from(["shop-a", "shop-b"])),
)
filters = st.recursive(leaf, lambda inner: st.one_of(
    st.builds(lambda xs: {"and": xs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda xs: {"or": xs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda a, b: {**a, **b}, inner, inner)), max_leaves=6)


def passes(attributes: dict, shop: str, condition: dict) -> bool:
    """The brute-force filter: one product against the filter's JSON, read literally."""
    for name, cond in condition.items():
        if name == "and":
            ok = all(passes(attributes, shop, c) for c in cond)
        elif name == "or":
            ok = any(passes(attributes, shop, c) for c in cond)
        else:
            field = next((f for f in FIELDS if f.name == name), Field("shop_id"))
            value = shop if name == "shop_id" else typed(field, attributes.get(name))
            if not isinstance(cond, dict):
                cond = {"eq": cond}
            ok = value is not None and all({
                "eq": lambda v, x: v == x, "in": lambda v, x: v in x, "gt": lambda v, x: v > x,
                "gte": lambda v, x: v >= x, "lt": lambda v, x: v < x, "lte": lambda v, x: v <= x,
            }[op](value, x) for op, x in cond.items())
        if not ok:
            return False
    return True


@pytest.mark.parametrize("kind", ["hnsw", "hnsw_sq8"])
@pytest.mark.parametrize("exact_below", [0, 1000], ids=["by-bitmap", "exactly"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(ops, min_size=1, max_size=30), cuts=st.lists(st.integers(0, 30), max_size=4),
       compact=st.booleans(), conditions=st.lists(filters, min_size=1, max_size=4), word=st.sampled_from(WORDS))
def test_filters_facets_and_keywords_equal_a_brute_force_over_the_live_products(
        tmp_path_factory, kind, exact_below, stream, cuts, compact, conditions, word):
    settings_ = dataclasses.replace(SETTINGS, exact_below=exact_below, graph_step_cost=15.0 if exact_below else 0, segment=SegmentParams(kind, m=8))
    store = IndexStore(tmp_path_factory.mktemp("s"), model=MODEL, dim=8, settings=settings_)
    records = [with_attributes(record(pid, v, op, shop_id=shop), attrs, f"{w} {pid}")
               for pid, v, op, shop, attrs, w in stream]
    bounds = sorted({0, len(records), *(c for c in cuts if c <= len(records))})
    for start, end in zip(bounds, bounds[1:]):
        store.apply(records[start:end])
    if compact:
        store.compact(force=True)
    live = {pid: r for pid, r in last_writer_wins(records).items() if r.op == "upsert"}
    query = np.array(next(iter(live.values())).embedding) if live else np.ones(8, np.float32) / np.sqrt(8)
    for condition in conditions:
        parsed = parse_filter(condition, FIELDS)
        expected = {pid for pid, r in live.items() if passes(r.attributes, r.shop_id, condition)}
        exact = {h.product_id for h in store.search(query, k=50, exact=True, filter=parsed)}
        assert exact == expected, condition
        assert {h.product_id for h in store.search(query, k=50, ef_search=64, filter=parsed)} <= expected
        for name in ("brand", "category", "in_stock", "size"):
            field = next(f for f in FIELDS if f.name == name)
            truth = collections.Counter(v for pid in expected if (v := typed(field, live[pid].attributes.get(name)))
                                        is not None)
            assert store.facets([name], filter=parsed)[name]["values"] == dict(truth), (name, condition)
        edges = [0, 25, 50, 100]
        prices = [p for pid in expected if (p := typed(FIELDS[2], live[pid].attributes.get("price"))) is not None]
        assert store.facets(["price"], filter=parsed, buckets={"price": edges})["price"]["buckets"] == \
            list(np.histogram(prices, bins=edges)[0])
        worded = {h.product_id for h in store.search(None, k=50, filter=parsed, text=word, mode="lexical")}
        in_words = {pid for pid in expected if live[pid].title.startswith(word) or  # title, description
                    word in {live[pid].attributes.get(name) for name in ("brand", "category")}}  # keyword fields
        assert worded == in_words, (word, condition)
    store.close()


def test_invalid_filters_name_the_field_and_the_problem():
    cases = {
        '{"colour": "red"}': "filter.colour: not a filterable field",
        '{"price": {"gte": "ten"}}': 'filter.price.gte: "ten" is not a number (price is float)',
        '{"brand": {"gt": "a"}}': "filter.brand: gt needs a numeric field; brand is keyword",
        '{"in_stock": "yes"}': "filter.in_stock.eq: \"yes\" is not true or false",
        '{"category": {"in": []}}': "filter.category.in: give a non-empty list",
        '{"or": {"brand": "a"}}': "filter.or: give a non-empty list of filters",
        '{"price": {"between": [1, 2]}}': "filter.price: unknown operator 'between'",
        '[]': "filter: a filter is a non-empty object",
        '{"size": {"eq": true}}': "filter.size.eq: true is not a number",
    }
    import json

    for text, message in cases.items():
        with pytest.raises(FilterError) as caught:
            parse_filter(json.loads(text), FIELDS)
        assert message in str(caught.value), (text, str(caught.value))
    deep = {"brand": "a"}
    for _ in range(3000):  # nested thousands deep: refused at the limit, no recursion error
        deep = {"and": [deep]}
    with pytest.raises(FilterError, match="nested deeper than"):
        parse_filter(deep, FIELDS)
    with pytest.raises(FilterError, match="over 256 conditions"):
        parse_filter({"brand": {"in": [str(i) for i in range(300)]}}, FIELDS)


def test_declared_fields_are_checked_and_kept_with_the_index(tmp_path):
    with pytest.raises(ValueError, match="type 'money'"):
        parse_filterable("price:money")
    with pytest.raises(ValueError, match="built in"):
        parse_filterable("shop_id")
    with pytest.raises(ValueError, match="declared twice"):
        parse_filterable("brand,brand:int")
    store = IndexStore(tmp_path, model=MODEL, dim=8, settings=SETTINGS)
    store.close()
    assert IndexStore(tmp_path, read_only=True).settings.filterable == FIELDS  # from the store, not the caller
    with pytest.raises(ValueError, match="filters on brand,category"):
        IndexStore(tmp_path, model=MODEL, dim=8, settings=StoreSettings(filterable=parse_filterable("colour")))


def test_keyword_terms_are_quoted_and_rank_fusion_rewards_agreement():
    assert fts_query('red "shirt" OR title:coat NEAR(x*)') == '"red" OR "shirt" OR "or" OR "title" OR "coat" OR ' \
                                                              '"near" OR "x"'
    assert fts_query("  -- !! ") is None
    vector = [(0.9, 1), (0.8, 2), (0.7, 3)]
    lexical = [(12.0, 3), (11.0, 4)]
    fused = fuse([vector, lexical], (1.0, 1.0), k=60)
    assert [doc for _, doc in fused] == [3, 1, 2, 4]  # in both lists beats first in one
    assert fused[0][0] == pytest.approx(1 / 63 + 1 / 61)
    assert [doc for _, doc in fuse([vector, lexical], (1.0, 0.0))][:3] == [1, 2, 3]  # weight 0: vectors only
    assert [doc for _, doc in fuse([vector, lexical], (0.0, 1.0))][:2] == [3, 4]


def test_keywords_commit_with_vectors_and_leave_with_them(tmp_path):
    store = IndexStore(tmp_path, model=MODEL, dim=8, settings=SETTINGS)
    store.apply([with_attributes(record("p1", 1), {"brand": "Acme"}, "linen shirt"),
                 with_attributes(record("p2", 1), {"brand": "Zeta"}, "wool coat")])
    assert [h.product_id for h in store.search(None, 5, text="shirts", mode="lexical")] == ["p1"]  # stemmed
    assert [h.product_id for h in store.search(None, 5, text="acme", mode="lexical")] == ["p1"]  # a keyword field
    assert [h.product_id for h in store.search(None, 5, text="soft", mode="lexical")] != []  # the description
    store.apply([with_attributes(record("p1", 2), {"brand": "Zeta"}, "wool shirt"), record("p2", 2, "delete")])
    assert store.search(None, 5, text="linen acme", mode="lexical") == []
    assert [h.product_id for h in store.search(None, 5, text="wool", mode="lexical")] == ["p1"]
    (hit,) = store.search(np.array(record("p1", 2).embedding), 1)
    assert hit.attributes == {"brand": "Zeta"} and hit.embedded_at.startswith("2026-11-21") and hit.generation == 2


def sharded_index(tmp_path, records, shards=3) -> ShardedIndex:
    ShardedIndex.ensure_layout(tmp_path, shards, MODEL, 8, SETTINGS)
    writers = [ShardedIndex.open_writer(tmp_path, n, MODEL, 8, SETTINGS) for n in range(shards)]
    for r in records:
        writers[shard_of(r.product_id, shards)].apply([r])
    for w in writers:
        w.close()
    return ShardedIndex.open(tmp_path)


def test_pages_across_shards_equal_pages_of_one_search(tmp_path):
    records = [with_attributes(record(f"p{i}", 1, shop_id=f"shop-{i % 2}"), {"brand": ["acme", "zeta"][i % 3 == 0],
                                                                              "price": float(i)},
                               f"{WORDS[i % 5]} {WORDS[i % 3]} {i}") for i in range(330)]
    index = sharded_index(tmp_path, records)
    query = np.array(records[0].embedding)
    brand = parse_filter({"brand": "acme"}, FIELDS)
    for kwargs in ({}, {"filter": brand}, {"text": "wool shirt", "mode": "hybrid"}, {"text": "coat", "mode": "lexical"}):
        # Hybrid pages of one page size run through one fused list (each list to depth max(100, k)),
        # also past rank 100, where a deeper page would otherwise fuse other lists.
        whole = [h.product_id for h in index.search(query, k=290, exact=True, fusion_window=100, **kwargs)]
        paged = [h.product_id for offset in range(0, 290, 10)
                 for h in index.search(query, k=10, exact=True, offset=offset, **kwargs)][:290]
        assert paged == whole and len(set(whole)) == len(whole), kwargs
        assert len(whole) > 100 or kwargs.get("mode") == "lexical", kwargs
    facets = index.facets(["brand"], filter=parse_filter({"price": {"lt": 30}}, FIELDS))
    assert facets == {"brand": {"values": {"acme": 20, "zeta": 10}}}


def test_similar_products_leave_out_the_product_and_collapse_its_copies(tmp_path):
    base = record("p0", 1, seed=1)
    copies = [dataclasses.replace(record(f"copy{i}", 1, seed=1), title=f"copy {i}") for i in range(6)]
    others = [record(f"p{i}", 1, seed=100 + i) for i in range(1, 30)]
    index = sharded_index(tmp_path, [base, *copies, *others])
    vector = index.product_vector("p0")
    np.testing.assert_allclose(vector, base.embedding)
    hits = index.similar(vector, k=10, exclude="p0")
    ids = [h.product_id for h in hits]
    assert "p0" not in ids and not any(pid.startswith("copy") for pid in ids) and len(ids) == 10
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    everything = index.similar(vector, k=10, exclude="p0", duplicate_cosine=1.01)  # no collapsing
    assert sum(h.product_id.startswith("copy") for h in everything) == 6
    assert index.product_vector("missing") is None


def test_an_attribute_patch_keeps_the_vector_title_and_words_and_changes_what_filters_see(tmp_path):
    store = IndexStore(tmp_path, model=MODEL, dim=8, settings=SETTINGS)
    first = dataclasses.replace(with_attributes(record("p1", 1), {"brand": "acme", "price": 30.0}, "linen shirt"),
                                description="a breathable weave")
    store.apply([first, with_attributes(record("p2", 1), {"brand": "zeta"}, "wool coat")])
    patch = dataclasses.replace(record("p1", 2, "delete"), op="patch", attributes={"brand": "zeta", "price": 9.5})
    result = store.apply([patch])
    assert (result.upserted, result.refused) == (1, [])
    (hit,) = store.search(np.array(first.embedding), k=1)
    assert (hit.product_id, hit.version, hit.title, hit.score) == ("p1", 2, "linen shirt", pytest.approx(1.0))
    assert hit.attributes == {"brand": "zeta", "price": 9.5}
    cheap_zeta = parse_filter({"brand": "zeta", "price": {"lt": 10}}, FIELDS)
    assert [h.product_id for h in store.search(np.array(first.embedding), k=5, exact=True, filter=cheap_zeta)] == ["p1"]
    assert store.search(np.array(first.embedding), k=5, filter=parse_filter({"brand": "acme"}, FIELDS)) == []
    assert [h.product_id for h in store.search(None, 5, text="breathable", mode="lexical")] == ["p1"]  # description kept
    assert store.apply([dataclasses.replace(patch, version=1)]).ignored == 1  # older: a no-op
    missing = store.apply([dataclasses.replace(patch, product_id="p9")])
    assert "no live vector" in missing.refused[0][1]
    both = store.apply([with_attributes(record("p3", 1), {"brand": "acme"}, "boot"),
                        dataclasses.replace(patch, product_id="p3", version=2)])  # one commit: upsert, then patch
    assert both.upserted == 2 and store.facets(["brand"])["brand"]["values"] == {"zeta": 3}
    store.close()
    assert IndexStore(tmp_path, read_only=True).facets(["brand"])["brand"]["values"] == {"zeta": 3}
