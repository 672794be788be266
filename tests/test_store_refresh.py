"""A reader moves to new commits by applying their changes, and ends where a fresh open would."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.fields import parse_filterable
from search.filters import parse_filter
from search.merge_policy import MergePolicy
from search.segment import SEGMENT_KINDS, Segment, SegmentParams
from search.store import IndexStore, StoreSettings
from search.index.catalog import CHANGES_KEPT
from tests.support.index_helpers import MODEL, record

FIELDS = parse_filterable("brand,price:float,in_stock:bool")


def settings_of(kind: str) -> StoreSettings:
    return StoreSettings(segment=SegmentParams(kind, m=8, ivf_min=2), filterable=FIELDS, exact_below=0,
                         graph_step_cost=0,
                         merge=MergePolicy(delta_limit=6, max_delta_segments=3, max_built_segments=2))


def with_attributes(r, n: int):
    return dataclasses.replace(r, attributes={"brand": ["acme", "kestrel", "café"][n % 3], "price": float(n % 7),
                                              "in_stock": n % 2 == 0})


def field_pairs(index) -> list:
    """A field index as (value, doc) pairs: keyword codes differ between readers, values do not."""
    return sorted((index.label(v), int(d)) for v, d in zip(*index.items()))


def where(view, docs):
    """The positions of `docs` in each of the view's segments (None: every live doc)."""
    return None if docs is None else [seg.locate(docs)[1] for seg in view.segments]


def assert_same_view(applied: IndexStore, fresh: IndexStore) -> None:
    a, b = applied._view, fresh._view
    assert (a.generation, a.next_doc) == (b.generation, b.next_doc)
    assert [s.info for s in a.segments] == [s.info for s in b.segments]
    for seg in b.segments:
        assert np.array_equal(a.live[seg.info.name], b.live[seg.info.name]), seg.info
        assert a.live_count[seg.info.name] == b.live_count[seg.info.name]
    assert field_pairs(a.shops) == field_pairs(b.shops)
    for shop in ("shop-a", "shop-b", "shop-c"):
        assert np.array_equal(a.shop_docs(shop), b.shop_docs(shop))
    for name, index in b.fields.items():
        assert field_pairs(a.fields[name]) == field_pairs(index), name
        for shop in (None, "shop-a"):
            docs = None if shop is None else b.shop_docs(shop)
            assert a.fields[name].counts(where(a, docs)) == index.counts(where(b, docs))
    assert applied.facets(["brand", "in_stock"], filter=parse_filter({"price": {"gte": 2}}, FIELDS)) == \
        fresh.facets(["brand", "in_stock"], filter=parse_filter({"price": {"gte": 2}}, FIELDS))
    for seed in range(3):
        query = np.array(record("q", seed, seed=seed).embedding)
        for shop in (None, "shop-b"):
            assert [(h.product_id, h.version) for h in applied.search(query, k=8, ef_search=64, shop_id=shop)] == \
                [(h.product_id, h.version) for h in fresh.search(query, k=8, ef_search=64, shop_id=shop)]


steps = st.lists(st.tuples(
    st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5", "p6"]),
    st.integers(min_value=0, max_value=8),
    st.sampled_from(["upsert", "upsert", "delete", "patch"]),
    st.sampled_from(["shop-a", "shop-b"]),
), min_size=1, max_size=6)


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commits=st.lists(st.tuples(steps, st.sampled_from(["none", "none", "plan", "force", "restart"]),
                                  st.booleans()), min_size=1, max_size=12))
