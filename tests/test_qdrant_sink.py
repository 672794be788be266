"""The Qdrant sink (`pipelines.index --sink qdrant`) in qdrant-client's local mode: no Qdrant server or Docker
runs here, so what only a server does (payload indexes, quantisation, HNSW, sharding, replication, the
condition applied under concurrent writers) is not checked; the conditional writes, tombstones, patches,
outcomes, retries and the command line are.

The last-writer-wins stream test of the FAISS store (tests/test_store.py) runs against the sink, with the
records shuffled, cut into bundles and written by two DoFn instances (two workers of one process: the local
mode is one process's), compared with the same truth (tests/support/index_helpers.py); with patches, against
a sequential reference and the FAISS store itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localstack.emulator import free_port
from search.store import IndexStore, StoreSettings
from tests.support.index_helpers import MODEL, live_truth, record
from tests.test_cli import DATAFLOW, cli
from tests.support.qdrant_helpers import deliver
from search.qdrant.collection import VECTOR_NAME, QdrantTarget, QdrantUnavailable, connected, live_only, point_id, stored_older_than
from transforms.qdrant_sink import WriteToQdrant, _ConditionalWriteFn, _operation

DIM = 8


def workers(target: QdrantTarget, n: int = 2, batch_size: int = 1000, model: str | None = MODEL, **kw):
    fns = [_ConditionalWriteFn(target, model, DIM if model else 0, StoreSettings(), batch_size, backoff_s=0.0, **kw)
           for _ in range(n)]
    for fn in fns:
        fn.setup()
    return fns


def close(fns) -> None:
    for fn in fns:
        fn.teardown()


def totals(outputs) -> dict[str, int]:
    out = {name: 0 for name in _ConditionalWriteFn.OUTCOMES}
    for tag, value in outputs:
        if tag == "commits":
            for name in out:
                out[name] += value[name]
    return out


def assert_live_equals(collection, truth: dict[str, tuple[int, str]], vectors: dict[str, np.ndarray]) -> None:
    """The live points are the truth; searches (filtered `deleted != true`, and unfiltered: tombstones have
    no vector) return live products at their current version only; each is found by its own vector."""
    assert collection.live_products() == truth
    for unfiltered in (False, True):
        for vector in vectors.values():
            hits = collection.client.query_points(collection.target.collection, query=vector.tolist(),
                                                  using=VECTOR_NAME, limit=len(truth) + 10, with_payload=True,
                                                  query_filter=None if unfiltered else live_only()).points
            assert sorted(h.payload["product_id"] for h in hits) == sorted(truth)
            assert all(truth[h.payload["product_id"]][0] == h.payload["version"] for h in hits)
    for pid in truth:
        (top,) = collection.client.query_points(collection.target.collection, query=vectors[pid].tolist(),
                                                using=VECTOR_NAME, limit=1, query_filter=live_only()).points
        assert top.payload["product_id"] == pid and top.score == pytest.approx(1.0, abs=1e-5)


ops = st.tuples(  # the FAISS store's stream (tests/test_store.py)
    st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5"]),
    st.integers(min_value=0, max_value=6),
    st.sampled_from(["upsert", "upsert", "delete"]),
    st.sampled_from(["shop-a", "shop-b"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(ops, min_size=1, max_size=40), cuts=st.lists(st.integers(0, 45), max_size=6),
       batch_size=st.integers(1, 6), data=st.data())
def test_random_streams_equal_last_writer_wins(tmp_path_factory, stream, cuts, batch_size, data):
    """Upserts, deletes, duplicates, reordered versions and redeliveries, shuffled, cut into bundles at random
    points and written by two workers in turn, in batches of 1 to 6: after every bundle the live products
    are last-writer-wins of what was delivered so far, and nothing else is ever served."""
    records = [record(pid, version, op, shop_id=shop) for pid, version, op, shop in stream]
    records += data.draw(st.lists(st.sampled_from(records), max_size=5))  # redeliveries
    records = data.draw(st.permutations(records))
    target = QdrantTarget(collection="products", path=str(tmp_path_factory.mktemp("qdrant")))
    fns = workers(target, batch_size=batch_size)
    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    outputs = []
    try:
        with connected(target) as collection:
            for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
                outputs += deliver(fns[n % 2], records[start:end])
                truth = live_truth(records[:end])
                vectors = {r.product_id: r.embedding for r in records[:end] if r.op == "upsert"
                           and truth.get(r.product_id, (None,))[0] == r.version}
                assert_live_equals(collection, truth, vectors)
            tombstones = {p.payload["product_id"] for p in collection.points(live=False) if p.payload["deleted"]}
    finally:
        close(fns)
    counts = totals(outputs)
    assert sum(counts.values()) == len(records) and counts["refused"] == 0
    assert tombstones == {pid for pid, r in _latest(records).items() if r.op == "delete"}


def _latest(records):
    latest = {}
    for r in records:
        if r.product_id not in latest or r.version > latest[r.product_id].version:
            latest[r.product_id] = r
    return latest


def sequential_truth(records) -> dict[str, dict]:
    """The FAISS store's rules one record at a time: older or repeated versions ignored; a patch changes a
    live product's attributes and keeps its vector, and is refused without one."""
    state: dict[str, dict] = {}
    for r in records:
        current = state.get(r.product_id)
        if current is not None and r.version <= current["version"]:
            continue
        if r.op == "patch":
            if current is None or current["deleted"]:
                continue
            state[r.product_id] = {**current, "version": r.version, "attributes": dict(r.attributes)}
        elif r.op == "delete":
            state[r.product_id] = {"version": r.version, "deleted": True}
        else:
            state[r.product_id] = {"version": r.version, "deleted": False, "shop": r.shop_id,
                                   "vector": r.embedding, "attributes": dict(r.attributes)}
    return state


