"""Inputs that once lost records or froze an index, run as users run the index pipeline: a subprocess."""

from __future__ import annotations

import dataclasses
import glob
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from schemas import ProductState
from search.fields import parse_filterable
from search.sharded import ShardedIndex
from search.segment import SegmentParams
from search.store import IndexStore, StoreSettings
from tests.support.index_helpers import MODEL, record
from transforms.events import InvalidEvent, parse_event

ROOT = Path(__file__).resolve().parent.parent
DIM = 64


def index_cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.index", "--runner", "DirectRunner", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_lines(directory: Path, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def dead_letters(directory: Path) -> list[dict]:
    return [json.loads(line) for path in glob.glob(str(directory / "*")) for line in open(path)]


def test_a_leading_delete_does_not_fix_a_new_index_at_0_dimensions(tmp_path):
    # A delete and a patch (neither carries a vector) before the first upsert.
    records = [record("gone", 2, "delete"), dataclasses.replace(record("a", 0, "patch"), attributes={"c": "red"}),
               record("a", 1, dim=DIM), dataclasses.replace(record("a", 2, "patch"), attributes={"c": "blue"})]
    inputs = write_lines(tmp_path / "in", [r.to_json() for r in records])
    done = index_cli("--input_dir", inputs, "--index_dir", tmp_path / "index")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "index" / "index.json").read_text())["dim"] == DIM
    store = ShardedIndex.open(tmp_path / "index").shards[0]
    assert store.live_products() == {"a": (2, "shop-a")}
    # The delete is kept as a tombstone: a late, older upsert of that product stays out.
    late = write_lines(tmp_path / "late", [record("gone", 1, dim=DIM).to_json()])
    again = index_cli("--input_dir", late, "--index_dir", tmp_path / "index")
    assert again.returncode == 0 and "0 upserted, 0 deleted, 1 stale" in again.stdout, again.stdout


def test_a_backfill_that_starts_with_more_deletes_than_a_commit_holds_loses_none(tmp_path):
    # Deletes (version 9) of products whose older upserts follow, then other upserts: with commits of 2,
    # the first commits hold deletes only, before the job has seen an upsert.
    lines = [record(f"gone{i}", 9, "delete").to_json() for i in range(5)]
    lines += [record(f"gone{i}", 1, dim=DIM).to_json() for i in range(5)]
    lines += [record(f"kept{i}", 1, dim=DIM).to_json() for i in range(10)]
    inputs = write_lines(tmp_path / "in", lines)
    done = index_cli("--input_dir", inputs, "--index_dir", tmp_path / "index", "--commit_batch_size", "2",
                     "--num_shards", "2", "--dead_letter_dir", tmp_path / "dead")
    assert done.returncode == 0, done.stderr[-2000:]
    assert dead_letters(tmp_path / "dead") == []
    live = {pid for shard in ShardedIndex.open(tmp_path / "index").shards for pid in shard.live_products()}
    assert live == {f"kept{i}" for i in range(10)}  # the deletes held: their older upserts stay out


def test_deletes_alone_for_a_new_index_are_replayable_dead_letters(tmp_path):
    inputs = write_lines(tmp_path / "in", [record("gone", 2, "delete").to_json()])
    done = index_cli("--input_dir", inputs, "--index_dir", tmp_path / "index", "--dead_letter_dir", tmp_path / "dead")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "index" / "index.json").exists()  # never an index of 0 dimensions
    (letter,) = dead_letters(tmp_path / "dead")
    assert letter["error_type"] == "IndexNotCreated" and letter["product_id"] == "gone"


def test_an_index_an_earlier_version_made_at_0_dimensions_is_repaired_by_the_next_upsert(tmp_path):
    index = tmp_path / "index"
    ShardedIndex.ensure_layout(index, 1, MODEL, 1)
    store = IndexStore(ShardedIndex.shard_dir(index, 0))
    store.apply([record("gone", 5, "delete", dim=1)])
    store.close()
    # What the earlier version left: index.json and the shard's meta at 0 dimensions.
    layout = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**layout, "dim": 0}))
    with sqlite3.connect(ShardedIndex.shard_dir(index, 0) / "state.sqlite") as db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'dim'")

    inputs = write_lines(tmp_path / "in", [record("a", 1, dim=DIM).to_json(), record("gone", 4, dim=DIM).to_json()])
    done = index_cli("--input_dir", inputs, "--index_dir", index)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "repaired" in done.stderr
    assert json.loads((index / "index.json").read_text())["dim"] == DIM
    store = ShardedIndex.open(index).shards[0]
    assert store.dim == DIM and store.live_products() == {"a": (1, "shop-a")}  # the tombstone held


