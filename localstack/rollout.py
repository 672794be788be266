"""`make rollout`: a new model rolled out on the local stand-ins, with search answering throughout.

    python -m localstack.rollout --model SPEC [--projection HEAD] [--from_model SPEC] [--products 120]
        [--qrels FILE] [--photos fashion-mnist] [--output_dir out/rollout]

The sequence of docs/DEPLOY.md §5, each step the command a deployment runs (as a subprocess):
1. the serving system: the demo catalogue (real product photos on a local image server) embedded by
   `--from_model` in files mode (`pipelines.embed`, which also writes the product state), indexed
   (`pipelines.index`) as ROOT/v1, `live` pointed at it, and `search.server --alias live` started;
   a client queries it from here on, counting every failed request;
2. the new model's topic and subscriptions on the Pub/Sub emulator (its subscription to the events
   topic holds every change from now on) and its streaming index job into ROOT/NAME;
3. the backfill, `pipelines.reembed --source_dir` over the product state into the new model's topic,
   while catalogue changes (an upsert, a patch, a delete) are published to the events topic, and a
   wait until the new index holds every backfilled product;
4. the new model's streaming embed job on that subscription: the changes it held reach the new index
   (a patch needs the product's vector there, hence after the backfill), and a wait until the index
   holds every live product at its latest version;
5. the gate (`evaluation.gate`); a refusal stops here, the alias unmoved;
6. the switch (`search.aliases --set live=NAME --expect v1`), until the service answers from NAME;
7. the jobs stopped (here the old model's jobs were batch runs: a deployment drains its old
   streaming jobs, `deploy/deploy.sh rollout` prints how).
Everything it started is stopped at the end, also on failure.

`--backend qdrant` (`make rollout BACKEND=qdrant`): the same sequence on Qdrant collections, v1 and NAME,
in a Qdrant stand-in (localstack.qdrant_server, the local mode behind the REST API, in OUTPUT_DIR/qdrant),
which every command reaches with `--qdrant_url`, as it would reach a server: the index jobs write with
`--sink qdrant`, the service serves `--backend qdrant --alias live`, and the alias is a collection alias.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from localstack.emulator import EmulatorProcess
from localstack.image_server import ImageServer
from localstack.pubsub_emulator import PubSubEmulator
from localstack.search_stack import ServiceProcess
from model_handlers.config import DEFAULT_MODEL
from sample_catalogue.products import build_catalogue

__all__ = ["main", "rollout"]

ROOT = Path(__file__).resolve().parents[1]
FILTERABLE = "brand,category,material,price:float,in_stock:bool"
SERVING = "v1"
QUERIES = ("ankle boots", "wool coat", "leather bag", "summer dress", "trainers", "cotton t-shirt")


class RolloutFailed(RuntimeError):
    """A step did not do what it should; the message says which, and where its log is."""


def _run(args: list[str], log: Path, say, timeout_s: float = 900, ok: tuple[int, ...] = (0,)) -> str:
    """A command as a user types it (`python -m ...`), said with its duration; its stderr goes to `log`,
    its stdout is returned. An exit status outside `ok` is RolloutFailed."""
    started = time.monotonic()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=out,
                                text=True, timeout=timeout_s)
    lines = result.stdout.strip().splitlines()
    if result.returncode not in ok:
        raise RolloutFailed(f"python -m {' '.join(args[:1])} exited with {result.returncode}; see {log}:\n"
                            + "\n".join(lines[-5:]) + log.read_text(errors="replace")[-1500:])
    say(f"  $ python -m {' '.join(args)}  [{time.monotonic() - started:.0f} s]")
    return result.stdout


class _Backend:
    """Where the named indexes live, as each command's flags say it: a root of FAISS indexes, or the
    collections of a Qdrant server at `qdrant_url`."""

    def __init__(self, root: Path, qdrant_url: str = ""):
        self.root, self.qdrant_url = root, qdrant_url

    def index_flags(self, name: str) -> list[str]:
        if self.qdrant_url:
            return ["--sink", "qdrant", "--collection", name, "--qdrant_url", self.qdrant_url]
        return ["--index_dir", str(self.root / name)]

    def root_flags(self) -> list[str]:
        return ["--qdrant_url", self.qdrant_url] if self.qdrant_url else ["--root", str(self.root)]

    def server_flags(self) -> list[str]:
        return ["--backend", "qdrant", "--qdrant_url", self.qdrant_url] if self.qdrant_url else \
            ["--index_dir", str(self.root)]

    def where(self, name: str) -> str:
        return f"collection {name}" if self.qdrant_url else str(self.root / name)

    def live(self, name: str) -> dict[str, int]:
        """product → version of the index's live products ({} while it does not exist)."""
        if self.qdrant_url:
            from search.qdrant.collection import QdrantTarget, connected

            with connected(QdrantTarget(collection=name, url=self.qdrant_url)) as collection:
                if collection.layout() is None:
                    return {}
                return {pid: version for pid, (version, _) in collection.live_products().items()}
        return _live(self.root / name)


