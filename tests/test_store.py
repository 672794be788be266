"""The index store: last writer wins, tombstones, compaction, shop scoping, refusals, readers."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import recall
from search.sharded import ShardedIndex, shard_of
from search.merge_policy import MergePolicy
from search.segment import SEGMENT_KINDS, SegmentParams
from search.store import IndexMismatch, IndexStore, StoreSettings
from tests.support.index_helpers import MODEL, last_writer_wins, live_truth, record

SMALL = StoreSettings(merge=MergePolicy(delta_limit=6, max_delta_segments=3, max_built_segments=2, tombstone_ratio=0.3),
                      exact_below=0, graph_step_cost=0)


def of_kind(settings: StoreSettings, kind: str) -> StoreSettings:
    """`settings` building `kind` segments; ivf_pq from 2 vectors on, so the tiny tests train it too."""
    return dataclasses.replace(settings, segment=SegmentParams(kind, m=8, ivf_min=2))


def new_store(path, **kwargs) -> IndexStore:
    return IndexStore(path, model=MODEL, dim=8, settings=kwargs.pop("settings", SMALL), **kwargs)


def assert_equals_truth(store: IndexStore, records) -> None:
    truth = last_writer_wins(records)
    assert store.live_products() == live_truth(records)
    live = {pid: r for pid, r in truth.items() if r.op == "upsert"}
    every_vector = {r.embedding.tobytes(): r.embedding for r in records if r.op == "upsert"}.values()
    for vector in every_vector:
        for exact in (True, False):
            hits = store.search(np.array(vector), k=len(truth) + 5, ef_search=64, exact=exact)
            for hit in hits:  # never a deleted product, never a stale version
                assert hit.product_id in live and hit.version == live[hit.product_id].version
            if exact:
                assert sorted(h.product_id for h in hits) == sorted(live)
    for pid, r in live.items():  # each live product is found by its own current vector
        (top,) = store.search(np.array(r.embedding), k=1, exact=True)
        assert top.product_id == pid and top.score == pytest.approx(1.0, abs=1e-5)
    # Scoped to a shop (postings maintained at commit): exactly that shop's live products, each
    # found by its own vector, whether the shop is searched exactly or through its bitmaps.
    for shop in ("shop-a", "shop-b", "shop-none"):
        in_shop = {pid for pid, r in live.items() if r.shop_id == shop}
        for vector in every_vector:
            hits = store.search(np.array(vector), k=len(truth) + 5, ef_search=64, shop_id=shop)
            assert {h.product_id for h in hits} <= in_shop and all(h.shop_id == shop for h in hits)
        for pid in in_shop:
            (top,) = store.search(np.array(live[pid].embedding), k=1, ef_search=64, shop_id=shop)
            assert top.product_id == pid


ops = st.tuples(
    st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5"]),
    st.integers(min_value=0, max_value=6),
    st.sampled_from(["upsert", "upsert", "delete"]),
    st.sampled_from(["shop-a", "shop-b"]),
)


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
@pytest.mark.parametrize("exact_below", [0, 1000], ids=["shops-by-bitmap", "shops-exactly"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(ops, min_size=1, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6),
       compact_after=st.sets(st.integers(0, 7)), data=st.data())
def test_random_streams_equal_last_writer_wins(tmp_path_factory, kind, exact_below, stream, cuts, compact_after, data):
    """Upserts, deletes, duplicates and reordered versions, random commit points and compactions, for
    every segment kind; shops searched through their bitmaps (exact_below 0) or exactly over their postings."""
    records = [record(pid, version, op, shop_id=shop) for pid, version, op, shop in stream]
    records += data.draw(st.lists(st.sampled_from(records), max_size=5))  # redeliveries
    store = new_store(tmp_path_factory.mktemp("store"),
                      settings=of_kind(dataclasses.replace(SMALL, exact_below=exact_below, graph_step_cost=15.0 if exact_below else 0), kind))
    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        store.apply(records[start:end])
        if n in compact_after:
            store.compact(force=data.draw(st.booleans()))
        assert_equals_truth(store, records[:end])
    store.compact(force=True)
    assert_equals_truth(store, records)
    reopened = IndexStore(store.directory, read_only=True)
    assert_equals_truth(reopened, records)


def test_older_and_repeated_versions_are_no_ops(tmp_path):
    store = new_store(tmp_path)
    assert store.apply([record("p", 5)]).upserted == 1
    result = store.apply([record("p", 5, seed=1), record("p", 4), record("p", 3, "delete")])
    assert (result.upserted, result.deleted, result.ignored) == (0, 0, 3)
    assert store.live_products() == {"p": (5, "shop-a")}


def test_a_delete_remembers_its_version_so_a_late_older_upsert_stays_out(tmp_path):
    store = new_store(tmp_path)
    store.apply([record("p", 7, "delete")])
    store.apply([record("p", 6)])
    assert store.live_products() == {}
    store.apply([record("p", 8)])
    assert store.live_products() == {"p": (8, "shop-a")}


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
def test_a_shop_scoped_query_never_returns_another_shops_product(tmp_path, kind):
    store = new_store(tmp_path, settings=of_kind(StoreSettings(merge=MergePolicy(delta_limit=50), exact_below=0, graph_step_cost=0), kind))
    records = [record(f"p{i}", 1, shop_id=f"shop-{i % 3}", seed=i) for i in range(150)]
    store.apply(records[:100])
    store.compact(force=True)
    store.apply(records[100:])
    for shop in ("shop-0", "shop-1", "shop-2"):
        for r in records[:20]:
            hits = store.search(np.array(r.embedding), k=30, ef_search=64, shop_id=shop)
            assert hits and all(h.shop_id == shop for h in hits)
    # A product that moves shop moves with its new version only.
    store.apply([record("p0", 2, shop_id="shop-2", seed=999)])
    assert all(h.product_id != "p0" for h in store.search(np.array(records[0].embedding), k=150, shop_id="shop-0"))
    assert store.search(np.array(records[0].embedding), k=5, shop_id="no-such-shop") == []


def test_records_of_another_model_or_dimension_are_refused_not_mixed(tmp_path):
    store = new_store(tmp_path)
    result = store.apply([record("a", 1), record("b", 1, model="other-model"), record("c", 1, dim=16)])
    assert result.upserted == 1 and [r.product_id for r, _ in result.refused] == ["b", "c"]
    assert "other-model" in result.refused[0][1] and "16-d" in result.refused[1][1]
    assert store.live_products() == {"a": (1, "shop-a")}
    with pytest.raises(IndexMismatch):
        store.search(np.zeros(4), k=1)
    store.close()
    with pytest.raises(IndexMismatch):
        IndexStore(tmp_path, model="other-model", dim=8)


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
def test_k_and_ef_search_are_independent(tmp_path, kind):
    store = new_store(tmp_path, settings=of_kind(StoreSettings(merge=MergePolicy(delta_limit=10), exact_below=0, graph_step_cost=0), kind))
    store.apply([record(f"p{i}", 1, seed=i) for i in range(200)])
    store.compact(force=True)
    query = np.array(record("p3", 1, seed=3).embedding)
    assert len(store.search(query, k=50, ef_search=10)) == 50
    assert len(store.search(query, k=5, ef_search=400)) == 5


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
def test_compaction_drops_tombstones_and_keeps_results(tmp_path, kind):
    store = new_store(tmp_path, settings=of_kind(StoreSettings(merge=MergePolicy(delta_limit=10), exact_below=0, graph_step_cost=0), kind))
    store.apply([record(f"p{i}", 1, seed=i) for i in range(30)])
    store.apply([record(f"p{i}", 2, "delete") for i in range(0, 30, 2)])
    assert store.compaction_plan()
    assert store.compact()
    (segment,) = store.stats()["segments"]
    assert segment["kind"] == kind and segment["count"] == segment["live"] == 15
    assert not store.compact()
    files = {p.name.split(".")[0] for p in tmp_path.glob("seg-*")}
    assert files == {segment["name"]}


def test_a_reader_picks_up_commits_of_the_writer(tmp_path):
    writer = new_store(tmp_path)
    reader = IndexStore(tmp_path, read_only=True)
    assert not reader.refresh()
    writer.apply([record("p", 1)])
    assert reader.live_products() == {"p": (1, "shop-a")} and reader.refresh()
    assert [h.product_id for h in reader.search(np.array(record("p", 1).embedding), k=1)] == ["p"]
    writer.apply([record("p", 2, "delete")])
    writer.compact(force=True)
    assert reader.refresh()
    assert reader.search(np.array(record("p", 1).embedding), k=1) == []


def test_one_writer_per_store(tmp_path):
    writer = new_store(tmp_path)
    with pytest.raises(RuntimeError, match="another process is writing"):
        new_store(tmp_path)
    IndexStore(tmp_path, read_only=True)  # readers are fine
    writer.close()
    new_store(tmp_path)  # and the lock goes with its writer


def test_recall_cli_reports_the_distribution_and_writes_json_and_a_plot(tmp_path):
    ShardedIndex.ensure_layout(tmp_path, 2, MODEL, 8)
    writer = ShardedIndex.open(tmp_path, read_only=False, settings=StoreSettings(exact_below=0, graph_step_cost=0))
    records = [record(f"p{i}", 1, seed=i) for i in range(300)]
    for n, shard in enumerate(writer.shards):
        shard.apply([r for r in records if shard_of(r.product_id, 2) == n])
        shard.compact(force=True)
    report = recall.main(["--index_dir", str(tmp_path), "--k", "10", "--ef_search", "10,200", "--queries", "40"])
    low, high = report["by_ef_search"]
    assert {"mean", "median", "std", "min", "p50_ms", "p99_ms"} <= set(high)
    assert high["mean"] >= low["mean"] and high["min"] >= 0.9
    assert json.loads((tmp_path / "recall.json").read_text())["k"] == 10
    assert (tmp_path / "recall.png").stat().st_size > 10_000


@pytest.mark.parametrize("kind", ("flat",) + SEGMENT_KINDS)
def test_segment_vectors_are_held_once_memory_mapped_after_their_checksum(tmp_path, kind):
    """The float vectors are a read-only memory map of the verified file (page cache, not the
    process's own memory); a segment's FAISS index holds the only in-memory copy, its own."""
    from search.segment import Segment, SegmentCorrupted

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    info = Segment.write(tmp_path, "seg", np.arange(50), vectors, kind, SegmentParams(m=8, ivf_min=2))
    segment = Segment(tmp_path, info)
    assert isinstance(segment.vectors, np.memmap) and not segment.vectors.flags.writeable
    np.testing.assert_array_equal(segment.vectors, vectors)
    assert (segment.index is not None) == (kind != "flat")
    for path in sorted(tmp_path.glob("seg.*[!n]")):  # every file but the checksums (.json)
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(SegmentCorrupted):
            Segment(tmp_path, info)
        data[-5] ^= 1
        path.write_bytes(bytes(data))


def test_compressed_segments_are_smaller_and_rank_their_candidates_by_the_float_scores(tmp_path):
    """hnsw_sq8 and ivf_pq hold a fraction of the float index's bytes, and what they return is
    re-scored with the float vectors: each score is the exact inner product, recall stays high."""
    from bench.index import embedding_like
    from search.segment import Segment

    data = embedding_like(10_050, 128, clusters=40)
    vectors, queries = data[:10_000], data[10_000:]
    ids = np.arange(10_000) * 7 + 3  # doc ids are not positions
    every = np.packbits(np.ones(10_000, bool), bitorder="little")
    truth = [set(np.argsort(-(vectors @ q))[:10]) for q in queries]
    sizes = {}
    for kind in SEGMENT_KINDS:
        info = Segment.write(tmp_path, f"seg-{kind}", ids, vectors, kind, SegmentParams(kind))
        segment = Segment(tmp_path, info)
        sizes[kind] = sum(p.stat().st_size for p in tmp_path.glob(f"seg-{kind}.*") if p.suffix in (".hnsw", ".faiss"))
        found = []
        for q in queries:
            scores, docs = segment.search_bitmap(q, 10, 128, every, 10_000)
            np.testing.assert_allclose(scores, vectors[(docs - 3) // 7] @ q, rtol=1e-5)
            assert list(scores) == sorted(scores, reverse=True)
            found.append(set((docs - 3) // 7))
        recall = np.mean([len(t & f) / 10 for t, f in zip(truth, found)])
        assert recall >= 0.95, (kind, recall)
    assert sizes["hnsw_sq8"] < 0.5 * sizes["hnsw"] and sizes["ivf_pq"] < 0.15 * sizes["hnsw"], sizes


HUGE_PAGES_PROBE = """
import json, sys
from pathlib import Path

import faiss

from search import hugepages
from search.segment import Segment, SegmentInfo

advise_index, calls = hugepages.advise_index, []
hugepages.advise_index = lambda index: calls.append(index) or 0
segment = Segment(Path(sys.argv[1]), SegmentInfo("seg", sys.argv[2], 20_000))
codes = faiss.downcast_index(segment.index.storage).codes
before = hugepages.huge_bytes(int(codes.data()), codes.size())
advised = advise_index(segment.index)
print(json.dumps({"calls": len(calls), "codes": codes.size(), "before": before, "advised": advised,
                  "after": hugepages.huge_bytes(int(codes.data()), codes.size())}))
"""


@pytest.mark.parametrize("kind", ("hnsw", "hnsw_sq8"))
def test_a_loaded_hnsw_segment_puts_its_graph_and_codes_on_huge_pages(tmp_path, kind):
    """Loading an HNSW segment advises its codes and graph onto 2 MB pages (search.hugepages): in a
    fresh process on this machine (THP mode madvise) they are on small pages before and huge ones
    after; search results are what they were."""
    import subprocess
    import sys

    from search import hugepages
    from search.segment import Segment

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(20_000, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    info = Segment.write(tmp_path, "seg", np.arange(20_000), vectors, kind, SegmentParams(kind, m=8, ef_construction=40))
    probe = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE, str(tmp_path), kind], capture_output=True,
                           text=True, check=True)
    found = json.loads(probe.stdout)
    assert found["calls"] == 1 and found["before"] == 0, found
    if "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        assert found["after"] >= found["codes"] - 2 * hugepages.HUGE <= found["advised"], found
    segment = Segment(tmp_path, info)
    every = np.packbits(np.ones(20_000, bool), bitorder="little")
    scores, docs = segment.search_bitmap(vectors[7], 5, 64, every, 20_000)
    assert docs[0] == 7 and scores[0] == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("kind", ("hnsw", "hnsw_sq8"))
def test_a_scope_whose_widened_beam_costs_more_than_its_rows_is_scored_exactly(tmp_path, kind, monkeypatch):
    """A shop too large for `exact_below` is still scored exactly when the graph's beam, widened by the
    inverse of the shop's share, would cost more steps than the shop has rows; a large share at a small
    k goes through the graph. Either way the answer is the shop's own top k."""
    from search.segment import Segment

    settings = of_kind(StoreSettings(exact_below=100), kind)
    store = new_store(tmp_path, settings=settings)
    store.apply([record(f"p{i}", 1, shop_id="small" if i < 500 else "large", seed=i) for i in range(5_000)])
    store.compact(force=True)
    assert [s["kind"] for s in store.stats()["segments"]] == [kind]
    graph_searches = []
    search_bitmap = Segment.search_bitmap
    monkeypatch.setattr(Segment, "search_bitmap",
                        lambda self, *a, **kw: graph_searches.append(a[1]) or search_bitmap(self, *a, **kw))
    query = record("q", 1, seed=99_999).embedding
    for shop, k, ef_search, by_graph in (("small", 100, 16, False), ("large", 10, 16, True)):
        graph_searches.clear()
        found = store.search_ids(query, k, ef_search, shop)
        assert bool(graph_searches) == by_graph, (shop, k)
        exact = store.search_ids(query, k, ef_search, shop, exact=True)
        assert {doc for _, doc in found} == {doc for _, doc in exact} or by_graph
        assert len(found) == k
    off = new_store(tmp_path / "off", settings=dataclasses.replace(settings, graph_step_cost=0))
    off.apply([record(f"p{i}", 1, shop_id="small" if i < 500 else "large", seed=i) for i in range(5_000)])
    off.compact(force=True)
    graph_searches.clear()
    off.search_ids(query, 100, 16, "small")
    assert graph_searches  # with the cost rule off, only exact_below decides: 500 docs go through the graph