def test_non_finite_attributes_are_dead_letters_and_every_other_record_lands(tmp_path):
    good = [record(f"p{i}", 1, dim=DIM) for i in range(3)]
    lines = [r.to_json() for r in good]
    bad = json.loads(good[0].to_json()) | {"product_id": "huge"}
    lines.append(json.dumps(bad)[:-1] + ', "attributes": {"price": 1e400}}')
    lines.append(json.dumps(bad | {"product_id": "nan"})[:-1] + ', "attributes": {"size": [1, NaN]}}')
    lines.append(json.dumps(bad | {"product_id": "digits", "attributes": {"price": 10 ** 400}}))
    inputs = write_lines(tmp_path / "in", lines)
    done = index_cli("--input_dir", inputs, "--index_dir", tmp_path / "index", "--filterable", "price:float",
                     "--dead_letter_dir", tmp_path / "dead")
    assert done.returncode == 0, done.stderr[-2000:]
    letters = {d["product_id"] or d["payload"][:40]: d["error"] for d in dead_letters(tmp_path / "dead")}
    assert len(letters) == 3 and all("attributes." in e for e in letters.values()), letters
    assert any("attributes.size[1]" in e for e in letters.values()), letters
    sharded = ShardedIndex.open(tmp_path / "index")
    assert set(sharded.shards[0].live_products()) == {"p0", "p1", "p2"}


def test_events_and_product_state_refuse_non_finite_numbers_naming_the_field():
    event = {"event_id": "e", "product_id": "p", "op": "patch", "version": 1}
    with pytest.raises(InvalidEvent, match=r"attributes\.price is not a finite number"):
        parse_event(json.dumps(event)[:-1] + ', "attributes": {"price": -1e400}}')
    with pytest.raises(InvalidEvent, match=r"attributes\.sizes\[1\] is not a finite number"):
        parse_event(json.dumps(event | {"attributes": {"sizes": [1, 10 ** 400]}}))
    with pytest.raises(ValueError, match=r"attributes\.dims\.w"):
        ProductState.from_dict({"product_id": "p", "version": 1, "op": "patch", "recorded_at": "2026-12-01T00:00:00Z",
                                "attributes": '{"dims": {"w": NaN}}'})


def test_a_shard_that_already_holds_an_infinity_opens_filters_and_serves_json(tmp_path):
    settings = StoreSettings(filterable=parse_filterable("price:float,brand"))
    store = IndexStore(tmp_path / "shard", model=MODEL, dim=8, settings=settings)
    store.apply([record(f"p{i}", 1) for i in range(4)])
    # A row as an earlier version wrote it: Python's json wrote inf as Infinity, which SQLite cannot read.
    store._catalog.db().execute("UPDATE products SET attributes = '{\"price\": Infinity, \"brand\": \"acme\"}' "
                                "WHERE product_id = 'p1'")
    store.close()

    reopened = IndexStore(tmp_path / "shard", settings=settings)  # the writer opens it again
    reopened.close()
    reader = IndexStore(tmp_path / "shard", read_only=True)
    assert reader.facets(["brand", "price"], buckets={"price": [0, 10]}) == {
        "brand": {"values": {"acme": 1}}, "price": {"buckets": [0]}}
    hits = reader.search(np.array(record("p1", 1).embedding), k=4)
    assert {hit.product_id for hit in hits} == {"p0", "p1", "p2", "p3"}
    json.dumps([hit.attributes for hit in hits], allow_nan=False)  # a hit can always be sent as JSON


def test_a_batch_run_ends_with_its_merges_done_and_exits_0(tmp_path):
    # 16 flat segments: one commit more and the merge policy plans an HNSW build of all of them, slow
    # enough (efConstruction 1000) to be under way when the run's last commit is done.
    index = tmp_path / "index"
    settings = StoreSettings(segment=SegmentParams("hnsw", 64, 1000, 32))
    ShardedIndex.ensure_layout(index, 1, MODEL, DIM, settings)
    store = ShardedIndex.open_writer(index, 0, MODEL, DIM, settings)
    for batch in range(16):
        store.apply([record(f"p{batch}-{i}", 1, dim=DIM) for i in range(250)])
    assert not store.compaction_plan()
    store.close()

    inputs = write_lines(tmp_path / "in", [record(f"new{i}", 1, dim=DIM).to_json() for i in range(5)])
    done = index_cli("--input_dir", inputs, "--index_dir", index)
    assert done.returncode == 0, done.stderr[-2000:]  # was -6: a FAISS build cut off at exit aborts
    assert "before the job ends" in done.stderr
    segments = ShardedIndex.open(index).shards[0].stats()["segments"]
    assert [(s["kind"], s["count"]) for s in segments] == [("hnsw", 4005)]


def test_filterable_fields_in_another_order_are_the_same_index(tmp_path):
    inputs = write_lines(tmp_path / "in", [record("a", 1, dim=DIM).to_json()])
    first = index_cli("--input_dir", inputs, "--index_dir", tmp_path / "index", "--filterable", "brand,price:float")
    assert first.returncode == 0, first.stderr[-2000:]
    more = write_lines(tmp_path / "more", [record("b", 1, dim=DIM).to_json()])
    second = index_cli("--input_dir", more, "--index_dir", tmp_path / "index", "--filterable", "price:float,brand")
    assert second.returncode == 0, (second.stdout + second.stderr)[-2000:]
    assert set(ShardedIndex.open(tmp_path / "index").shards[0].live_products()) == {"a", "b"}
