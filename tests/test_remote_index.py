"""An index on object storage: every commit shipped, readers replaying it, snapshots pruning, restarts,
a failed upload retried in order, a second writer refused, and the index pipeline writing there."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage
from pipelines import index
from search import mirror
from search.mirror import CommitConflict, ShardPublisher
from search.sharded import ShardedIndex, ShardWriter
from search.server import open_service
from tests.conftest import TINY_CLIP
from tests.support.index_helpers import live_truth, record
from tests.support.object_store import SCHEME, MemoryObjectStore

DIM = 8
REMOTE = f"{SCHEME}://bucket/index"


@pytest.fixture(autouse=True)
def store():
    MemoryObjectStore.reset()
    yield MemoryObjectStore
    MemoryObjectStore.reset()


def writer(tmp_path, name="writer", snapshot_every=500, shard=0):
    ShardedIndex.ensure_layout(REMOTE, 1, "test-model", DIM)
    return ShardedIndex.open_writer(REMOTE, shard, "test-model", DIM, cache_dir=tmp_path / name,
                                    snapshot_every=snapshot_every)


def reader_truth(reader: ShardedIndex) -> dict:
    (shard,) = reader.shards
    return shard.live_products()


def test_a_reader_replays_every_commit_and_search_agrees(tmp_path):
    w = writer(tmp_path)
    first = [record(f"p{i}", 1, dim=DIM) for i in range(20)]
    w.apply(first)
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    assert reader_truth(reader) == live_truth(first) and reader.model == "test-model"

    later = [record("p3", 2, dim=DIM), record("p4", 2, "delete", dim=DIM), record("p5", 0, dim=DIM)]
    w.apply(later)
    assert reader_truth(reader) == live_truth(first)  # not before a refresh
    assert reader.refresh()
    assert reader_truth(reader) == live_truth(first + later)
    (top,) = reader.search(np.array(later[0].embedding), k=1)
    assert (top.product_id, top.version) == ("p3", 2)
    assert "p4" not in {hit.product_id for hit in reader.search(np.array(first[4].embedding), k=20)}
    assert not reader.refresh()  # nothing new


def test_compaction_and_snapshots_prune_what_no_commit_names_and_new_readers_start_from_them(tmp_path, monkeypatch):
    monkeypatch.setattr(mirror, "SEGMENT_GRACE_SECS", 0)  # see the test after this one
    rng = random.Random(7)
    w = writer(tmp_path, snapshot_every=3)
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "early-reader")
    records = []
    for step in range(12):
        batch = [record(f"p{rng.randrange(40)}", step + 1, rng.choice(["upsert", "upsert", "delete"]), dim=DIM)
                 for _ in range(15)]
        records += batch
        w.apply(batch)
        if step % 4 == 3:
            assert w.compact(force=True)
        reader.refresh()
        assert reader_truth(reader) == live_truth(records), step
    names = set(MemoryObjectStore.objects)
    commits = sorted(n for n in names if "/commits/" in n)
    snapshots = sorted(n for n in names if "/snapshots/" in n)
    assert len(snapshots) == 2  # the newest and the one before it
    assert all(int(c.rsplit("/", 1)[1].split(".")[0]) > int(snapshots[-1].rsplit("/", 1)[1].split(".")[0])
               for c in commits)
    live_segments = {s["name"] for s in w.stats()["segments"]}
    remote_segments = {n.rsplit("/", 1)[1].split(".")[0] for n in names if "/seg-" in n}
    assert remote_segments == live_segments
    fresh = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "late-reader")
    assert reader_truth(fresh) == live_truth(records)
    query = records[-1].embedding if len(records[-1].embedding) else records[0].embedding
    assert [h.product_id for h in fresh.search(query, k=5, exact=True)] == \
           [h.product_id for h in w.search(query, k=5, exact=True)]


def test_a_restarted_writer_continues_from_the_remote_and_reuses_a_current_local_copy(tmp_path, store):
    w = writer(tmp_path, snapshot_every=2)
    records = [record(f"p{i}", 1, dim=DIM) for i in range(10)]
    for chunk in (records[:5], records[5:]):
        w.apply(chunk)
    generation = w.generation
    w.close()
    store.opened.clear()
    again = writer(tmp_path)  # same cache directory, at the remote's generation: nothing downloaded
    assert store.opened == [f"{REMOTE}/index.json"] and again.generation == generation
    again.close()
    elsewhere = writer(tmp_path, name="new-machine")  # an empty cache: restored from the remote
    assert elsewhere.generation == generation and elsewhere.live_products() == live_truth(records)
    elsewhere.apply([record("p0", 2, "delete", dim=DIM)])
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    assert set(reader_truth(reader)) == {f"p{i}" for i in range(1, 10)}


def test_a_commit_that_failed_to_ship_is_shipped_first_next_time(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w.apply([record("a", 1, dim=DIM)])
    real_create = storage.create_only
    failures = iter([True])

    def flaky(path, data):
        if "/commits/" in str(path) and next(failures, False):
            raise OSError("503 from the object store")
        real_create(path, data)

    monkeypatch.setattr(storage, "create_only", flaky)
    with pytest.raises(OSError, match="503"):
        w.apply([record("b", 1, dim=DIM)])  # committed locally, not shipped: Beam retries the bundle
    w.apply([record("b", 1, dim=DIM), record("c", 1, dim=DIM)])  # the retry: b is a repeat, c is new
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    assert set(reader_truth(reader)) == {"a", "b", "c"}


def test_pruning_spares_young_segments_another_writer_may_be_about_to_commit(tmp_path):
    w = writer(tmp_path, snapshot_every=1)
    in_flight = f"{REMOTE}/shard-000/seg-{time.time_ns():020d}-abcdef.ids.npy"  # uploaded, commit to come
    stale = f"{REMOTE}/shard-000/seg-{time.time_ns() - 3600 * 10**9:020d}-abcdef.ids.npy"
    MemoryObjectStore.objects.update({in_flight: b"x", stale: b"x"})
    w.apply([record("a", 1, dim=DIM)])  # commits and snapshots, which prunes
    assert in_flight in MemoryObjectStore.objects and stale not in MemoryObjectStore.objects


def test_a_second_writer_of_a_shard_loses_the_generation_not_its_batch(tmp_path):
    first = writer(tmp_path, name="one")
    second = writer(tmp_path, name="two")
    first.apply([record("a", 1, dim=DIM)])
    with pytest.raises(CommitConflict, match="another process is writing"):
        second.apply([record("b", 1, dim=DIM)])  # a bare store: refused, and fenced from then on
    with pytest.raises(CommitConflict):
        second.apply([record("c", 1, dim=DIM)])
    fenced = ShardWriter(REMOTE, 0, "test-model", DIM, cache_dir=tmp_path / "three")
    first.apply([record("d", 1, dim=DIM)])
    fenced.apply([record("b", 1, dim=DIM)])  # loses generation 3, restores, applies again on top
    assert fenced.conflicts == 1
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    assert set(reader_truth(reader)) == {"a", "b", "d"}


racing_ops = st.tuples(st.integers(0, 1), st.lists(st.tuples(
    st.sampled_from(["p0", "p1", "p2", "p3", "p4"]), st.integers(0, 6), st.sampled_from(["upsert", "upsert", "delete"])),
    min_size=1, max_size=6), st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(racing_ops, min_size=1, max_size=10))
def test_two_writers_racing_for_a_shard_never_both_commit_a_generation_and_lose_nothing(tmp_path_factory, steps):
    """Two fenced writers of one shard, taking turns in any order, committing and compacting: every
    generation on the remote is created once, by whichever got there first, the winner's local store
    is then exactly the remote's state, and the end state is last-writer-wins over all input."""
    MemoryObjectStore.reset()
    base = tmp_path_factory.mktemp("race")
    ShardedIndex.ensure_layout(REMOTE, 1, "test-model", DIM)
    writers = [ShardWriter(REMOTE, 0, "test-model", DIM, cache_dir=base / f"writer-{n}") for n in (0, 1)]
    created = []
    original = MemoryObjectStore.create_only

    def counted(self, path, data):
        original(self, path, data)
        created.append(path)

    MemoryObjectStore.create_only = counted
    try:
        applied = []
        for who, ops, compact in steps:
            batch = [record(pid, version, op, dim=DIM) for pid, version, op in ops]
            applied += batch
            writers[who].apply(batch)
            if compact:
                try:
                    writers[who].store.compact(force=True)
                except CommitConflict:
                    pass  # the other writer moved on meanwhile: its next apply restores
            winner = writers[who].store
            reader = ShardedIndex.open(REMOTE, cache_dir=base / f"reader-{len(created)}")
            if reader.shards[0].generation == winner.generation:
                assert reader_truth(reader) == winner.live_products()
        commits = [path for path in created if "/commits/" in path]
        assert len(commits) == len(set(commits))
        remote = sorted(path for path in MemoryObjectStore.objects if "/commits/" in path)
        assert sorted(commits) == remote  # each one created once, none overwritten
        final = ShardedIndex.open(REMOTE, cache_dir=base / "final")
        assert reader_truth(final) == live_truth(applied)
        if len({who for who, _, _ in steps}) == 2 and any(a != b for (a, *_), (b, *_) in zip(steps, steps[1:])):
            assert sum(w.conflicts for w in writers) > 0  # they did race
    finally:
        MemoryObjectStore.create_only = original


