"""Deployment, checked offline: Dataflow jobs built with --dry_run, the deploy scripts' dry runs,
the Flex Template metadata against the options the pipelines accept, the image's pins, the GPU check."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_runner_api_pb2

from deploy import flex_templates, gpu_check
from pipelines import embed, index
from pipelines.options import EmbedJobConfig

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "us-central1-docker.pkg.dev/my-project/product-embeddings/worker:abc123"
GPU = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
DATAFLOW = ["--runner", "DataflowRunner", "--dry_run=True", "--no_auth", "--project", "my-project",
            "--region", "us-central1", "--temp_location", "gs://my-bucket/tmp", "--streaming",
            "--sdk_container_image", IMAGE, "--sdk_location", "container", "--dataflow_service_options", GPU,
            "--number_of_worker_harness_threads", "4", "--experiments", "use_runner_v2", "--enable_streaming_engine",
            "--machine_type", "n1-standard-8", "--max_num_workers", "10"]


@pytest.fixture
def no_network(monkeypatch):
    """Graph construction and job building may resolve nothing but loopback."""
    real = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise AssertionError(f"network lookup of {host!r} while building the job")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


def dry_run(build, argv):
    options = PipelineOptions(argv)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return pipeline.run().job


def assert_dataflow_job(job, urns_wanted: set[str]):
    options = job.options
    assert options.view_as(StandardOptions).streaming
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [GPU]
    assert options.view_as(DebugOptions).number_of_worker_harness_threads == 4
    assert "enable_streaming_engine" in options.view_as(DebugOptions).experiments
    environments = job.proto_pipeline.components.environments.values()
    images = {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image for e in environments
              if e.urn == "beam:env:docker:v1"}
    assert images == {IMAGE}
    urns = {t.spec.urn for t in job.proto_pipeline.components.transforms.values()}
    assert urns_wanted <= urns, urns_wanted - urns


def test_the_embed_job_builds_offline_for_dataflow(no_network, monkeypatch):
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    argv = DATAFLOW + [
        "--input_subscription", "projects/my-project/subscriptions/product-events-embed",
        "--output_topic", "projects/my-project/topics/product-embeddings",
        "--dead_letter_topic", "projects/my-project/topics/product-events-dlq",
        "--bigquery_table", "my-project:product_embeddings.product_embeddings",
        "--bigquery_dead_letter_table", "my-project:product_embeddings.dead_letter",
        # The Storage Write API (the default on Dataflow) expands through a Java service whose jar the
        # image stages; offline, the test takes streaming inserts (docs/DEPLOY.md).
        "--bigquery_write_method", "STREAMING_INSERTS",
        "--id_label", "event_id", "--device", "cuda", "--model", "open_clip:ViT-B-32/gs://my-bucket/models/clip.pt"]
    job = dry_run(lambda p, o: embed.build_pipeline(p, EmbedJobConfig.from_options(o)), argv)
    assert_dataflow_job(job, {"beam:transform:pubsub_read:v1", "beam:transform:pubsub_write:v1",
                              "beam:transform:write_to_big_query:v0"})
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"ReadEvents", "EmbedProducts/RunInference", "PublishEmbeddings", "EmbeddingsToBigQuery",
            "PublishDeadLetters", "DeadLettersToBigQuery"} <= names


def test_the_auto_write_method_on_dataflow_is_the_storage_write_api(monkeypatch):
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    config = EmbedJobConfig.from_options(PipelineOptions(DATAFLOW + [
        "--input_subscription", "projects/my-project/subscriptions/events", "--output_topic",
        "projects/my-project/topics/records", "--dead_letter_topic", "projects/my-project/topics/dead",
        "--bigquery_table", "my-project:ds.t"]))
    assert config.bigquery_write_method == "STORAGE_WRITE_API"


def test_the_index_job_builds_offline_for_dataflow(no_network, tmp_path):
    argv = DATAFLOW + ["--input_subscription", "projects/my-project/subscriptions/product-embeddings-index",
                       "--index_dir", "gs://my-bucket/index", "--num_shards", "4",
                       "--dead_letter_topic", "projects/my-project/topics/product-events-dlq"]
    job = dry_run(lambda p, o: index.build_pipeline(p, index.IndexJobConfig.from_options(o)), argv)
    assert_dataflow_job(job, {"beam:transform:pubsub_read:v1", "beam:transform:pubsub_write:v1"})


def make_dry_run(target: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "REGION", "BUCKET", "IMAGE", "MODEL", "PROJECTION")}
    return subprocess.run(["make", "-s", target], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**clean, "DRY_RUN": "1", **env})


@pytest.mark.parametrize("target, tools", [
    ("deploy-infra", {"gcloud", "bq"}),
    ("build-image", {"gcloud"}),
    ("build-templates", {"gcloud"}),
    ("launch-embed", {"gcloud"}),
    ("launch-index", {"gcloud"}),
    ("launch-search", {"gcloud"}),
    ("rollout-deploy", {"gcloud"}),
])
def test_every_deploy_target_dry_runs_to_complete_commands(target, tools):
    result = make_dry_run(target, PROJECT="my-project")
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert commands and {c.split()[0] for c in commands if c.split()[0] in ("gcloud", "bq")} == tools
    for command in commands:
        assert "my-project" in command or "deploy." in command, command
        # An unset variable shows as an empty value (`--x=`, `a//b`) or a literal `$NAME`.
        assert not re.search(r"=(\s|$|\\,)|(?<!:)//|\$\{|\$[A-Z]", command), f"unset or empty value in: {command}"
    if target == "launch-index":  # on Dataflow, batched per shard, the index on the bucket
        (run,) = commands
        for wanted in ("gcloud dataflow flex-template run index-", "index_dir=gs://my-project-product-embeddings/indexes/v1~",
                       "commit_batching=stateful", "segment_kind=hnsw", "--enable-streaming-engine"):
            assert wanted in run.replace("\\", ""), wanted
    if target == "launch-search":  # 4 shards, 2 per replica: two groups behind load balancers, a router
        flat = [c.replace("\\", "") for c in commands]
        servers = [c for c in flat if "search.server" in c]
        assert [re.search(r"--shards (\S+)", c).group(1) for c in servers] == ["0-1", "2-3"]
        (router,) = [c for c in flat if "search.router" in c]
        assert "--backends http://search-g0.search-g0.il4.us-central1.lb.my-project.internal:8080," in router
        for name in ("search-g0", "search-g1", "search-router"):
            assert any(c.startswith(f"gcloud compute instance-groups managed create {name} ") and
                       "--health-check=search-livez" in c for c in flat), name
            assert any(c.startswith(f"gcloud compute forwarding-rules create {name} ") and
                       "--load-balancing-scheme=INTERNAL" in c for c in flat), name
    if target == "launch-embed":
        (run,) = commands
        for wanted in ("sdk_container_image=us-central1-docker.pkg.dev/my-project/product-embeddings/worker:",
                       "install-nvidia-driver", "number_of_worker_harness_threads=4", "id_label=event_id",
                       "--enable-streaming-engine", "sdk_location=container", "--service-account-email"):
            assert wanted in run.replace("\\", ""), wanted


def test_the_index_job_launches_into_a_qdrant_collection_with_the_key_left_in_secret_manager():
    url = "https://abc.us-east4-0.gcp.cloud.qdrant.io:6333"
    result = make_dry_run("launch-index", PROJECT="my-project", SINK="qdrant", QDRANT_URL=url, FILTERABLE="brand")
    assert result.returncode == 0, result.stderr
    (run,) = [c.replace("\\", "") for c in result.stdout.splitlines() if c.startswith("+ ")]
    for wanted in ("gcloud dataflow flex-template run index-", "~sink=qdrant~", "~collection=products-v1~",
                   f"~qdrant_url={url}~", "~qdrant_api_key_secret=projects/my-project/secrets/qdrant-api-key~",
                   "~filterable=brand~", "~qdrant_shards=6~qdrant_replication_factor=2~", "--enable-streaming-engine"):
        assert wanted in run, wanted
    assert "index_dir" not in run and "commit_batching" not in run and "api_key=" not in run
    parameters = dict(p.split("=", 1) for p in run.split("^~^", 1)[1].split()[0].split("~"))
    template = {p["name"]: p for p in flex_templates.metadata("index")["parameters"]}
    for name, value in parameters.items():  # what the launch passes, the template takes
        if name not in ("sdk_container_image", "sdk_location"):
            assert re.match(template[name]["regexes"][0], value), (name, value)
    grants = make_dry_run("deploy-infra", PROJECT="my-project", SINK="qdrant").stdout
    assert "gcloud secrets add-iam-policy-binding qdrant-api-key --project=my-project" in grants
    refused = make_dry_run("launch-index", PROJECT="my-project", SINK="qdrant")
    assert refused.returncode != 0 and "SINK=qdrant needs QDRANT_URL" in refused.stderr and not refused.stdout.strip()


def test_a_top_tuned_head_reaches_the_embed_job_the_index_updater_and_the_search_service():
    head = "gs://my-bucket/heads/packaged-fashion-mnist-v1.pt"
    (embed,) = [c for c in make_dry_run("launch-embed", PROJECT="my-project", PROJECTION=head).stdout.splitlines()
                if c.startswith("+ ")]
    assert f"~projection={head}" in embed.replace("\\", "")
    (job,) = [c for c in make_dry_run("launch-index", PROJECT="my-project", PROJECTION=head).stdout.splitlines()
              if c.startswith("+ ")]
    assert f"~projection={head}" in job.replace("\\", "")
    # The replicas follow the alias; the head comes with the index (pipelines.index --projection keeps it there).
    replicas = [c.replace("\\", "") for c in make_dry_run("launch-search", PROJECT="my-project",
                                                           PROJECTION=head).stdout.splitlines() if "search.server" in c]
    assert len(replicas) == 2 and all("--index_dir gs://my-project-product-embeddings/indexes --alias live" in c
                                      and "--projection" not in c for c in replicas)
    assert "projection" not in make_dry_run("launch-index", PROJECT="my-project").stdout


@pytest.mark.parametrize("setting", [{"SHARDS_PER_REPLICA": "0"}, {"NUM_SHARDS": "-1"}, {"SEARCH_REPLICAS": "two"}])
def test_launch_search_refuses_a_setting_that_is_not_a_positive_count(setting):
    result = make_dry_run("launch-search", PROJECT="my-project", **setting)
    name, value = next(iter(setting.items()))
    assert result.returncode != 0 and not result.stdout.strip()  # nothing printed, nothing created
    assert f"{name} must be a whole number >= 1, not '{value}'" in result.stderr


def test_deploy_targets_refuse_to_run_without_a_project():
    result = make_dry_run("launch-embed")
    assert result.returncode != 0 and "set PROJECT" in result.stderr


@pytest.mark.parametrize("kind", sorted(flex_templates.TEMPLATES))
def test_flex_template_metadata_matches_the_options_the_pipelines_accept(kind):
    committed = json.loads((ROOT / "deploy" / "templates" / f"{kind}-metadata.json").read_text())
    assert committed == flex_templates.metadata(kind), "run python -m deploy.flex_templates"
    accepted = PipelineOptions([]).get_all_options()
    parameters = {p["name"]: p for p in committed["parameters"]}
    for name, parameter in parameters.items():
        assert name in accepted, f"{name} is not a pipeline option"
        assert parameter["helpText"] and parameter["regexes"]
        default = accepted[name]
        if default not in (None, False, True):
            assert re.match(parameter["regexes"][0], str(default)), (name, default)
        assert not re.match(parameter["regexes"][0], "not valid; at all"), name
    for name in flex_templates.TEMPLATES[kind]["required"]:
        assert parameters[name]["isOptional"] is False, name
    assert "allow_private_hosts" not in parameters  # local-only: never exposed on Dataflow


def test_the_image_pins_the_versions_everything_else_uses():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    requirements = (ROOT / "requirements.txt").read_text()
    beam_version = re.search(r"apache-beam\[gcp\]==([\d.]+)", requirements).group(1)
    assert f"ARG BEAM_VERSION={beam_version}" in dockerfile
    assert "ARG PYTHON_VERSION=3.11" in dockerfile and "python_requires=\">=3.11,<3.12\"" in (ROOT / "setup.py").read_text()
    torch = re.search(r"torch==([\d.]+)", requirements).group(1)
    assert f"torch=={torch}" in dockerfile and "cu126" in dockerfile and "nvidia/cuda:12." in dockerfile
    assert "faiss-gpu==1.15.1" in dockerfile and '"gpu": ["faiss-gpu==1.15.1"]' in (ROOT / "setup.py").read_text()
    assert "pip check" in dockerfile and "gpu_check.py" in (ROOT / "deploy" / "worker_entrypoint.sh").read_text()


def test_the_gpu_check_fails_fast_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        assert gpu_check.main() == 0
    else:
        assert gpu_check.main() == 1
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_the_rollout_twin_prints_the_whole_sequence_in_order():
    head = "gs://my-bucket/heads/packaged-fashion-mnist-v1.pt"
    result = make_dry_run("rollout-deploy", PROJECT="my-project", INDEX_NAME="v2", PROJECTION=head,
                          OLD_JOBS="2026-old-embed,2026-old-index")
    assert result.returncode == 0, result.stderr
    commands = [line[2:].replace("\\", "") for line in result.stdout.splitlines() if line.startswith("+ ")]
    steps = [next(i for i, c in enumerate(commands) if wanted in c) for wanted in (
        "gcloud pubsub subscriptions create product-events-v2 ", "flex-template run index-",
        "-m pipelines.reembed --runner DataflowRunner", "flex-template run embed-", "-m evaluation.gate",
        "-m search.aliases", "gcloud dataflow jobs drain 2026-old-embed")]
    assert steps == sorted(steps)  # subscription before the backfill, embed job after it, switch after the gate
    index_job, reembed, embed_job = (commands[steps[1]], commands[steps[2]], commands[steps[3]])
    assert "index_dir=gs://my-project-product-embeddings/indexes/v2~" in index_job
    assert "input_subscription=projects/my-project/subscriptions/product-embeddings-v2-index" in index_job
    assert "--source=bigquery:my-project:product_embeddings.product_state" in reembed and "--wait" in reembed
    assert f"--projection={head}" in reembed and "--output_topic=projects/my-project/topics/product-embeddings-v2" in reembed
    assert "input_subscription=projects/my-project/subscriptions/product-events-v2~" in embed_job
    assert "--set live=v2 --expect v1" in commands[steps[5]]
