"""Every command a user types, run the way they type it: as a subprocess, from the repository root.

`--help` lists each option with its default; a mistyped flag is refused with a suggestion; a
Dataflow dry run builds offline and returns; bad model specs, a missing input and an unreachable
Pub/Sub fail at launch in one line; a batch run ends with a readable summary; an index of vectors
from a model this product cannot run is built and served for vector queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from localstack.emulator import free_port
from pipelines.options import EmbedOptions, IndexOptions, LaunchOptions, SharedOptions, SinkOptions
from tests.conftest import TINY_CLIP
from tests.support.index_helpers import record
from tests.support.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DATAFLOW = ["--runner", "DataflowRunner", "--dry_run=True", "--no_auth", "--project", "my-project",
            "--region", "us-central1", "--temp_location", "gs://my-bucket/tmp", "--streaming"]
SUBSCRIPTION = "projects/my-project/subscriptions/product-events-embed"
TOPICS = ["--output_topic", "projects/my-project/topics/product-embeddings",
          "--dead_letter_topic", "projects/my-project/topics/product-events-dlq"]
# Resolves loopback only, so a command that reaches for the network fails loudly.
OFFLINE_SITECUSTOMIZE = '''
import socket
_real = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    if host not in ("localhost", "127.0.0.1", "::1", None):
        raise socket.gaierror(socket.EAI_NONAME, f"offline test: no lookup of {host!r}")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _loopback_only
'''


def cli(*args: str, timeout: float = 120, env: dict | None = None, offline_dir: Path | None = None):
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    if offline_dir is not None:
        (offline_dir / "sitecustomize.py").write_text(OFFLINE_SITECUSTOMIZE)
        environment["PYTHONPATH"] = f"{offline_dir}{os.pathsep}{ROOT}"
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def help_entries(text: str) -> dict[str, str]:
    """flag → its help text (wrapped lines joined), from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^\s{2}(--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith(" " * 6) and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def beam_options_parser(*classes) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for cls in classes:
        cls._add_argparse_args(parser)
    return parser


def _parsers():
    from evaluation.gate import build_parser as gate_parser
    from evaluation.run import build_parser as evaluation_parser
    from localstack.demo import build_parser as demo_parser
    from localstack.rollout import build_parser as rollout_parser
    from pipelines.options import ReembedOptions
    from search.aliases import build_parser as aliases_parser
    from search.recall import build_parser as recall_parser
    from search.router import build_parser as router_parser
    from search.server import build_parser as server_parser

    return {
        "pipelines.embed": beam_options_parser(SharedOptions, EmbedOptions, LaunchOptions),
        "pipelines.index": beam_options_parser(SharedOptions, IndexOptions, SinkOptions, LaunchOptions),
        "search.server": server_parser(),
        "search.router": router_parser(),
        "search.recall": recall_parser(),
        "evaluation.run": evaluation_parser(),
        "localstack.demo": demo_parser(),
        "pipelines.reembed": beam_options_parser(SharedOptions, EmbedOptions, ReembedOptions, LaunchOptions),
        "search.aliases": aliases_parser(),
        "evaluation.gate": gate_parser(),
        "localstack.rollout": rollout_parser(),
    }


@pytest.mark.parametrize("module", ["pipelines.embed", "pipelines.index", "search.server", "search.router",
                                    "search.recall", "evaluation.run", "localstack.demo", "pipelines.reembed",
                                    "search.aliases", "evaluation.gate", "localstack.rollout"])
def test_help_lists_every_option_with_its_default(module):
    result = cli(module, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    expected = flags_of(_parsers()[module])
    assert expected, module
    for flag, action in expected.items():
        assert flag in entries, f"{module} --help does not list {flag}"
        if not action.required:
            assert "(default:" in entries[flag], f"{module} --help gives no default for {flag}: {entries[flag]}"
    if module == "pipelines.embed":
        assert "(default: packaged:effnet-lite0+minilm)" in entries["--model"]
        assert "(default: 0.5)" in entries["--image_weight"]


@pytest.mark.parametrize("module, argv, suggestion", [
    ("pipelines.embed", ["--input_file", "x", "--output_dir", "y", "--imge_weight", "0.9"], "--image_weight"),
    ("pipelines.index", ["--input_dir", "x", "--index_dir", "y", "--num_shard", "3"], "--num_shards"),
])
def test_a_mistyped_flag_is_refused_with_a_suggestion(module, argv, suggestion):
    result = cli(module, *argv, timeout=60)
    assert result.returncode != 0
    assert f"did you mean {suggestion}?" in result.stderr and "Traceback" not in result.stderr


def test_the_embed_job_dry_runs_on_dataflow_from_the_cli_offline(tmp_path, monkeypatch):
    result = cli("pipelines.embed", *DATAFLOW, "--input_subscription", SUBSCRIPTION, *TOPICS,
                 "--bigquery_table", "my-project:product_embeddings.product_embeddings",
                 "--bigquery_write_method", "STREAMING_INSERTS",
                 env={"BIGQUERY_EMULATOR_HOST": "", "PUBSUB_EMULATOR_HOST": ""}, offline_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed: dry run, nothing submitted: DataflowRunner job" in result.stdout
    assert "project my-project, region us-central1" in result.stdout
    assert "Traceback" not in result.stderr
    assert "apache_beam.typehints" not in result.stderr  # Beam's type-hint chatter is off


def test_the_index_job_dry_runs_on_dataflow_from_the_cli_offline(tmp_path):
    result = cli("pipelines.index", *DATAFLOW, "--input_subscription",
                 "projects/my-project/subscriptions/product-embeddings-index", "--index_dir", "gs://my-bucket/index",
                 "--num_shards", "4", "--dead_letter_topic", "projects/my-project/topics/index-dlq",
                 env={"PUBSUB_EMULATOR_HOST": ""}, offline_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "index: dry run, nothing submitted: DataflowRunner job" in result.stdout
    # Batched per shard by a stateful step on Dataflow: what it checkpoints before Pub/Sub is acked.
    assert "stateful: UpdateIndex/BatchPerShard/" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--index_dir", "/mnt/index"], "is a path on each worker's own disk: on a remote runner"),
    (["--index_dir", "gs://my-bucket/index", "--commit_batching", "bundle"], "--commit_batching bundle on a remote"),
])
def test_the_index_job_on_dataflow_refuses_a_local_index_or_bundle_commits(tmp_path, extra, message):
    result = cli("pipelines.index", *DATAFLOW, "--input_subscription",
                 "projects/my-project/subscriptions/product-embeddings-index", *extra,
                 env={"PUBSUB_EMULATOR_HOST": ""}, offline_dir=tmp_path)
    _one_line_refusal(result, message)


def test_the_stateful_per_shard_batching_builds_the_same_index_locally(tmp_path):
    records = [record(f"p{n}", 1 + n % 3, dim=16, model="acme:custom-16", shop_id=f"shop-{n % 2}", seed=n)
               for n in range(60)]
    records += [record(f"p{n}", 9, "delete", dim=16, model="acme:custom-16") for n in range(0, 60, 7)]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in records) + "\n")
    result = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
                 "--num_shards", "3", "--commit_batching", "stateful", "--commit_batch_size", "7", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "69 records read (committed in stateful per-shard batches), 0 dead letters" in result.stdout
    assert "holds 51 live products in 3 shards" in result.stdout
    from search.sharded import ShardedIndex

    index = ShardedIndex.open(tmp_path / "index")
    live = {pid: version for shard in index.shards for pid, (version, _) in shard.live_products().items()}
    assert live == {f"p{n}": 1 + n % 3 for n in range(60) if n % 7}