def test_a_writer_killed_between_its_segments_and_its_commit_leaves_the_previous_generation(tmp_path, monkeypatch):
    w = writer(tmp_path)
    first = [record(f"p{i}", 1, dim=DIM) for i in range(10)]
    w.apply(first)

    def killed(self, delta):
        raise KeyboardInterrupt("killed")  # the process dies before the commit object is created

    monkeypatch.setattr(ShardPublisher, "_ship", killed)
    with pytest.raises(KeyboardInterrupt):
        w.apply([record(f"q{i}", 1, dim=DIM) for i in range(10)])
    commits = [p for p in MemoryObjectStore.objects if "/commits/" in p]
    segments = {p.rsplit("/", 1)[1].split(".")[0] for p in MemoryObjectStore.objects if "/seg-" in p}
    assert len(segments) == 2 and len(commits) == 1  # the new segment is there, its commit is not
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    assert reader.shards[0].generation == 1 and reader_truth(reader) == live_truth(first)
    (top,) = reader.search(np.array(first[3].embedding), k=1)
    assert top.product_id == "p3"


def test_the_index_pipeline_and_the_search_service_work_on_a_remote_index(tmp_path):
    records = [record(f"p{i}", 1, dim=64, model=TINY_CLIP, shop_id=f"s{i % 2}") for i in range(30)]
    records += [record(f"p{i}", 2, "delete", dim=64, model=TINY_CLIP) for i in range(0, 30, 4)]
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in records) + "\n")
    remote = f"{SCHEME}://bucket/pipeline-index"
    index.run(["--input_dir", str(tmp_path / "embeddings"), "--index_dir", remote, "--model", TINY_CLIP,
               "--num_shards", "2", "--cache_dir", str(tmp_path / "worker-cache")])
    assert json.loads(MemoryObjectStore.objects[f"{remote}/index.json"]) == {"num_shards": 2, "model": TINY_CLIP,
                                                                             "dim": 64, "segment_kind": "hnsw",
                                                                             "filterable": []}
    served, embedder = open_service(remote, device="cpu", cache_dir=str(tmp_path / "service-cache"))
    live = {}
    for shard in served.shards:
        live.update(shard.live_products())
    assert live == live_truth(records)
    assert served.search(embedder.text("a shirt"), k=40, shop_id="s1")


def test_a_reader_keeps_serving_while_the_object_store_is_unreachable(tmp_path, monkeypatch):
    w = writer(tmp_path)
    w.apply([record("a", 1, dim=DIM)])
    reader = ShardedIndex.open(REMOTE, cache_dir=tmp_path / "reader")
    w.apply([record("b", 1, dim=DIM)])

    def unreachable(*_args, **_kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(MemoryObjectStore, "_list", unreachable)
    assert not reader.refresh() and set(reader_truth(reader)) == {"a"}
    monkeypatch.undo()
    assert reader.refresh() and set(reader_truth(reader)) == {"a", "b"}