patch_ops = st.tuples(st.sampled_from(["p0", "p1", "p2", "p3"]), st.integers(min_value=0, max_value=8),
                      st.sampled_from(["upsert", "delete", "patch", "patch"]), st.sampled_from(["shop-a", "shop-b"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(patch_ops, min_size=1, max_size=30), cuts=st.lists(st.integers(0, 30), max_size=4),
       batch_size=st.integers(1, 5))
def test_patches_keep_the_vector_and_agree_with_the_faiss_store(tmp_path_factory, stream, cuts, batch_size):
    """Patches among upserts and deletes: each live point holds its last upsert's vector and its last
    writer's attributes; the live products and every outcome count equal the FAISS store's on the same
    bundles."""
    records = [dataclasses.replace(record(pid, version, op, shop_id=shop), attributes={"rev": version, "op": op})
               for pid, version, op, shop in stream]
    target = QdrantTarget(collection="products", path=str(tmp_path_factory.mktemp("qdrant")))
    store = IndexStore(tmp_path_factory.mktemp("faiss"), model=MODEL, dim=DIM)
    fns = workers(target, batch_size=batch_size)
    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    outputs, faiss_counts = [], {name: 0 for name in _ConditionalWriteFn.OUTCOMES}
    try:
        for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
            outputs += deliver(fns[n % 2], records[start:end])
            result = store.apply(records[start:end])
            for name in ("upserted", "deleted", "ignored"):
                faiss_counts[name] += getattr(result, name)
            faiss_counts["refused"] += len(result.refused)
        with connected(target) as collection:
            points = {p.payload["product_id"]: p for p in collection.points(live=False, with_vectors=True)}
            assert collection.live_products() == store.live_products()
    finally:
        close(fns)
    assert totals(outputs) == faiss_counts
    truth = sequential_truth(records)
    assert set(points) == set(truth)
    for pid, expected in truth.items():
        payload, vector = points[pid].payload, points[pid].vector
        assert (payload["version"], payload["deleted"]) == (expected["version"], expected["deleted"])
        if expected["deleted"]:
            assert not vector  # a tombstone has no vector to be found by
        else:
            assert payload["attributes"] == expected["attributes"] and payload["shop_id"] == expected["shop"]
            np.testing.assert_allclose(vector[VECTOR_NAME], expected["vector"], atol=1e-6)


def test_versions_past_2_to_the_53_are_told_apart(tmp_path):
    """Qdrant compares ranges as 64-bit floats, which cannot tell 2^53 from 2^53+1: the condition compares
    two 32-bit halves, each exact as a float. (The local mode compares Python numbers exactly either way,
    so the halves are checked here, and the order through the sink.)"""
    for version in (0, 2 ** 32 - 1, 2 ** 53, 2 ** 53 + 1, 2 ** 63 - 1):
        high = stored_older_than(version).should[0].range.lt
        low = stored_older_than(version).should[1].must[1].range.lt
        assert high == int(high) < 2 ** 32 and low == int(low) < 2 ** 32 and int(high) * 2 ** 32 + int(low) == version
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    fns = workers(target, n=1)
    big = [record("p", 2 ** 53 + 1, seed=1), record("p", 2 ** 53, seed=2), record("q", 2 ** 63 - 1, seed=3),
           record("q", 2 ** 63 - 2, seed=4), record("q", 2 ** 63 - 3, "delete")]
    try:
        outputs = deliver(fns[0], big[:1]) + deliver(fns[0], big[1:3]) + deliver(fns[0], big[3:])
        with connected(target) as collection:
            assert collection.live_products() == {"p": (2 ** 53 + 1, "shop-a"), "q": (2 ** 63 - 1, "shop-a")}
    finally:
        close(fns)
    assert totals(outputs) == {"upserted": 2, "deleted": 0, "ignored": 3, "refused": 0}


class Flaky:
    """The local client, failing the way a server does: `down` calls of `method` fail with a connection error
    (`ResponseHandlingException`, what qdrant-client raises when the server cannot be reached), or with a
    400 for any request that carries a point of product `poison`."""

    def __init__(self, client, method: str = "batch_update_points", down: int = 0, poison: str = ""):
        self._client, self._method, self.down, self._poison = client, method, down, poison
        self.calls = 0

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name != self._method:
            return attribute

        def call(*args, **kwargs):
            from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

            self.calls += 1
            if self.down > 0:
                self.down -= 1
                raise ResponseHandlingException(ConnectionRefusedError(111, "Connection refused"))
            if self._poison and self._poison_in(args[1] if len(args) > 1 else kwargs["update_operations"]):
                raise UnexpectedResponse(400, "Bad Request", b'{"status":{"error":"Format error in JSON body"}}', {})
            return attribute(*args, **kwargs)
        return call

    def _poison_in(self, operations) -> bool:
        return any(getattr(op, "upsert", None) is not None and
                   any(p.id == point_id(self._poison) for p in op.upsert.points) for op in operations)


def test_transient_failures_are_retried_then_the_bundle_fails_and_a_replay_loses_nothing(tmp_path):
    target = dataclasses.replace(QdrantTarget(collection="products", path=str(tmp_path / "qdrant")), retries=3)
    records = [record(f"p{n}", 1, seed=n) for n in range(6)] + [record("p0", 2, "delete")]
    (fn,) = workers(target, n=1)
    try:
        real = fn._collection.client
        fn._collection.client = flaky = Flaky(real, down=3)  # three failures, three retries: it lands
        assert totals(deliver(fn, records))["upserted"] == 6 and flaky.calls == 4
        fn._collection.client = flaky = Flaky(real, down=100)  # down for longer than the retries
        later = [record("p1", 5, "delete"), record("p9", 1, seed=9)]
        with pytest.raises(QdrantUnavailable, match=r"could not write a batch in 4 attempts") as failure:
            deliver(fn, later)
        assert flaky.calls == 4 and type(failure.value.__cause__).__name__ == "ResponseHandlingException"
        fn._collection.client = real  # Beam retries the bundle once the engine is back
        assert totals(deliver(fn, later)) == {"upserted": 1, "deleted": 1, "ignored": 0, "refused": 0}
        with connected(target) as collection:
            assert collection.live_products() == live_truth(records + later)
    finally:
        close([fn])


class Racing:
    """The local client, with another worker's writes landing between this worker's read of the stored
    versions and its write: what the engine's condition, not the read, must decide."""

    def __init__(self, client, collection: str, rival: list):
        self._client, self._collection, self._rival = client, collection, rival

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name != "batch_update_points" or not self._rival:
            return attribute

        def call(*args, **kwargs):
            rival, self._rival = self._rival, []
            for r in rival:
                self._client.batch_update_points(self._collection, [_operation([r], ())])
            return attribute(*args, **kwargs)
        return call


def test_the_engine_keeps_what_another_worker_wrote_between_the_read_and_the_write(tmp_path):
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    first = [record("up", 3, seed=1), record("del", 3, seed=2), record("patched", 3, seed=3)]
    rival = [record("up", 10, seed=4), record("del", 10, "delete"), record("patched", 4, "delete"),
             record("new", 7, seed=5)]
    ours = [record("up", 5, seed=6), record("del", 5, seed=7), record("patched", 5, "patch"), record("new", 6, seed=8)]
    (fn,) = workers(target, n=1)
    try:
        deliver(fn, first)
        fn._collection.client = Racing(fn._collection.client, "products", rival)
        deliver(fn, ours)  # read: every stored version older than ours; written: after the rival's
        with connected(target) as collection:
            assert collection.live_products() == {"up": (10, "shop-a"), "new": (7, "shop-a")}
            stored = {p.payload["product_id"]: (p.payload["version"], p.payload["deleted"])
                      for p in collection.points(live=False)}
    finally:
        close([fn])
    assert stored == {"up": (10, False), "del": (10, True), "patched": (4, True), "new": (7, False)}


def test_what_the_engine_refuses_is_a_dead_letter_and_the_rest_lands(tmp_path):
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    records = [record(f"p{n}", 1, seed=n) for n in range(4)] + [record("poison", 1, seed=9)]
    (fn,) = workers(target, n=1)
    try:
        fn._collection.client = Flaky(fn._collection.client, poison="poison")
        outputs = deliver(fn, records)
        with connected(target) as collection:
            assert set(collection.live_products()) == {"p0", "p1", "p2", "p3"}
    finally:
        close([fn])
    (letter,) = [value for tag, value in outputs if tag == WriteToQdrant.DEAD_LETTER]
    assert (letter.product_id, letter.stage, letter.error_type) == ("poison", "sink", "EngineRefused")
    assert "400 Bad Request" in letter.error
    assert totals(outputs) == {"upserted": 4, "deleted": 0, "ignored": 0, "refused": 1}


def test_refused_records_are_sink_dead_letters_in_a_pipeline(tmp_path):
    """Through Beam (FnApiRunner): another model, another dimension, a vector that is not unit length and a
    patch of a product with no point are refused as the FAISS store refuses them; the rest lands."""
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    records = [record("a", 1, seed=1), record("b", 1, seed=2, model="other-model"), record("c", 1, dim=4),
               dataclasses.replace(record("d", 1), embedding=np.array([3.0] + [0.0] * (DIM - 1), np.float32)),
               record("e", 1, "patch"), record("a", 2, "patch"), record("f", 1, "delete")]
    with TestPipeline(runner="FnApiRunner") as p:
        written = p | beam.Create(records) | WriteToQdrant(target, MODEL, DIM)
        assert_that(written.dead_letter | beam.Map(lambda d: (d.product_id, d.stage, d.error_type)),
                    equal_to([("b", "sink", "IndexMismatch"), ("c", "sink", "IndexMismatch"),
                              ("d", "sink", "IndexMismatch"), ("e", "sink", "IndexMismatch")]))
    with connected(target) as collection:
        assert collection.live_products() == {"a": (2, "shop-a")}
        assert collection.layout()["model"] == MODEL


# The command line, as users type it --------------------------------------------------------------------------

CUSTOM = "acme:custom-16"


def write_shuffled_records(directory, records, files: int = 3, seed: int = 0) -> None:
    """Records in a random order, spread over `files` files (read as separate bundles)."""
    directory.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(records))
    for n in range(files):
        lines = [records[i].to_json() for i in order[n::files]]
        (directory / f"part-{n}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_cli_writes_a_collection_in_batch_equal_to_last_writer_wins(tmp_path):
    records = [dataclasses.replace(record(f"p{n}", 1 + n % 3, dim=16, model=CUSTOM, seed=n, shop_id=f"shop-{n % 2}"),
                                   attributes={"brand": ["acme", "zeta"][n % 2], "price": float(n)}, title=f"item {n}")
               for n in range(30)]
    records += [record(f"p{n}", 9, "delete", dim=16, model=CUSTOM) for n in range(0, 30, 7)]
    records += [record("p0", 1, dim=16, model=CUSTOM, seed=99)]  # older than p0's delete: stays out
    records += [dataclasses.replace(record("p1", 8, "patch", dim=16, model=CUSTOM), attributes={"brand": "new"})]
    bad = dataclasses.replace(record("bad", 1, dim=16, model=CUSTOM), embedding=np.array([3.0] + [0.0] * 15, np.float32))
    write_shuffled_records(tmp_path / "records", [*records, bad])
    args = ["--sink", "qdrant", "--qdrant_path", str(tmp_path / "qdrant"), "--collection", "products",
            "--input_dir", str(tmp_path / "records")]
    result = cli("pipelines.index", *args, "--dead_letter_dir", str(tmp_path / "dead"), "--segment_kind", "hnsw_sq8",
                 "--hnsw_m", "8", "--hnsw_ef_construction", "40", "--filterable", "brand,price:float", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # How many are stale depends on the order the bundles meet (p0 at version 1 twice, then its delete).
    summary = re.search(r"index: DONE in [\d.]+ s: 38 records read \((\d+) upserted, 5 deleted, (\d+) stale or "
                        r"repeated\), 1 dead letters \(sink=1\); Qdrant collection products at (\S+) holds 25 live "
                        r"products \(acme:custom-16, 16-d, hnsw_sq8 layout\)", result.stdout)
    assert summary and int(summary[1]) + int(summary[2]) == 32 and summary[3] == str(tmp_path / "qdrant"), result.stdout
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    letter = json.loads(next((tmp_path / "dead").glob("*")).read_text().splitlines()[0])
    assert letter["product_id"] == "bad" and "not a finite unit vector" in letter["error"]
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    with connected(target) as collection:
        assert collection.live_products() == {r.product_id: (r.version if r.product_id != "p1" else 8, r.shop_id)
                                              for r in records[:30] if int(r.product_id[1:]) % 7}
        (p1,) = collection.client.retrieve("products", [point_id("p1")], with_vectors=True)
        assert p1.payload["attributes"] == {"brand": "new"} and p1.payload["title"] == "item 1"
        np.testing.assert_allclose(p1.vector[VECTOR_NAME], records[1].embedding, atol=1e-6)
        info = collection.client.get_collection("products")
        params = info.config.params.vectors[VECTOR_NAME]
        assert (params.size, params.distance.value, params.hnsw_config.m, params.hnsw_config.ef_construct) == \
            (16, "Cosine", 8, 40)
        assert params.quantization_config.scalar.type.value == "int8"
        assert info.config.metadata == {"product": "product-embeddings", "model": CUSTOM, "projection": "",
                                        "segment_kind": "hnsw_sq8", "filterable": ["brand", "price:float"]}
    other_kind = cli("pipelines.index", *args, "--segment_kind", "ivf_pq", timeout=60)
    assert other_kind.returncode == 1 and len(other_kind.stderr.strip().splitlines()) == 1, other_kind.stderr
    assert "is an index of hnsw_sq8 segments (a kind is fixed when the index is made" in other_kind.stderr


def test_help_lists_the_sink_flags():
    result = cli("pipelines.index", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--sink {faiss,qdrant}", "--collection", "--qdrant_url", "--qdrant_path", "--qdrant_api_key_secret",
                 "--qdrant_timeout_secs", "--qdrant_retries"):
        assert flag in result.stdout, flag
    assert "Qdrant sink (--sink qdrant)" in result.stdout and "QDRANT_API_KEY" in result.stdout


BAD_COMBINATIONS = [
    (["--sink", "qdrant", "--qdrant_path", "Q"], "--collection is required with --sink qdrant"),
    (["--sink", "qdrant", "--collection", "c"], "--qdrant_url URL or --qdrant_path DIR is required with --sink qdrant"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--qdrant_url", "http://127.0.0.1:6333"],
     "--qdrant_url and --qdrant_path exclude each other"),
    (["--collection", "c", "--index_dir", "Q"], "--collection needs --sink qdrant"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--index_dir", "I"],
     "--index_dir is for --sink faiss"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--num_shards", "2"],
     "--num_shards is for --sink faiss"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--commit_batching", "stateful"],
     "--commit_batching stateful is for --sink faiss"),
    (["--sink", "qdrant", "--collection", "c/d", "--qdrant_path", "Q"], "--collection 'c/d' is not a valid name"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_url", "ftp://host"], "--qdrant_url 'ftp://host' is not"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_url", "https://user:sekrit-123@host"],
     "--qdrant_url must not carry credentials"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--qdrant_api_key_secret",
      "projects/p/secrets/s"], "--qdrant_api_key_secret is for --qdrant_url"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_url", "https://host", "--qdrant_api_key_secret", "key"],
     "--qdrant_api_key_secret 'key' is not projects/P/secrets/S[/versions/V]"),
    (["--sink", "qdrant", "--collection", "c", "--qdrant_path", "Q", "--direct_running_mode", "multi_processing"],
     "--qdrant_path is opened by one process at a time"),
]


@pytest.mark.parametrize("argv, message", BAD_COMBINATIONS)
def test_a_bad_combination_is_refused_before_anything_starts(tmp_path, argv, message):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import IndexJobConfig, InvalidOptions

    argv = [str(tmp_path / "q") if a == "Q" else a for a in argv]
    with pytest.raises(InvalidOptions) as refused:
        IndexJobConfig.from_options(PipelineOptions(["--input_dir", str(tmp_path / "records"), *argv]))
    assert refused.value.code == 2 and str(refused.value).startswith("invalid options: ")
    assert message in str(refused.value) and "sekrit" not in str(refused.value)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, message", BAD_COMBINATIONS[:4])
def test_a_bad_combination_exits_2_in_one_line_naming_the_flag(tmp_path, argv, message):
    argv = [str(tmp_path / "q") if a == "Q" else a for a in argv]
    result = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), *argv, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid options: ") and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "q").exists()


def test_an_unreachable_server_is_refused_at_launch_without_echoing_the_key(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text(record("p", 1, dim=16, model=CUSTOM).to_json() + "\n")
    dead = free_port()  # nothing listens here
    started = time.monotonic()
    result = cli("pipelines.index", "--sink", "qdrant", "--collection", "c", "--qdrant_url", f"https://127.0.0.1:{dead}",
                 "--qdrant_timeout_secs", "2", "--input_dir", str(tmp_path / "records"),
                 env={"QDRANT_API_KEY": "sekrit-123"}, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cannot start: cannot reach Qdrant collection c at "
                                                   f"https://127.0.0.1:{dead} within 2 s"), result.stderr[-2000:]
    assert "sekrit" not in result.stderr + result.stdout


def test_the_qdrant_job_dry_runs_on_dataflow_from_the_cli_offline(tmp_path):
    env = {"PUBSUB_EMULATOR_HOST": "", "QDRANT_API_KEY": ""}
    common = [*DATAFLOW, "--input_subscription", "projects/my-project/subscriptions/product-embeddings-index",
              "--sink", "qdrant", "--collection", "c", "--dead_letter_topic", "projects/my-project/topics/index-dlq"]
    result = cli("pipelines.index", *common, "--qdrant_url", "https://example.invalid", "--qdrant_api_key_secret",
                 "projects/my-project/secrets/qdrant-api-key", env=env, offline_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "index: dry run, nothing submitted: DataflowRunner job" in result.stdout
    assert "stateful:" not in result.stdout  # per-bundle conditional writes: no per-shard state to checkpoint
    assert "Traceback" not in result.stderr
    local = cli("pipelines.index", *common, "--qdrant_path", "/mnt/qdrant", env=env, offline_dir=tmp_path)
    assert local.returncode == 2 and "--qdrant_path /mnt/qdrant is a directory on each worker's own disk" in \
        local.stderr, local.stderr[-2000:]
    keyed = cli("pipelines.index", *common, "--qdrant_url", "https://example.invalid",
                env={**env, "QDRANT_API_KEY": "sekrit-123"}, offline_dir=tmp_path)
    assert keyed.returncode == 2 and "--qdrant_api_key_secret is needed on a remote runner" in keyed.stderr
    assert "sekrit" not in keyed.stderr + keyed.stdout


@pytest.mark.emulator
def test_the_index_pipeline_follows_the_embeddings_topic_into_qdrant(pubsub_emulator, unique_name, tmp_path):
    """As tests/test_streaming.py's FAISS case: records published to the emulator, the streaming job on the
    BundleBasedDirectRunner, the collection read through this process's shared local client."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from google.cloud import pubsub_v1

    from localstack.streaming import StreamingJob
    from pipelines import index
    from tests.conftest import TINY_CLIP

    ps = pubsub_emulator
    topic_name, dead_name = unique_name("records"), unique_name("dead")
    for name in (topic_name, dead_name):
        ps.create_topic(name)
    topic = ps.topic(topic_name)
    subscription = ps.create_subscription(topic_name, unique_name("records-sub"))
    config = index.IndexJobConfig.from_options(PipelineOptions([
        "--streaming", "--input_subscription", subscription, "--sink", "qdrant", "--collection", "products",
        "--qdrant_path", str(tmp_path / "qdrant"), "--model", TINY_CLIP, "--dead_letter_topic", ps.topic(dead_name)]))
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", "--runner", "BundleBasedDirectRunner"]))
    index.build_pipeline(pipeline, config)
    records = [record(f"p{i}", 1, dim=64, model=TINY_CLIP, seed=i) for i in range(20)]
    records += [record("p0", 2, "delete", dim=64, model=TINY_CLIP)]
    target = config.qdrant
    with StreamingJob(pipeline, wake_topic=topic):
        publisher = pubsub_v1.PublisherClient()
        for r in records:
            publisher.publish(topic, r.to_json().encode(), event_id=r.event_id).result(timeout=30)
        with connected(target) as collection:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if collection.client.collection_exists("products") and \
                        collection.live_products() == live_truth(records):
                    break
                time.sleep(0.5)
            assert collection.live_products() == live_truth(records)
            (top,) = collection.client.query_points("products", query=records[5].embedding.tolist(), using=VECTOR_NAME,
                                                    limit=1, query_filter=live_only()).points
            assert top.payload["product_id"] == "p5"


def test_a_local_collection_is_shared_by_the_clients_of_one_process(tmp_path):
    """The local directory is locked by the client that opens it: every user in a process shares one
    (a second client of the same directory would fail), and it is closed when the last one leaves."""
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"))
    with connected(target) as first, connected(target) as second:
        assert first.client is second.client
    with connected(target) as again:  # closed and reopened
        assert again.client is not first.client
    assert os.path.isdir(tmp_path / "qdrant")


def test_writing_to_qdrant_loads_no_torch(tmp_path):
    """The reason Beam's Qdrant writer is not imported (it imports apache_beam.ml, which imports torch): a
    worker of the index job that writes to Qdrant loads no model library."""
    import subprocess
    import sys

    from tests.test_cli import ROOT

    code = f"""
import sys
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from search.store import StoreSettings
from tests.support.index_helpers import record
from search.qdrant.collection import QdrantTarget
from transforms.qdrant_sink import _ConditionalWriteFn
fn = _ConditionalWriteFn(QdrantTarget(collection="products", path={str(tmp_path / "qdrant")!r}), None, 0, StoreSettings())
fn.setup()
fn.start_bundle()
list(fn.process(record("p", 1), timestamp=Timestamp(0), window=GlobalWindow()) or ())
assert [o.value["upserted"] for o in fn.finish_bundle()] == [1]
fn.teardown()
print(sorted(m for m in ("torch", "apache_beam.ml", "qdrant_client") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['qdrant_client']"


def test_a_new_collection_asks_the_engine_for_the_shards_and_copies_given(tmp_path):
    """The local mode keeps one shard whatever it is asked; a server takes shard_number and
    replication_factor from the create request, which is what this checks."""
    target = QdrantTarget(collection="products", path=str(tmp_path / "qdrant"), shards=6, replication=2)
    with connected(target) as collection:
        asked = {}
        create = collection.client.create_collection

        def recording(name, **kwargs):
            asked.update(kwargs)
            return create(name, **kwargs)
        collection.client.create_collection = recording
        try:
            collection.ensure(MODEL, DIM, StoreSettings())
        finally:
            collection.client.create_collection = create
    assert asked["shard_number"] == 6 and asked["replication_factor"] == 2
    parsed = cli("pipelines.index", "--help")
    assert "--qdrant_shards" in parsed.stdout and "--qdrant_replication_factor" in parsed.stdout