def _one_line_refusal(result, message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]


@pytest.mark.parametrize("model, message", [
    ("open_clip:ViT-B-23", "open_clip has no model config named 'ViT-B-23'"),
    ("open_clip:ViT-B-32/no-such-tag", "knows no pretrained tag 'no-such-tag'"),
    ("open_clip:ViT-B-32/missing/clip.pt", "checkpoint missing/clip.pt does not exist"),
    ("torch:resnet50", "must look like open_clip:ARCH"),
])
def test_a_bad_model_spec_is_refused_at_launch_in_one_line(tmp_path, model, message):
    (tmp_path / "events.jsonl").write_text("{}\n")
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--model", model, timeout=60)
    _one_line_refusal(result, message)


def test_an_input_that_matches_nothing_is_refused_in_one_line(tmp_path):
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "none-*.jsonl"), "--output_dir",
                 str(tmp_path / "out"), timeout=60)
    _one_line_refusal(result, "matches no files")


def test_an_unreachable_pubsub_emulator_is_refused_within_seconds():
    dead = free_port()  # nothing listens here
    started = time.monotonic()
    result = cli("pipelines.embed", "--streaming", "--runner", "BundleBasedDirectRunner",
                 "--input_subscription", "projects/test-project/subscriptions/events", *[
                     t.replace("my-project", "test-project") for t in TOPICS],
                 env={"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{dead}"}, timeout=60)
    assert time.monotonic() - started < 15
    _one_line_refusal(result, f"cannot reach the Pub/Sub emulator at 127.0.0.1:{dead} (PUBSUB_EMULATOR_HOST)")


