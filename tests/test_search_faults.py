"""Faults and hostile requests against a running `search.server`, and a damaged store on disk.

Slow image hosts, a broken newest commit, flipped bytes in segment files, a lost WAL, oversized
bodies, idle sockets: the service keeps answering from what it knows is good, and says so.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from localstack.image_server import Route
from search.segment import SegmentCorrupted
from search.sharded import ShardedIndex
from search.store import IndexStore, StoreCorrupted
from tests.conftest import TINY_CLIP
from tests.support.index_helpers import record
from tests.support.server_process import ServerProcess

DIM = 64


@pytest.fixture
def index_dir(tmp_path):
    """One shard of 30 tiny-CLIP-space products (random unit vectors), committed in three commits."""
    directory = tmp_path / "index"
    ShardedIndex.ensure_layout(directory, 1, TINY_CLIP, DIM)
    writer = IndexStore(ShardedIndex.shard_dir(directory, 0), model=TINY_CLIP, dim=DIM)
    for start in range(0, 30, 10):
        writer.apply([record(f"p{n}", 1, dim=DIM, model=TINY_CLIP, seed=n) for n in range(start, start + 10)])
    writer.close()
    return directory


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_trickling_image_queries_never_starve_health_text_or_vector_queries(index_dir, image_server):
    # Headers at once, then a byte every 0.2 s: each of these would hold a thread for minutes.
    image_server.routes["/slow.jpg"] = Route(body=b"\xff\xd8" + b"x" * 4000, chunks=4000, drip=0.2,
                                             headers={"Content-Type": "image/jpeg"})
    server = ServerProcess(index_dir, "--allow_private_hosts", "--image_timeout_secs", "3")
    try:
        url = f"{server.url}/v1/search"
        with ThreadPoolExecutor(45) as pool:
            slow = [pool.submit(timed, lambda: requests.post(url, json={"image_url": image_server.url("slow.jpg")},
                                                             timeout=30)) for _ in range(45)]
            time.sleep(1.0)  # all 45 are in: 8 fetching, 37 waiting for a slot
            for _ in range(3):
                # Starved, they would wait out the image queries' 3 s deadline (or minutes, as a thread
                # held by a trickling body once did); 2 s leaves room for a loaded 2-core machine.
                health, took = timed(lambda: requests.get(f"{server.url}/healthz", timeout=10))
                assert health.status_code == 200 and took < 2.0, took
                text, took = timed(lambda: requests.post(url, json={"text": "linen shirt"}, timeout=10))
                assert text.status_code == 200 and took < 2.0, took
            outcomes = [future.result(timeout=60) for future in slow]
        for response, took in outcomes:
            assert response.status_code in (400, 503), response.text
            # Each ends by its deadline, its wait for a slot included (plus scheduling on a loaded 2-core
            # machine); a thread held by a trickling body used to take minutes.
            assert took < 3.0 + 1.5, took
    finally:
        server.stop()


def test_a_broken_newest_commit_is_not_served_and_health_says_degraded(index_dir):
    server = ServerProcess(index_dir)
    try:
        query = record("p3", 1, dim=DIM, model=TINY_CLIP, seed=3).embedding.tolist()
        before = requests.post(f"{server.url}/v1/search", json={"vector": query, "k": 5}, timeout=10).json()

        class TruncatesTheSegment:
            """Breaks the commit's segment right after its commit point (a disk that lost the tail)."""

            def segment_written(self, directory, info):
                self.path = directory / f"{info.name}.vectors.npy"

            def committed(self, delta):
                self.path.write_bytes(self.path.read_bytes()[:100])

        writer = IndexStore(ShardedIndex.shard_dir(index_dir, 0), listener=TruncatesTheSegment())
        writer.apply([record("new", 1, dim=DIM, model=TINY_CLIP, seed=3)])  # the query's own vector
        writer.close()
        deadline = time.monotonic() + 10
        while (health := requests.get(f"{server.url}/healthz", timeout=10).json())["status"] == "ok":
            assert time.monotonic() < deadline, "the broken commit was never noticed"
            time.sleep(0.2)
        assert health["status"] == "degraded" and health["live_docs"] == 30
        assert "checksum" in health["errors"]["0"]
        for _ in range(5):  # every request keeps working, from the last good generation
            after = requests.post(f"{server.url}/v1/search", json={"vector": query, "k": 5}, timeout=10)
            assert after.status_code == 200 and after.json()["results"] == before["results"]
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert "index_reload_failures_total 1.0" in metrics
    finally:
        server.stop()


