"""Index aliases: the alias file's atomic switch, its command line, and a search service that follows it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

import storage
from model_handlers.config import ModelConfig
from model_handlers.projection import build_head, save_projection
from search import aliases
from search.sharded import HEAD_FILE
from tests.conftest import DIM, TINY_CLIP
from tests.support import index_helpers
from tests.support.server_process import ServerProcess
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[1]


def build_index(directory: Path, model: str, products: int = 40, seed: int = 0) -> None:
    index_helpers.build_index(directory, model, DIM, products, seed)


@pytest.fixture
def head(tmp_path) -> Path:
    path = tmp_path / "head.pt"
    torch.manual_seed(1)
    save_projection(path, build_head([DIM, DIM]), model=TINY_CLIP, name="alias-test", version=1, trained_on="test")
    return path


def test_set_resolve_and_refusals(tmp_path):
    root = str(tmp_path)
    build_index(tmp_path / "a", "m-a")
    build_index(tmp_path / "b", "m-b")
    assert aliases.set_alias(root, "live", "a") is None
    assert aliases.resolve(root, "live") == "a"
    assert aliases.set_alias(root, "live", "b", expect="a") == "a"
    assert aliases.resolve(root, "live") == "b"
    history = aliases.read_aliases(root)["history"]
    assert [(h["from"], h["to"]) for h in history] == [(None, "a"), ("a", "b")]
    with pytest.raises(aliases.AliasError, match="names 'b', not 'a'"):
        aliases.set_alias(root, "live", "a", expect="a")
    with pytest.raises(aliases.AliasError, match="no index 'c'"):
        aliases.set_alias(root, "live", "c")
    with pytest.raises(aliases.AliasError, match="use letters"):
        aliases.set_alias(root, "live", "../a")
    with pytest.raises(aliases.AliasError, match="no alias 'other'"):
        aliases.resolve(root, "other")
    assert aliases.resolve(root, "live") == "b"


def test_a_switch_that_lost_a_race_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "aliases.json"
    data, token = storage.read_versioned(path)
    assert data is None
    storage.replace_if(path, b'{"aliases": {"live": "a"}}', token)
    with pytest.raises(storage.Changed):
        storage.replace_if(path, b'{"aliases": {"live": "b"}}', token)  # read before the first write
    assert json.loads(path.read_text())["aliases"] == {"live": "a"}


COUNTER = '''
import json, sys, storage
path, n = sys.argv[1], int(sys.argv[2])
done = 0
while done < n:
    data, token = storage.read_versioned(path)
    count = json.loads(data)["count"] if data else 0
    try:
        storage.replace_if(path, json.dumps({"count": count + 1}).encode(), token)
        done += 1
    except storage.Changed:
        pass
'''


def test_concurrent_writers_lose_no_update_and_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "counter.json"
    seen, bad, stop = [], [], threading.Event()

    def read():
        while not stop.is_set():
            if path.exists():
                try:
                    seen.append(json.loads(path.read_bytes())["count"])
                except ValueError as e:
                    bad.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [subprocess.Popen([sys.executable, "-c", COUNTER, str(path), "25"], cwd=ROOT) for _ in range(6)]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    stop.set()
    reader.join()
    assert json.loads(path.read_bytes())["count"] == 150  # every read-modify-write landed once
    assert not bad and seen


def test_the_command_line_lists_and_switches(tmp_path):
    build_index(tmp_path / "v1", "m-a")
    build_index(tmp_path / "v2", "m-b")
    switched = cli("search.aliases", "--root", str(tmp_path), "--set", "live=v1")
    assert switched.returncode == 0 and "alias live: (none) -> v1" in switched.stdout
    listed = cli("search.aliases", "--root", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "v1: m-a, 64-d, 2 shard(s), hnsw  <- live" in listed.stdout and "v2: m-b" in listed.stdout
    missing = cli("search.aliases", "--root", str(tmp_path), "--set", "live=v3")
    assert missing.returncode == 1 and "no index 'v3'" in missing.stderr
    race = cli("search.aliases", "--root", str(tmp_path), "--set", "live=v2", "--expect", "v0")
    assert race.returncode == 1 and "names 'v1', not 'v0'" in race.stderr
    assert aliases.resolve(str(tmp_path), "live") == "v1"


def two_models(root: Path, head: Path) -> tuple[str, str]:
    """Index a of tiny CLIP, index b of tiny CLIP behind `head` (kept with it), `live` naming a."""
    model_a = ModelConfig(spec=TINY_CLIP).model_id
    model_b = ModelConfig(spec=TINY_CLIP, projection=str(head)).model_id
    build_index(root / "a", model_a, seed=1)
    build_index(root / "b", model_b, seed=2)
    shutil.copy(head, root / "b" / HEAD_FILE)
    aliases.set_alias(str(root), "live", "a")
    return model_a, model_b


def test_a_service_follows_the_alias_to_a_new_model_without_a_failed_request(tmp_path, head):
    """Index a of tiny CLIP serves; the alias moves to b (tiny CLIP plus a head, kept in the index): queries
    sent all along (text, so the query model must change too) all succeed, and then come from b."""
    model_a, model_b = two_models(tmp_path, head)
    server = ServerProcess(tmp_path, "--alias", "live", "--device", "cpu")
    answers, failures, stop = [], [], threading.Event()

    def client(kind: str):
        session = requests.Session()
        while not stop.is_set():
            body = {"text": "a red dress"} if kind == "text" else {"vector": [1.0] + [0.0] * (DIM - 1)}
            try:
                response = session.post(f"{server.url}/v1/search", json={**body, "k": 5}, timeout=30)
            except requests.RequestException as e:
                failures.append(repr(e))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
            else:
                answers.append((time.monotonic(), response.json()["model"], response.json()["index"]))

    try:
        assert "alias live -> a" in server.ready_line
        threads = [threading.Thread(target=client, args=(kind,)) for kind in ("text", "text", "vector")]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        aliases.set_alias(str(tmp_path), "live", "b")
        switched_at = time.monotonic()
        deadline = switched_at + 60
        while time.monotonic() < deadline and not (answers and answers[-1][1] == model_b):
            time.sleep(0.1)
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        health = requests.get(f"{server.url}/healthz", timeout=10).json()
    finally:
        server.stop()
    assert not failures, failures[:5]
    before = [a for a in answers if a[0] < switched_at]
    assert before and {a[1:] for a in before} == {(model_a, "a")}
    assert answers[-1][1:] == (model_b, "b") and {a[1:] for a in answers} == {(model_a, "a"), (model_b, "b")}
    assert (health["index"], health["model"], health["status"]) == ("b", model_b, "ok")


def test_an_alias_to_an_index_that_cannot_be_served_leaves_the_old_one_serving(tmp_path, head):
    model_a = ModelConfig(spec=TINY_CLIP).model_id
    model_b = ModelConfig(spec=TINY_CLIP, projection=str(head)).model_id
    build_index(tmp_path / "a", model_a)
    build_index(tmp_path / "b", model_b)  # tuned vectors, but no head kept with them
    aliases.set_alias(str(tmp_path), "live", "a")
    server = ServerProcess(tmp_path, "--alias", "live", "--device", "cpu")
    try:
        aliases.set_alias(str(tmp_path), "live", "b")
        deadline = time.monotonic() + 30
        health = {}
        while time.monotonic() < deadline and "alias" not in health.get("errors", {}):
            time.sleep(0.2)
            health = requests.get(f"{server.url}/healthz", timeout=10).json()
        answer = requests.post(f"{server.url}/v1/search", json={"text": "dress"}, timeout=30)
    finally:
        server.stop()
    assert health["status"] == "degraded" and "'b', which cannot be served" in health["errors"]["alias"]
    assert health["index"] == "a"
    assert answer.status_code == 200 and answer.json()["model"] == model_a


def test_alias_with_a_fixed_model_is_refused(tmp_path):
    result = cli("search.server", "--index_dir", str(tmp_path), "--alias", "live", "--model", TINY_CLIP,
                 "--port", "0")
    assert result.returncode == 2 and "drop --model and --projection" in result.stderr
    missing = cli("search.server", "--index_dir", str(tmp_path), "--alias", "live", "--port", "0")
    assert missing.returncode == 1 and "no alias 'live'" in missing.stderr


def test_replicas_behind_the_router_move_with_the_alias_without_a_failed_request(tmp_path, head):
    """Two replicas (a shard each) follow the alias behind search.router: while they move a moment apart,
    the router merges them instead of refusing a mix of indexes, and nothing fails."""
    model_a, model_b = two_models(tmp_path, head)
    replicas = [ServerProcess(tmp_path, "--alias", "live", "--shards", str(n), "--device", "cpu") for n in (0, 1)]
    router = ServerProcess(None, "--backends", ",".join(r.url for r in replicas), module="search.router")
    models, failures = [], []
    try:
        def ask():
            response = requests.post(f"{router.url}/v1/search", json={"text": "shoes", "k": 20}, timeout=30)
            if response.status_code != 200 or response.json()["partial"]:
                failures.append(f"{response.status_code} {response.text[:300]}")
            else:
                models.append(response.json()["model"])
                assert len({h["product_id"] for h in response.json()["results"]}) == 20

        for _ in range(20):
            ask()
        aliases.set_alias(str(tmp_path), "live", "b")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not models or models[-1] != model_b):
            ask()
        for _ in range(300):  # past the router's next health checks, which see both replicas on b
            ask()
    finally:
        router.stop()
        for replica in replicas:
            replica.stop()
    assert not failures, failures[:3]
    assert models[0] == model_a and models[-1] == model_b
    assert set(models) <= {model_a, model_b, ",".join(sorted([model_a, model_b]))}


def test_the_router_merges_replicas_mid_switch_but_refuses_other_mixes():
    import asyncio

    from search.router import Backends

    def health(model, shard, index="", num_shards=2):
        return {"model": model, "dim": 64, "num_shards": num_shards, "shards": [shard], "index": index}

    def checked(*bodies):
        backends = Backends([f"http://b{n}" for n in range(len(bodies))], 1.0)

        async def get(url):
            return 200, bodies[int(url.split("/")[2][1])], None

        backends.get = get
        try:
            asyncio.run(backends.check())
        except ValueError:
            pass
        return backends.misconfigured

    assert checked(health("A", 0, "a"), health("B", 1, "b")) == ""  # following one alias, a moment apart
    assert "different indexes" in checked(health("A", 0), health("B", 1))  # fixed --index_dir of two models
    assert "different indexes" in checked(health("A", 0, "a"), health("B", 1, "b", num_shards=4))
    assert "served by both" in checked(health("A", 0, "a"), health("A", 0, "a"))


def test_a_request_in_flight_finishes_on_the_index_it_started_with(tmp_path):
    """The old index is closed only once the last request holding it ends, however the switch interleaves."""
    from search.serving import AliasFollower, Served

    class FakeIndex:
        dim, model = 4, "m"

        def __init__(self, name):
            self.name, self.closed = name, threading.Event()

        def search(self, *args, **kwargs):
            assert not self.closed.is_set(), "searched a closed index"
            return []

        def stats(self):
            return {"live_docs": 0}

        def close(self):
            self.closed.set()

    class NoModel:
        backend = None

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text('{"model": "m", "dim": 4, "num_shards": 1}')
    aliases.set_alias(str(tmp_path), "live", "a")
    follower = AliasFollower(str(tmp_path), "live", lambda name: Served(FakeIndex(name), NoModel(), name), 0.0)
    request = follower.use()
    held = request.__enter__()
    aliases.set_alias(str(tmp_path), "live", "b")
    follower.check()
    assert follower.wait_loaded(10) and follower.current().name == "b"
    with follower.use() as fresh:
        assert fresh.name == "b"  # new requests go to the new index at once
    time.sleep(0.3)
    assert held.name == "a" and not held.index.closed.is_set()  # still in use: not closed
    held.index.search(None)
    request.__exit__(None, None, None)
    assert held.index.closed.wait(10)  # closed once its last request ended
    assert not follower.current().index.closed.is_set()


def test_hostile_alias_files_are_refused_in_one_line(tmp_path):
    build_index(tmp_path / "v1", "m-a")
    path = tmp_path / "aliases.json"
    for content in (b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"aliases": {"live": "../elsewhere"}}',
                    b'{"aliases": {"live": 5}}', b'{"aliases": {}, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                    b"[1, 2]", b"\xff\xfe"):
        path.write_bytes(content)
        with pytest.raises(aliases.AliasError, match="is not an alias file"):
            aliases.read_aliases(str(tmp_path))
        shown = cli("search.aliases", "--root", str(tmp_path), "--show", "live")
        assert shown.returncode == 1 and "is not an alias file" in shown.stderr and "Traceback" not in shown.stderr
    path.write_text('{"aliases": {"live": "v1"}, "history": 5}')  # a history that is no list is started again
    assert aliases.set_alias(str(tmp_path), "live", "v1") == "v1"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{bad")
    refused = cli("search.aliases", "--root", str(tmp_path), "--set", "live=broken")
    assert refused.returncode == 1 and "is not an index's layout" in refused.stderr
    listed = cli("search.aliases", "--root", str(tmp_path))
    assert listed.returncode == 0 and "broken: unreadable" in listed.stdout and "v1: m-a" in listed.stdout
    lone = cli("search.aliases", "--root", str(tmp_path), "--expect", "v1")
    assert lone.returncode == 2 and "--expect goes with --set" in lone.stderr
    both = cli("search.aliases", "--root", str(tmp_path), "--set", "live=v1", "--show", "live")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_service_serves_on_through_a_corrupt_alias_file(tmp_path):
    build_index(tmp_path / "a", ModelConfig(spec=TINY_CLIP).model_id)
    aliases.set_alias(str(tmp_path), "live", "a")
    good = (tmp_path / "aliases.json").read_bytes()
    server = ServerProcess(tmp_path, "--alias", "live", "--device", "cpu")
    try:
        (tmp_path / "aliases.json").write_bytes(b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}")
        statuses = []
        for _ in range(30):
            statuses.append(requests.post(f"{server.url}/v1/search", json={"vector": [1.0] * DIM}, timeout=30)
                            .status_code)
            time.sleep(0.1)
        degraded = requests.get(f"{server.url}/healthz", timeout=10).json()
        (tmp_path / "aliases.json").write_bytes(good)
        time.sleep(1.5)
        requests.get(f"{server.url}/healthz", timeout=10)
        time.sleep(0.2)
        healed = requests.get(f"{server.url}/healthz", timeout=10).json()
    finally:
        server.stop()
    assert set(statuses) == {200}
    warned = [line for line in server.log if "cannot read alias" in line]
    assert len(warned) == 1, warned  # once per fault, not each second it lasts
    assert degraded["status"] == "degraded" and "is not an alias file" in degraded["errors"]["alias"]
    assert healed["status"] == "ok" and healed["index"] == "a"


def test_a_root_that_holds_no_named_indexes_is_refused_in_one_line(tmp_path):
    """A missing path, a file, an index itself (its parent is the root) or an empty directory: said, exit 1."""
    build_index(tmp_path / "indexes" / "v1", "m-a")
    (tmp_path / "plain-file").write_text("")
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "no such directory"),
             (tmp_path / "plain-file", "is a file, not a directory of named indexes"),
             (tmp_path / "indexes" / "v1", f"is an index (it holds index.json), not a root of named indexes: give "
                                           f"the directory above it (--root {tmp_path / 'indexes'}), where it is "
                                           f"the index 'v1'"),
             (tmp_path / "empty", "no index under")]
    for root, message in cases:
        for action in ([], ["--show", "live"], ["--set", "live=v1"]):
            if root.name == "empty" and action:
                continue  # an empty root is a root: --show and --set say what they lack there
            result = cli("search.aliases", "--root", str(root), *action)
            assert result.returncode == 1, (root, action, result.stdout, result.stderr)
            assert not result.stdout and len(result.stderr.splitlines()) == 1, (root, action, result.stderr)
            assert result.stderr.startswith("search.aliases: ") and message in result.stderr, result.stderr
    listed = cli("search.aliases", "--root", str(tmp_path / "indexes"))
    assert listed.returncode == 0 and "v1: m-a, 64-d" in listed.stdout, listed.stderr


def test_help_says_what_the_command_does_in_whole_sentences():
    result = cli("search.aliases", "--help")
    assert result.returncode == 0, result.stderr
    description = result.stdout.split("\n\n")[1]  # between the usage line and the examples
    assert " ".join(description.split()) == ("Named indexes under one root, and the aliases that say which one "
                                             "serves (as Qdrant, Milvus and Elasticsearch name them).")
    assert "python -m search.aliases --root ROOT --set live=v2" in result.stdout