def test_a_reader_that_applies_each_commit_equals_a_fresh_open(tmp_path_factory, kind, commits):
    """Upserts, deletes and patches with filterable attributes, merges (planned or forced) and writer
    restarts; the reader refreshes after some commits and not others, so it applies one or several."""
    directory = tmp_path_factory.mktemp("store")
    writer = IndexStore(directory, model=MODEL, dim=8, settings=settings_of(kind))
    reader = IndexStore(directory, read_only=True)
    n = 0
    for batch, then, refresh_now in commits:
        records = []
        for pid, version, op, shop in batch:
            n += 1
            records.append(with_attributes(record(pid, version, op, shop_id=shop), n))
        writer.apply(records)
        if then == "plan":
            writer.compact()
        elif then == "force":
            writer.compact(force=True)
        elif then == "restart":
            writer.close()
            writer = IndexStore(directory, model=MODEL, dim=8, settings=settings_of(kind))
        if refresh_now:
            reader.refresh()
            fresh = IndexStore(directory, read_only=True)
            assert_same_view(reader, fresh)
            fresh.close()
    reader.refresh()
    assert_same_view(reader, IndexStore(directory, read_only=True))
    writer.close()


def test_a_reader_applies_commits_and_merges_it_has_seen_without_reading_the_shard_again(tmp_path, monkeypatch):
    writer = IndexStore(tmp_path, model=MODEL, dim=8, settings=settings_of("hnsw"))
    reader = IndexStore(tmp_path, read_only=True)
    full_loads = []
    load = reader._reader.load
    monkeypatch.setattr(reader._reader, "load", lambda *a, **k: full_loads.append(1) or load(*a, **k))
    for n in range(10):
        writer.apply([with_attributes(record(f"p{n % 4}", n), n)])
        assert reader.refresh()
    writer.compact(force=True)  # the merge of segments the reader holds: applied too
    assert reader.refresh() and not full_loads
    assert_same_view(reader, IndexStore(tmp_path, read_only=True))
    # Further behind than the change log reaches: the reader loads the store anew, and is right.
    for n in range(CHANGES_KEPT + 1):
        writer.apply([with_attributes(record(f"p{n % 4}", 100 + n), n)])
    assert reader.refresh() and full_loads == [1]
    assert_same_view(reader, IndexStore(tmp_path, read_only=True))


def test_docs_that_die_while_a_merge_builds_stay_dead_for_the_writer_and_every_reader(tmp_path, monkeypatch):
    writer = IndexStore(tmp_path, model=MODEL, dim=8, settings=settings_of("hnsw"))
    reader = IndexStore(tmp_path, read_only=True)
    for n in range(3):
        writer.apply([with_attributes(record(f"p{n}-{i}", 1), i) for i in range(4)])
    reader.refresh()
    write = Segment.write

    def a_delete_lands_during_the_build(*args, **kwargs):
        monkeypatch.setattr(Segment, "write", write)
        writer.apply([record("p1-2", 2, "delete")])  # commits while the merge's input is read
        return write(*args, **kwargs)

    monkeypatch.setattr(Segment, "write", a_delete_lands_during_the_build)
    assert writer.compact(force=True)
    reader.refresh()
    for store in (writer, reader, IndexStore(tmp_path, read_only=True)):
        assert "p1-2" not in store.live_products()
        assert store.stats()["live_docs"] == 11
        query = np.array(record("p1-2", 1).embedding)
        assert "p1-2" not in [hit.product_id for hit in store.search(query, k=12, ef_search=64)]
    assert_same_view(reader, IndexStore(tmp_path, read_only=True))
    assert_same_view(writer, IndexStore(tmp_path, read_only=True))


def test_a_readers_connections_are_closed_when_their_threads_end(tmp_path):
    """A server's worker threads come and go; each one's SQLite connection must not outlive it."""
    writer = IndexStore(tmp_path, model=MODEL, dim=8, settings=settings_of("hnsw"))
    writer.apply([with_attributes(record("p0", 1), 0)])
    reader = IndexStore(tmp_path, read_only=True)
    for _ in range(20):
        thread = threading.Thread(target=reader.live_products)
        thread.start()
        thread.join()
    assert reader.live_products() == {"p0": (1, "shop-a")}
    assert len(reader._catalog._connections) <= 2  # this thread's, and the last ended thread's
    reader.close()
    writer.close()
