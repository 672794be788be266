"""Hostile input to a running `search.server`, and stores it must still read: over HTTP, as clients send it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests

from search.fields import parse_filterable
from search.sharded import ShardedIndex
from search.store import IndexStore, StoreSettings
from tests.conftest import TINY_CLIP
from tests.support.index_helpers import record
from tests.support.server_process import ServerProcess

DIM = 64
IDS = ["gid://shopify/Product/1", "a/b", ".", "..", "100%", "sp ace", "q?x=1#y"]


def product(pid: str, n: int, **attributes):
    import dataclasses

    return dataclasses.replace(record(pid, 1, dim=DIM, model=TINY_CLIP, seed=n), attributes=attributes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inputs") / "index"
    settings = StoreSettings(filterable=parse_filterable("brand,price:float"))
    ShardedIndex.ensure_layout(directory, 1, TINY_CLIP, DIM, settings)
    writer = IndexStore(ShardedIndex.shard_dir(directory, 0), model=TINY_CLIP, dim=DIM, settings=settings)
    brands = ["café", unicodedata.normalize("NFD", "café")]  # one value, as two byte sequences
    writer.apply([product(pid, n, brand=brands[n % 2], price=float(n)) for n, pid in enumerate(IDS)]
                 + [product(f"p{n}", n + 10, brand="acme", price=5.0) for n in range(10)])
    writer.close()
    running = ServerProcess(directory)
    yield running
    running.stop()


def post(server, body, path="/v1/search"):
    headers = {"Content-Type": "application/json"}
    data = body if isinstance(body, str) else None
    return requests.post(server.url + path, data=data, json=None if data else body, headers=headers, timeout=10)


QUERY = record("x", 1, dim=DIM, model=TINY_CLIP, seed=99).embedding.tolist()


@pytest.mark.parametrize("body", [
    '{"vector": %s, "facets": ["price"], "facet_buckets": {"price": [-1e400, 0, 1e400]}}',
    '{"vector": %s, "facets": ["price"], "facet_buckets": {"price": [0, NaN, 10]}}',
    '{"vector": %s, "filter": {"price": {"gte": 1e400}}}',
    '{"vector": %s, "filter": {"price": {"lt": NaN}}}',
    '{"vector": %s, "lexical_weight": Infinity, "text": null}',
    '{"vector": %s, "filter": {"price": 1%s}}' % ("%s", "0" * 400),
    '{"vector": %s, "filter": {"brand": {"in": ["a", 1%s]}}}' % ("%s", "0" * 400),
    '{"vector": %s, "facets": ["price"], "facet_buckets": {"price": [0, 1%s]}}' % ("%s", "0" * 400),
])
def test_non_finite_numbers_anywhere_in_a_body_are_a_400(server, body):
    response = post(server, body % QUERY)
    assert response.status_code == 400, response.text
    assert "finite" in response.json()["error"] or "valid number" in response.json()["error"], response.text


@pytest.mark.parametrize("vector", ['["0.5"' + ', "0.5"' * (DIM - 1) + "]", "[true" + ", true" * (DIM - 1) + "]",
                                    "[1e400" + ", 0" * (DIM - 1) + "]"])
def test_a_vector_of_strings_booleans_or_infinities_is_a_400(server, vector):
    assert post(server, '{"vector": %s}' % vector).status_code == 400
    assert post(server, '{"vector": %s}' % vector, "/v1/similar").status_code == 400


def test_every_product_id_the_index_accepts_is_addressable(server):
    for pid in IDS:
        for encoded in {quote(pid, safe=""), quote(pid, safe="/:")} - {".", ".."}:
            vector = requests.get(f"{server.url}/v1/products/{encoded}/vector", timeout=10)
            assert vector.status_code == 200 and vector.json()["product_id"] == pid, (pid, encoded, vector.text)
            similar = requests.get(f"{server.url}/v1/products/{encoded}/similar?k=3", timeout=10)
            assert similar.status_code == 200, (pid, encoded, similar.text)
            assert pid not in [hit["product_id"] for hit in similar.json()["results"]]
    # `.` and `..` as path segments are resolved away by clients: their ids go percent-encoded.
    for pid, encoded in ((".", "%2E"), ("..", "%2E%2E")):
        response = requests.get(f"{server.url}/v1/products/{encoded}/vector", timeout=10)
        assert response.status_code == 200 and response.json()["product_id"] == pid


@pytest.mark.parametrize("k", ["2.0", "true", "0", "101", "1e1"])
def test_similar_takes_k_as_an_integer_in_range_only(server, k):
    response = requests.get(f"{server.url}/v1/products/p1/similar?k={k}", timeout=10)
    assert response.status_code == 400, (k, response.text)


def test_nfc_and_nfd_spellings_are_one_facet_value_and_one_filter_value(server):
    for spelling in ("NFC", "NFD"):
        body = {"vector": QUERY, "k": 20, "filter": {"brand": unicodedata.normalize(spelling, "café")},
                "facets": ["brand"]}
        answer = post(server, body).json()
        assert len(answer["results"]) == len(IDS), answer
        assert answer["facets"]["brand"] == [{"value": unicodedata.normalize("NFC", "café"), "count": len(IDS)}]


def test_a_read_only_copy_without_its_wal_and_shm_files_serves(tmp_path):
    directory = tmp_path / "index"
    ShardedIndex.ensure_layout(directory, 1, TINY_CLIP, DIM)
    writer = IndexStore(ShardedIndex.shard_dir(directory, 0), model=TINY_CLIP, dim=DIM)
    writer.apply([record(f"p{n}", 1, dim=DIM, model=TINY_CLIP, seed=n) for n in range(5)])
    writer.close()
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    shard = ShardedIndex.shard_dir(copy, 0)
    for name in ("state.sqlite-wal", "state.sqlite-shm"):
        (shard / name).unlink(missing_ok=True)
    # Read-only media: a read-only bind mount of the copy (the tests run as root, whom permissions
    # do not stop), so the -shm file WAL mode needs cannot be made.
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "--bind", str(copy), str(media)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(media)], check=True)
        running = ServerProcess(media)
        try:
            answer = requests.post(f"{running.url}/v1/search", json={"vector": QUERY, "k": 3}, timeout=10)
            assert answer.status_code == 200 and len(answer.json()["results"]) == 3
        finally:
            running.stop()
    finally:
        subprocess.run(["umount", str(media)], check=True)


def _open_state_handles(directory) -> int:
    target = str(directory / "state.sqlite")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return count


def test_close_releases_every_threads_sqlite_handle(tmp_path):
    directory = tmp_path / "shard"
    writer = IndexStore(directory, model="m", dim=8)
    writer.apply([record(f"p{n}", 1, model="m") for n in range(20)])
    writer.close()
    reader = IndexStore(directory, read_only=True)
    searched, done = threading.Barrier(7), threading.Event()

    def search():  # each thread holds its connection until all have searched (an ended one's is closed)
        reader.search(np.ones(8, np.float32) / 8 ** 0.5, k=5)
        searched.wait()
        done.wait()

    threads = [threading.Thread(target=search) for _ in range(6)]
    for thread in threads:
        thread.start()
    searched.wait()
    assert _open_state_handles(directory) >= 6
    done.set()
    for thread in threads:
        thread.join()
    reader.close()
    assert _open_state_handles(directory) == 0  # after an alias switch the old index holds no file open


def test_a_service_of_many_shards_starts_under_a_low_open_files_limit(tmp_path):
    directory = tmp_path / "index"
    ShardedIndex.ensure_layout(directory, 60, TINY_CLIP, DIM)  # ~6 files a shard: 360 > the limit of 128
    start = (f"ulimit -Sn 128 && exec {sys.executable} -m search.server --index_dir {directory} --port 0")
    process = subprocess.Popen(["bash", "-c", start], cwd=Path(__file__).resolve().parents[1], text=True,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the service exited"
            assert "Too many open files" not in line, line
            if "search page: " in line:
                break
        else:
            raise AssertionError("the service did not start")
    finally:
        process.terminate()
        process.wait(timeout=20)
