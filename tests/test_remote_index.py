"""An index on object storage: every commit shipped, readers replaying it, snapshots pruning, restarts,
a failed upload retried in order, a second writer refused, and the index pipeline writing there."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import storage
from pipelines import index
from search.sharded import ShardedIndex
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


def test_compaction_and_snapshots_prune_what_no_commit_names_and_new_readers_start_from_them(tmp_path):
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


def test_a_second_writer_on_the_same_shard_is_refused(tmp_path):
    first = writer(tmp_path, name="one")
    second = writer(tmp_path, name="two")
    first.apply([record("a", 1, dim=DIM)])
    with pytest.raises(RuntimeError, match="another process is writing"):
        second.apply([record("b", 1, dim=DIM)])


def test_the_index_pipeline_and_the_search_service_work_on_a_remote_index(tmp_path):
    records = [record(f"p{i}", 1, dim=64, model=TINY_CLIP, shop_id=f"s{i % 2}") for i in range(30)]
    records += [record(f"p{i}", 2, "delete", dim=64, model=TINY_CLIP) for i in range(0, 30, 4)]
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in records) + "\n")
    remote = f"{SCHEME}://bucket/pipeline-index"
    index.run(["--input_dir", str(tmp_path / "embeddings"), "--index_dir", remote, "--model", TINY_CLIP,
               "--num_shards", "2", "--cache_dir", str(tmp_path / "worker-cache")])
    assert json.loads(MemoryObjectStore.objects[f"{remote}/index.json"]) == {"num_shards": 2, "model": TINY_CLIP,
                                                                             "dim": 64, "segment_kind": "hnsw"}
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
