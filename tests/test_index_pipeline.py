"""The index pipeline: records (files or a topic) → sharded stores; refusals and junk dead-lettered."""

from __future__ import annotations

import glob
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import index
from search.sharded import ShardedIndex, shard_of
from tests.conftest import TINY_CLIP
from tests.support.index_helpers import live_truth, record

DIM = 64


def tiny(pid, version, op="upsert", **kw):
    return record(pid, version, op, dim=DIM, model=TINY_CLIP, **kw)


def write_records(path, records, extra_lines=()):
    path.mkdir(parents=True, exist_ok=True)
    lines = [r.to_json() for r in records] + list(extra_lines)
    (path / "part-0.jsonl").write_text("\n".join(lines) + "\n")


def test_files_mode_builds_a_sharded_index_equal_to_last_writer_wins(tmp_path):
    records = [tiny(f"p{i}", 1, shop_id=f"s{i % 2}") for i in range(60)]
    records += [tiny(f"p{i}", 2) for i in range(0, 60, 3)] + [tiny(f"p{i}", 3, "delete") for i in range(0, 60, 5)]
    records += [tiny("p1", 0)]  # stale
    write_records(tmp_path / "embeddings", records, ["{broken", json.dumps({"product_id": "x"})])
    index.run(["--input_dir", str(tmp_path / "embeddings"), "--index_dir", str(tmp_path / "index"),
               "--model", TINY_CLIP, "--num_shards", "3", "--dead_letter_dir", str(tmp_path / "dead"),
               "--runner", "DirectRunner"])

    sharded = ShardedIndex.open(tmp_path / "index")
    assert sharded.num_shards == 3 and sharded.model == TINY_CLIP and sharded.dim == DIM
    live = {}
    for n, shard in enumerate(sharded.shards):
        products = shard.live_products()
        assert all(shard_of(pid, 3) == n for pid in products)
        live.update(products)
    assert live == live_truth(records)
    target = next(r for r in records if r.product_id == "p3" and r.version == 2)
    (top,) = sharded.search(np.array(target.embedding), k=1)
    assert (top.product_id, top.version) == ("p3", 2)
    letters = [json.loads(line) for path in glob.glob(str(tmp_path / "dead" / "*")) for line in open(path)]
    assert sorted(d["stage"] for d in letters) == ["parse", "parse"]


def test_records_of_another_model_are_dead_letters_not_index_entries(tmp_path):
    config = index.IndexJobConfig.from_options(PipelineOptions(
        ["--input_dir", "unused", "--index_dir", str(tmp_path / "index"), "--model", TINY_CLIP]), preflight=False)
    records = [tiny("a", 1), record("b", 1, dim=DIM, model="open_clip:tiny-clip-test/other-weights.pt"),
               tiny("c", 1, seed=5)]
    with TestPipeline(runner="FnApiRunner") as p:
        updated = p | beam.Create(records) | index.UpdateIndex(str(tmp_path / "index"), TINY_CLIP, DIM)
        assert_that(updated.dead_letter | beam.Map(lambda d: (d.product_id, d.stage, d.error_type)),
                    equal_to([("b", "sink", "IndexMismatch")]))
    assert config.dim == DIM
    (shard,) = ShardedIndex.open(tmp_path / "index").shards
    assert set(shard.live_products()) == {"a", "c"}


@pytest.mark.parametrize("argv, message", [
    (["--input_dir", "x"], "--index_dir is required"),
    (["--index_dir", "x"], "--input_dir is required"),
    (["--streaming", "--index_dir", "x"], "--input_subscription is required"),
    (["--input_dir", "x", "--index_dir", "y", "--num_shards", "0"], "--num_shards"),
    (["--input_dir", "x", "--index_dir", "y", "--model", "nope"], "model spec"),
])
def test_bad_options_fail_at_launch(argv, message):
    with pytest.raises(SystemExit, match=message):
        index.run(argv)


def test_a_layout_that_disagrees_is_refused(tmp_path):
    ShardedIndex.ensure_layout(tmp_path, 2, TINY_CLIP, DIM)
    with pytest.raises(ValueError, match="holds"):
        ShardedIndex.ensure_layout(tmp_path, 3, TINY_CLIP, DIM)
