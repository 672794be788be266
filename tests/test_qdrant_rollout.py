"""Rollouts on Qdrant: collection aliases switched with search.aliases, the gate comparing collections, and
a search service that follows an alias to a new collection (and its model) without a failed request."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests

from background_server import BackgroundServer
from search import aliases as faiss_aliases
from search.qdrant import aliases
from search.qdrant.collection import QdrantTarget
from search.qdrant.index import QdrantIndex
from search.query.embedder import QueryEmbedder
from search.server import create_app
from search.serving import AliasFollower, Served
from tests.support.index_helpers import record
from tests.support.qdrant_helpers import write_collection
from tests.test_cli import cli

VECTOR_ONLY = "acme:custom-16"
DIM = 16


def build(path: str, name: str, model: str = VECTOR_ONLY, dim: int = DIM, products: int = 30, seed: int = 0) -> None:
    records = [record(f"p{n}", 1, dim=dim, seed=seed * 1000 + n, model=model) for n in range(products)]
    outputs = write_collection(QdrantTarget(collection=name, path=path), records)
    assert sum(v["upserted"] for tag, v in outputs if tag == "commits") == products


def target_of(path: str):
    return lambda name: QdrantTarget(collection=name, path=path)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> str:
    """v1, v2: the same vectors; v3: other vectors of the same model; half: v1's first 15 products;
    other: another model and dimension. live -> v1."""
    path = str(tmp_path_factory.mktemp("qdrant-rollout") / "qdrant")
    build(path, "v1", seed=1)
    build(path, "v2", seed=1)
    build(path, "v3", seed=2)
    build(path, "half", seed=1, products=15)
    build(path, "other", model="acme:other-8", dim=8, seed=3)
    aliases.set_alias(target_of(path), "live", "v1")
    from search.qdrant.collection import Clients

    Clients.close_all()  # the commands below open the directory in their own processes
    return path


def test_the_command_line_lists_shows_and_switches_collection_aliases(engine):
    listed = cli("search.aliases", "--qdrant_path", engine)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "v1: acme:custom-16, 16-d, hnsw, 30 live products  <- live" in listed.stdout
    assert "alias live -> v1" in listed.stdout and "half: acme:custom-16, 16-d, hnsw, 15 live products" in listed.stdout
    shown = cli("search.aliases", "--qdrant_path", engine, "--show", "live")
    assert shown.returncode == 0 and shown.stdout.strip() == "v1"
    switched = cli("search.aliases", "--qdrant_path", engine, "--set", "staging=v2")
    assert switched.returncode == 0 and switched.stdout.strip() == "alias staging: (none) -> v2"
    moved = cli("search.aliases", "--qdrant_path", engine, "--set", "staging=v3", "--expect", "v2")
    assert moved.returncode == 0 and moved.stdout.strip() == "alias staging: v2 -> v3"
    raced = cli("search.aliases", "--qdrant_path", engine, "--set", "staging=v1", "--expect", "v2")
    assert raced.returncode == 1 and "names 'v3', not 'v2': it was switched meanwhile" in raced.stderr
    for argv, code, message in ((["--set", "live=missing"], 1, "no collection 'missing'"),
                                (["--show", "nothing"], 1, "no collection alias 'nothing'"),
                                (["--root", engine], 2, "--root is for named FAISS indexes")):
        result = cli("search.aliases", "--qdrant_path", engine, *argv)
        assert result.returncode == code and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert cli("search.aliases", "--qdrant_path", engine, "--show", "live").stdout.strip() == "v1"


def gate(engine: str, candidate: str, *extra):
    return cli("evaluation.gate", "--qdrant_path", engine, "--candidate", candidate, "--recall_queries", "20",
               "--device", "cpu", *extra, timeout=180)


def test_the_gate_passes_the_same_collection_and_stops_a_worse_one(engine):
    same = gate(engine, "v2")
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "| same vectors as serving | 1.0000 | 1.0000 |" in same.stdout and "gate: v2 passes" in same.stdout
    half = gate(engine, "half")
    assert half.returncode == 1 and "| live products | 30 | 15 |" in half.stdout and "WORSE" in half.stdout
    other_vectors = gate(engine, "v3")
    assert other_vectors.returncode == 1 and "| same vectors as serving | 1.0000 | 0.0000 |" in other_vectors.stdout
    other_model = gate(engine, "other")
    assert other_model.returncode == 2 and "another model" in other_model.stderr
    missing = gate(engine, "v9")
    assert missing.returncode == 2 and "no collection 'v9'" in missing.stderr


def test_a_service_follows_a_collection_alias_without_a_failed_request(tmp_path):
    path = str(tmp_path / "qdrant")
    build(path, "v1", seed=1)
    build(path, "v2", model="acme:next-8", dim=8, seed=2, products=12)
    target = target_of(path)
    aliases.set_alias(target, "live", "v1")

    def opener(name: str) -> Served:
        index = QdrantIndex.open(target(name))
        return Served(index, QueryEmbedder(index.model, index.dim, device="cpu"), name)

    follower = AliasFollower("", "live", opener, check_secs=0.0, resolve=lambda alias: aliases.resolve(target, alias))
    failures, stop = [], threading.Event()
    with BackgroundServer(create_app(None, None, follower=follower)) as server:
        def client():
            while not stop.is_set():
                health = requests.get(f"{server.url}/healthz", timeout=10).json()
                body = {"vector": np.eye(health["dim"], dtype=np.float32)[0].tolist(), "vector_model": health["model"],
                        "k": 5}
                response = requests.post(f"{server.url}/v1/search", json=body, timeout=10)
                # a vector of the model it just read; between the two requests the alias may have moved
                if response.status_code != 200 and "this index holds" not in response.text:
                    failures.append(response.text)
        thread = threading.Thread(target=client)
        thread.start()
        try:
            assert requests.get(f"{server.url}/healthz", timeout=10).json()["index"] == "v1"
            assert aliases.set_alias(target, "live", "v2", expect="v1") == "v1"
            requests.get(f"{server.url}/healthz", timeout=10)  # a request makes the service check the alias
            assert follower.wait_loaded(30)
            health = requests.get(f"{server.url}/healthz", timeout=10).json()
            assert health["index"] == "v2" and health["model"] == "acme:next-8" and health["live_docs"] == 12
        finally:
            stop.set()
            thread.join(30)
    assert failures == []


def test_the_faiss_alias_file_and_collection_aliases_refuse_the_same_bad_names(tmp_path):
    path = str(tmp_path / "qdrant")
    build(path, "v1", products=3)
    for alias, name in (("bad alias", "v1"), ("live", "../v1")):
        with pytest.raises(faiss_aliases.AliasError, match="a Qdrant name is letters, digits"):
            aliases.set_alias(target_of(path), alias, name)