def _compacted_store(tmp_path):
    directory = tmp_path / "shard"
    store = IndexStore(directory, model=TINY_CLIP, dim=DIM)
    store.apply([record(f"p{n}", 1, dim=DIM, model=TINY_CLIP, seed=n) for n in range(40)])
    store.compact(force=True)
    store.apply([record("q", 1, dim=DIM, model=TINY_CLIP, seed=99)])  # and a flat segment
    store.close()
    return directory


def test_a_flipped_byte_in_any_segment_file_is_detected_at_open(tmp_path):
    directory = _compacted_store(tmp_path)
    files = sorted(p for p in directory.glob("seg-*") if not p.name.endswith(".tmp"))
    assert {p.name.split(".", 1)[1] for p in files} == {"ids.npy", "vectors.npy", "hnsw", "sums.json"}
    for path in files:
        pristine = path.read_bytes()
        damaged = bytearray(pristine)
        damaged[len(damaged) // 2] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(SegmentCorrupted):
            IndexStore(directory, read_only=True)
        path.write_bytes(pristine)
    assert IndexStore(directory, read_only=True).stats()["live_docs"] == 41


def test_deleting_the_wal_loses_no_commit(tmp_path):
    directory = tmp_path / "shard"
    store = IndexStore(directory, model=TINY_CLIP, dim=DIM)
    for n in range(5):
        store.apply([record(f"p{n}", 1, dim=DIM, model=TINY_CLIP, seed=n)])
    (directory / "state.sqlite-wal").unlink(missing_ok=True)  # while the writer is still open
    store.close()
    (directory / "state.sqlite-wal").unlink(missing_ok=True)
    reopened = IndexStore(directory, read_only=True)
    assert reopened.generation == 5 and reopened.stats()["live_docs"] == 5


def test_a_database_behind_its_commits_refuses_to_open(tmp_path):
    """A lost WAL, or a database copied without it: the shard must not be served as if whole."""
    directory = tmp_path / "shard"
    store = IndexStore(directory, model=TINY_CLIP, dim=DIM)
    store.apply([record("p0", 1, dim=DIM, model=TINY_CLIP, seed=0)])
    shutil.copy(directory / "state.sqlite", tmp_path / "older.sqlite")
    store.apply([record("p1", 1, dim=DIM, model=TINY_CLIP, seed=1)])
    store.close()
    shutil.copy(tmp_path / "older.sqlite", directory / "state.sqlite")
    (directory / "state.sqlite-wal").unlink(missing_ok=True)
    with pytest.raises(StoreCorrupted, match="at generation 1 but committed 2"):
        IndexStore(directory, read_only=True)


@pytest.fixture
def server(index_dir):
    running = ServerProcess(index_dir, "--header_timeout_secs", "1")
    yield running
    running.stop()


def test_an_oversized_body_is_refused_before_it_is_read(server):
    huge = b'{"vector": [' + b"0.1," * 5_000_000 + b'0.1]}'  # 20 MB
    response, took = timed(lambda: requests.post(f"{server.url}/v1/search", data=huge, timeout=30))
    assert response.status_code == 413 and "over 1048576 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b" " * 50_000

    chunked = requests.post(f"{server.url}/v1/search", data=chunks(), timeout=30)
    assert chunked.status_code == 413


@pytest.mark.parametrize("body, message", [
    ({"text": "a", "k": True}, "k"),
    ({"text": "a", "k": 2.0}, "k"),
    ({"text": "a", "ef_search": "9"}, "ef_search"),
    ({"vector": [0.0] * DIM}, "not all zero"),
])
def test_non_integer_k_and_degenerate_vectors_are_400s(server, body, message):
    response = requests.post(f"{server.url}/v1/search", json=body, timeout=10)
    assert response.status_code == 400 and message in response.json()["error"]


def test_a_vector_of_tiny_values_is_a_direction_like_any_other(server):
    tiny = requests.post(f"{server.url}/v1/search", json={"vector": [1e-45] * DIM, "k": 3}, timeout=10)
    plain = requests.post(f"{server.url}/v1/search", json={"vector": [1.0] * DIM, "k": 3}, timeout=10)
    assert tiny.status_code == 200, tiny.text
    assert [h["product_id"] for h in tiny.json()["results"]] == [h["product_id"] for h in plain.json()["results"]]


def test_idle_and_trickling_connections_are_closed_after_the_header_timeout(server):
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(200)]
    trickler = sockets[0]
    stop = threading.Event()

    def trickle():  # a header byte every 0.3 s: never a whole request
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            if stop.is_set():
                return
            try:
                trickler.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(2.5)
        closed = 0
        for sock in sockets:
            sock.settimeout(2)
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError, socket.timeout):
                pass
        assert closed == 200
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