def test_missing_credentials_are_refused_with_a_hint(tmp_path):
    env = {"PUBSUB_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": "", "HOME": str(tmp_path),
           "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    result = cli("pipelines.index", "--streaming", "--input_subscription",
                 "projects/test-project/subscriptions/records", "--index_dir", str(tmp_path / "index"),
                 env=env, offline_dir=tmp_path, timeout=60)
    _one_line_refusal(result, "gcloud auth application-default login")
    assert "PUBSUB_EMULATOR_HOST" in result.stderr


def test_a_batch_run_ends_with_a_readable_summary(tmp_path):
    events = [{"event_id": "e1", "product_id": "p1", "op": "upsert", "version": 1, "title": "linen shirt"},
              {"event_id": "e2", "product_id": "p2", "op": "upsert", "version": 1}]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--model", TINY_CLIP, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("embed: ")]
    assert re.match(r"embed: DONE in [\d.]+ s: 1 records, 2 dead letters \(parse=1, validate=1\); written to ", summary)
    assert "apache_beam.typehints" not in result.stderr and "Traceback" not in result.stderr


def test_a_model_shared_across_worker_processes_embeds_every_product(tmp_path):
    """--share_model_across_processes with several SDK processes (as a Dataflow worker runs one per core):
    every batch failed here once, as an `inference` dead letter, because the shared model is a proxy."""
    events = [{"event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": 1, "title": f"linen shirt {n}"}
              for n in range(12)]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--model", TINY_CLIP, "--direct_num_workers", "2", "--direct_running_mode",
                 "multi_processing", "--share_model_across_processes", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("embed: ")]
    assert "embed: DONE" in summary and ": 12 records, 0 dead letters" in summary, summary
    records = [json.loads(line) for part in (tmp_path / "out" / "embeddings").glob("part*") for line in part.open()]
    assert sorted(r["product_id"] for r in records) == sorted(e["product_id"] for e in events)
    assert {r["model"] for r in records} == {TINY_CLIP}


@pytest.fixture
def custom_index(tmp_path):
    """An index built by the CLI from records of a model this product cannot run."""
    rng = np.random.default_rng(3)
    records = [record(f"p{n}", 1, dim=64, model="acme:custom-64", shop_id=f"shop-{n % 2}",
                      seed=int(rng.integers(1 << 30))) for n in range(40)]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in records) + "\n")
    result = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
                 "--num_shards", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "40 records read (40 upserted, 0 deleted, 0 stale or repeated), 0 dead letters" in result.stdout
    assert "holds 40 live products in 2 shards (acme:custom-64, 64-d, hnsw segments)" in result.stdout
    return tmp_path / "index", records