class _Client(threading.Thread):
    """Text queries in a loop against the service, every answer and every failure kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="rollout-client")
        self.url, self.answers, self.failures = url, [], []
        self._stop_event = threading.Event()

    def run(self):
        session = requests.Session()
        n = 0
        while not self._stop_event.is_set():
            query = QUERIES[n % len(QUERIES)]
            n += 1
            try:
                response = session.post(f"{self.url}/v1/search", json={"text": query, "k": 10}, timeout=30)
            except requests.RequestException as e:
                self.failures.append(repr(e))
                continue
            if response.status_code == 200:
                self.answers.append((time.monotonic(), response.json()["index"], response.json()["model"]))
            else:
                self.failures.append(f"{response.status_code}: {response.text[:200]}")
            time.sleep(0.02)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=60)


def _live(index_dir: Path) -> dict[str, int]:
    from search.sharded import ShardedIndex

    if not (index_dir / "index.json").exists():
        return {}
    index = ShardedIndex.open(index_dir)
    try:
        return {pid: version for shard in index.shards for pid, (version, _) in shard.live_products().items()}
    finally:
        index.close()


def _changes(catalogue, count: int) -> list[dict]:
    """Catalogue changes made while the backfill runs: new titles (re-embedded), new prices (a patch) and,
    last, a product taken off sale."""
    changes = []
    for n, product in enumerate(catalogue[:count]):
        event = product.event
        version = event["version"] + 1_000
        if n == count - 1:
            changes.append({"event_id": f"change-{n}", "product_id": event["product_id"], "op": "delete",
                            "version": version})
        elif n % 2:
            changes.append({"event_id": f"change-{n}", "product_id": event["product_id"], "op": "patch",
                            "version": version, "attributes": {**event["attributes"], "price": 1.0}})
        else:
            changes.append({**event, "event_id": f"change-{n}", "version": version,
                            "title": f"{event['title']} (new season)"})
    return changes


def _wait_for(backend: _Backend, name: str, expected: dict[str, int], what: str, logs: Path, say,
              timeout_s: float = 600) -> dict[str, int]:
    """Waits until the index holds exactly `expected` (product → version) live; RolloutFailed after `timeout_s`."""
    say(f"  waiting until {name} holds {len(expected)} live products at the versions of {what}")
    deadline, live = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        live = backend.live(name)
        if live == expected:
            return live
        time.sleep(1)
    missing = sorted(set(expected) - set(live))[:5]
    stale = sorted(p for p in expected if p in live and live[p] != expected[p])[:5]
    raise RolloutFailed(f"{backend.where(name)} holds {len(live)} of {len(expected)} products (missing {missing}, "
                        f"stale {stale}); see the logs in {logs}")


def rollout(model: str, projection: str, from_model: str, products: int, out: Path, name: str = "v2",
            qrels: str | None = None, photos: str | None = None, photo_queries: int = 300, changes: int = 5,
            linger_secs: float = 2.0, say=print, backend_name: str = "faiss") -> dict:
    """Runs the sequence (module docstring); returns what it measured. RolloutFailed when a step fails."""
    out.mkdir(parents=True, exist_ok=True)
    root, logs = out / "indexes", out / "logs"
    logs.mkdir(exist_ok=True)
    new_flags = ["--model", model, *(["--projection", projection] if projection else [])]
    report: dict = {"name": name, "model": model, "projection": projection, "backend": backend_name}
    with contextlib.ExitStack() as stack:
        backend = _Backend(root)
        if backend_name == "qdrant":
            from localstack.qdrant_server import QdrantStandIn

            engine = stack.enter_context(QdrantStandIn(out / "qdrant", logs / "qdrant.log"))
            backend = _Backend(root, engine.url)
            say(f"local stack: a Qdrant stand-in at {engine.url} (localstack.qdrant_server, data in {out / 'qdrant'})")
        say(f"local stack: Pub/Sub emulator, image server; catalogue of {products} product photos")
        ps = stack.enter_context(PubSubEmulator(log_dir=logs))
        images = stack.enter_context(ImageServer(out / "photos"))
        catalogue = build_catalogue(out / "photos", images.url(""), products)
        (out / "events.jsonl").write_text("".join(json.dumps(p.event) + "\n" for p in catalogue))

        say(f"1. serving: {from_model} embeds the catalogue, indexed as {backend.where(SERVING)}, alias live -> "
            f"{SERVING}")
        _run(["pipelines.embed", "--input_file", str(out / "events.jsonl"), "--output_dir", str(out / "serving"),
              "--model", from_model, "--allow_private_hosts"], logs / "embed-serving.log", say)
        _run(["pipelines.index", "--input_dir", str(out / "serving" / "embeddings"), *backend.index_flags(SERVING),
              "--filterable", FILTERABLE], logs / "index-serving.log", say)
        _run(["search.aliases", *backend.root_flags(), "--set", f"live={SERVING}"], logs / "alias.log", say)
        server = ServiceProcess(["search.server", *backend.server_flags(), "--alias", "live", "--device", "cpu"],
                                logs / "search.log", 300)
        stack.callback(server.stop)
        say(f"search: {server.url}/ (alias live -> {SERVING})")
        client = _Client(server.url)
        client.start()
        stack.callback(client.stop)

        say(f"2. the new model's topics and subscriptions; its index job into {backend.where(name)}")
        ps.create_topic("product-events")
        events_sub = ps.create_subscription("product-events", f"product-events-{name}")  # buffers changes from now
        ps.create_topic(f"product-embeddings-{name}")
        records_sub = ps.create_subscription(f"product-embeddings-{name}", f"product-embeddings-{name}-index")
        ps.create_topic("product-events-dlq")
        env = {**os.environ, **ps.env()}

        def start(job: str, args: list[str]) -> None:
            process = EmulatorProcess(f"{job}-{name}", [sys.executable, "-m", *args], lambda: True,
                                      logs / f"{job}-{name}.log", env=env)
            process.start()
            stack.callback(process.stop)
            say(f"  $ python -m {' '.join(args)}  [streaming]")

        start("index", ["pipelines.index", "--streaming", "--runner", "BundleBasedDirectRunner", "--input_subscription",
                        records_sub, *backend.index_flags(name), "--filterable", FILTERABLE, *new_flags])

        say("3. backfill from the product state, while the catalogue changes")
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="backfill"))
        backfill = pool.submit(_run, ["pipelines.reembed", "--source_dir", str(out / "serving" / "product_state"),
                                      "--output_topic", ps.topic(f"product-embeddings-{name}"),
                                      "--allow_private_hosts", *new_flags], logs / "reembed.log", say)
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        changed = _changes(catalogue, changes)
        time.sleep(3)
        for event in changed:
            publisher.publish(ps.topic("product-events"), json.dumps(event).encode(),
                              event_id=event["event_id"]).result(timeout=30)
        say(f"  published {len(changed)} changes to product-events (upsert, patch, delete): "
            f"{events_sub.rsplit('/', 1)[1]} holds them")
        # The serving system takes them as well (a deployment's old streaming jobs; here a files-mode run).
        (out / "changes.jsonl").write_text("".join(json.dumps(event) + "\n" for event in changed))
        _run(["pipelines.embed", "--input_file", str(out / "changes.jsonl"), "--output_dir",
              str(out / "serving-changes"), "--model", from_model, "--allow_private_hosts"],
             logs / "embed-serving-changes.log", say)
        _run(["pipelines.index", "--input_dir", str(out / "serving-changes" / "embeddings"),
              *backend.index_flags(SERVING)], logs / "index-serving-changes.log", say)
        backfill.result()  # its RolloutFailed, if it failed
        backfilled = {p.event["product_id"]: p.event["version"] for p in catalogue}
        _wait_for(backend, name, backfilled, "the backfill", logs, say)

        # Only now the changes: a patch needs the product's vector in the new index, so the new model's
        # embed job starts on a subscription that has held every change since before the backfill read
        # the state; an older backfilled version never overwrites a newer change (last writer wins).
        say(f"4. the new model's streaming embed job, from the changes {events_sub.rsplit('/', 1)[1]} held")
        start("embed", ["pipelines.embed", "--streaming", "--runner", "BundleBasedDirectRunner", "--input_subscription",
                        events_sub, "--output_topic", ps.topic(f"product-embeddings-{name}"), "--dead_letter_topic",
                        ps.topic("product-events-dlq"), "--allow_private_hosts", *new_flags])
        expected = dict(backfilled)
        for event in changed:
            if event["op"] == "delete":
                expected.pop(event["product_id"])
            else:
                expected[event["product_id"]] = event["version"]
        report["indexed"] = len(_wait_for(backend, name, expected, "the changes", logs, say))

        say(f"5. gate: {name} against the serving {SERVING}")
        gate = _run(["evaluation.gate", *backend.root_flags(), "--candidate", name, "--device", "cpu",
                     *(["--qrels", qrels] if qrels else []),
                     *(["--photos", photos, "--photo_queries", str(photo_queries)] if photos else [])],
                    logs / "gate.log", say, ok=(0, 1))
        say(gate.rstrip())
        report["gate"] = "passes" in gate.splitlines()[-1]
        if not report["gate"]:
            say(f"the gate refused {name}: alias live stays on {SERVING}")
            report["failures"] = client.failures
            return report

        say(f"6. switch: alias live -> {name}")
        _run(["search.aliases", *backend.root_flags(), "--set", f"live={name}", "--expect", SERVING],
             logs / "alias.log", say)
        switched = time.monotonic()
        deadline = switched + 120
        while time.monotonic() < deadline and not (client.answers and client.answers[-1][1] == name):
            time.sleep(0.1)
        if not client.answers or client.answers[-1][1] != name:
            raise RolloutFailed(f"the service still answers from {SERVING} 120 s after the switch; see {logs}/search.log")
        say(f"serving {name} ({client.answers[-1][2]}) {time.monotonic() - switched:.1f} s after the switch")
        time.sleep(linger_secs)
        client.stop()
        before = sum(1 for t, _, _ in client.answers if t < switched)
        report |= {"requests": len(client.answers) + len(client.failures), "failures": client.failures,
                   "before_switch": before, "after_switch": len(client.answers) - before,
                   "served_model": client.answers[-1][2]}
        say(f"client: {report['requests']} requests during the rollout, {len(client.failures)} failed; "
            f"{before} answered by {SERVING}, then {report['after_switch']} by {name}")
        say("7. the new model's jobs stopped here (a deployment keeps them and drains the old model's: "
            "deploy/deploy.sh rollout)")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localstack.rollout", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="The model to roll out.")
    parser.add_argument("--projection", default="", help="Its top-tuned head (make eval writes one under out/eval-heads).")
    parser.add_argument("--from_model", default=DEFAULT_MODEL, help="The model serving before the rollout.")
    parser.add_argument("--name", default="v2", help="The new index's name under OUTPUT_DIR/indexes.")
    parser.add_argument("--products", type=int, default=120, help="Catalogue size.")
    parser.add_argument("--changes", type=int, default=5, help="Catalogue changes published during the backfill.")
    parser.add_argument("--qrels", help="Judged queries for the gate (evaluation/judged/demo.jsonl fits the catalogue).")
    parser.add_argument("--photos", choices=("fashion-mnist",), help="Labelled photos for the gate.")
    parser.add_argument("--photo_queries", type=int, default=300, help="How many, with --photos.")
    parser.add_argument("--linger_secs", type=float, default=2.0, help="Searching on after the switch, before stopping.")
    parser.add_argument("--output_dir", default="out/rollout", help="Indexes, product state, photos and logs go here.")
    parser.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss",
                        help="Named FAISS indexes under OUTPUT_DIR/indexes, or Qdrant collections in a local "
                             "Qdrant stand-in (OUTPUT_DIR/qdrant) with a collection alias.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.name == SERVING:
        raise SystemExit(f"--name {SERVING} is the serving index's name: pick another")
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        report = rollout(args.model, args.projection, args.from_model, args.products, Path(args.output_dir).resolve(),
                         args.name, args.qrels, args.photos, args.photo_queries, args.changes, args.linger_secs,
                         say, args.backend)
    except RolloutFailed as e:
        raise SystemExit(f"rollout failed: {e}") from None
    if not report.get("gate"):
        raise SystemExit(1)
    if report["failures"]:
        raise SystemExit(f"rollout: {len(report['failures'])} requests failed: {report['failures'][:3]}")


if __name__ == "__main__":
    main()