def test_an_index_of_a_model_it_cannot_run_is_built_and_served_for_vector_queries(custom_index):
    index_dir, records = custom_index
    server = ServerProcess(index_dir)
    try:
        assert f"search page: {server.url}/ (40 products, 2 shards, model acme:custom-64;" in server.ready_line
        target = records[7]
        # As docs/SEARCH_API.md §2's curl example sends it: `curl -d` posts a form Content-Type.
        response = requests.post(f"{server.url}/v1/search", data=json.dumps({"vector": target.embedding.tolist(),
                                                                              "k": 3}),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["product_id"] == target.product_id
        text = requests.post(f"{server.url}/v1/search", json={"text": "linen shirt"}, timeout=30)
        assert text.status_code == 400 and "send a vector query" in text.json()["error"]
        assert requests.get(f"{server.url}/healthz", timeout=10).json()["queries"] == ["vector"]
    finally:
        server.stop()


def test_the_service_answers_every_error_in_one_shape_and_documents_what_it_sends(custom_index):
    index_dir, _ = custom_index
    server = ServerProcess(index_dir)
    try:
        missing = requests.get(f"{server.url}/no/such/page", timeout=10)
        wrong_method = requests.get(f"{server.url}/v1/search", timeout=10)
        no_body = requests.post(f"{server.url}/v1/search", timeout=10)
        assert (missing.status_code, wrong_method.status_code, no_body.status_code) == (404, 405, 400)
        for response in (missing, wrong_method, no_body):
            assert set(response.json()) == {"error"} and response.json()["error"]
        spec = requests.get(f"{server.url}/openapi.json", timeout=10).json()
        search = spec["paths"]["/v1/search"]["post"]
        assert set(search["responses"]) == {"200", "400", "413", "503"}
        assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("SearchResponse")
        assert "HTTPValidationError" not in spec["components"]["schemas"]
    finally:
        server.stop()


def test_a_busy_port_fails_at_once_before_the_model_loads(tmp_path, custom_index):
    index_dir, _ = custom_index
    # An index whose model cannot load: were the port checked after the model, the error would be the model's.
    layout = json.loads((index_dir / "index.json").read_text())
    (index_dir / "index.json").write_text(json.dumps({**layout, "model": "open_clip:tiny-clip-test/missing.pt"}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("search.server", "--index_dir", str(index_dir), "--port", str(port), timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_no_dependency_points_at_a_local_file():
    """A fresh machine has only the package registries: no file:// URL, path or editable local install."""
    local = re.compile(r"(file:|@\s*/|^\s*-e\s|^\s*/|^\s*\.\.?/|\.whl\b)", re.IGNORECASE)
    sources = {name: (ROOT / name).read_text().splitlines() for name in ("requirements.txt", "constraints.txt")}
    import ast

    setup = ast.parse((ROOT / "setup.py").read_text())
    extras = next(node for node in ast.walk(setup) if isinstance(node, ast.keyword) and node.arg == "extras_require")
    sources["setup.py extras"] = [item.value for values in extras.value.values for item in values.elts]
    for name, lines in sources.items():
        for line in lines:
            if line.strip() and not line.strip().startswith("#"):
                assert not local.search(line), f"{name}: {line!r} points at a local file"


@pytest.mark.parametrize("module, argv, message", [
    ("pipelines.embed", ["--input_file", "x", "--output_dir", "y", "--num_shards", "3"],
     "--num_shards is an option of the other pipeline"),
    ("pipelines.index", ["--input_dir", "x", "--index_dir", "y", "--image_weight", "0.9"],
     "--image_weight is an option of the other pipeline"),
    ("pipelines.embed", [*DATAFLOW[:-3], "--temp_location", "/tmp/local", "--input_subscription", SUBSCRIPTION,
                         *TOPICS, "--streaming"], "--temp_location '/tmp/local' must be gs://BUCKET/PATH"),
    ("pipelines.embed", ["--runner", "DataflowRunner", "--dry_run=True", "--no_auth", "--streaming",
                         "--input_subscription", SUBSCRIPTION, *TOPICS], "--project is required on Dataflow"),
    ("pipelines.embed", ["--input_file", "x", "--output_dir", "y", "--download_timeout_secs", "-1"],
     "argument --download_timeout_secs: must be a number in 0.1..600 (seconds), got '-1'"),
    ("pipelines.index", ["--input_dir", "x", "--index_dir", "y", "--hnsw_m", "0"],
     "argument --hnsw_m: must be an integer in 2..256, got '0'"),
    ("search.recall", ["--index_dir", "/nonexistent/index"], "no index at /nonexistent/index"),
    ("search.recall", ["--index_dir", "x", "--ef_search", "abc"], "--ef_search 'abc' must be"),
    ("localstack.demo", ["--products", "0"], "--products must be at least 1"),
    ("localstack.demo", ["--model", "open_clip:ViT-B-23"], "open_clip has no model config"),
])
def test_more_refusals_are_one_line_without_a_traceback(module, argv, message, tmp_path):
    result = cli(module, *argv, timeout=60, offline_dir=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_outputs_that_cannot_be_written_are_refused_at_launch(tmp_path):
    (tmp_path / "events.jsonl").write_text("{}\n")
    (tmp_path / "a-file").write_text("x")
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"), "--output_dir",
                 str(tmp_path / "a-file"), timeout=60)
    _one_line_refusal(result, f"--output_dir {tmp_path / 'a-file'} is a file, not a directory")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text("{}\n")
    result = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir",
                 str(tmp_path / "a-file" / "index"), timeout=60)
    _one_line_refusal(result, "cannot be written")


def test_a_batch_dry_run_with_object_storage_paths_stays_offline(tmp_path):
    result = cli("pipelines.embed", *DATAFLOW[:-1], "--input_file", "gs://my-bucket/events/*.jsonl",
                 "--output_dir", "gs://my-bucket/out", offline_dir=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed: dry run, nothing submitted" in result.stdout


def test_the_segment_flags_shape_a_new_index_and_non_unit_vectors_are_refused(tmp_path):
    records = [record(f"p{n}", 1, dim=16, model="acme:custom-16", seed=n) for n in range(30)]
    bad = dataclasses.replace(record("bad", 1, dim=16, model="acme:custom-16"),
                              embedding=np.array([3.0] + [0.0] * 15, np.float32))  # not unit length
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in [*records, bad]) + "\n")
    result = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
                 "--segment_kind", "hnsw_sq8", "--hnsw_m", "8", "--hnsw_ef_construction", "40",
                 "--dead_letter_dir", str(tmp_path / "dead"),
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "31 records read (30 upserted, 0 deleted, 0 stale or repeated), 1 dead letters (sink=1)" in result.stdout
    assert "(acme:custom-16, 16-d, hnsw_sq8 segments)" in result.stdout
    letter = json.loads(next((tmp_path / "dead").glob("*")).read_text().splitlines()[0])
    assert letter["product_id"] == "bad" and "not a finite unit vector" in letter["error"]
    from search.store import IndexStore

    store = IndexStore(tmp_path / "index" / "shard-000", read_only=True)
    assert (store.settings.segment.kind, store.settings.segment.m, store.settings.segment.ef_construction) == \
        ("hnsw_sq8", 8, 40)
    assert json.loads((tmp_path / "index" / "index.json").read_text())["segment_kind"] == "hnsw_sq8"
    other_kind = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir",
                     str(tmp_path / "index"), "--segment_kind", "ivf_pq", timeout=60)
    _one_line_refusal(other_kind, "is an index of hnsw_sq8 segments (a kind is fixed when the index is made")
    again = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
                "--num_shards", "4", timeout=60)
    _one_line_refusal(again, "has 1 shard(s) (resharding is a new index)")


def test_filterable_attributes_are_declared_once_and_filter_from_the_first_commit(tmp_path):
    records = [dataclasses.replace(record(f"p{n}", 1, dim=16, model="acme:custom-16", seed=n),
                                   attributes={"brand": ["acme", "zeta"][n % 2], "price": float(n)}, title=f"item {n}")
               for n in range(30)]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "part-0.jsonl").write_text("\n".join(r.to_json() for r in records) + "\n")
    bad = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
              "--filterable", "brand,price:money", timeout=60)
    _one_line_refusal(bad, "--filterable: filterable field 'price': type 'money' is not one of keyword, float, int, bool")
    made = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
               "--filterable", "brand,price:float", timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.loads((tmp_path / "index" / "index.json").read_text())["filterable"] == ["brand", "price:float"]
    from search.filters import parse_filter
    from search.sharded import ShardedIndex

    index = ShardedIndex.open(tmp_path / "index")
    cheap_acme = parse_filter({"brand": "acme", "price": {"lt": 10}}, index.filterable)
    hits = index.search(np.array(records[0].embedding), k=30, filter=cheap_acme)
    assert sorted(h.product_id for h in hits) == ["p0", "p2", "p4", "p6", "p8"]
    other = cli("pipelines.index", "--input_dir", str(tmp_path / "records"), "--index_dir", str(tmp_path / "index"),
                "--filterable", "brand", timeout=60)
    _one_line_refusal(other, "filters on brand,price:float (fixed when the index is made)")


def test_a_long_local_run_logs_progress(tmp_path, image_server):
    from localstack.image_server import Route
    from tests.conftest import image_bytes

    image_server.routes["/a.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"},
                                          delay=0.2)
    events = [{"event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": 1, "title": "shirt",
               "image_urls": [image_server.url("a.jpg")]} for n in range(70)]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    result = cli("pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--model", TINY_CLIP, "--allow_private_hosts", "--max_concurrent_downloads",
                 "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"progress: \d+ records, 0 dead letters, [\d.]+ records/s", result.stderr), result.stderr[-3000:]
