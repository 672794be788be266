"""Running the embed pipeline in tests: events, a fast config on loopback, and its JSON-lines outputs."""

from __future__ import annotations

import glob
import json

from apache_beam.testing.test_pipeline import TestPipeline

from media.download import FetchConfig
from model_handlers.config import ModelConfig
from pipelines import embed
from pipelines.options import EmbedJobConfig
from tests.conftest import TINY_CLIP
from transforms.images import ImageOptions

FAST_FETCH = FetchConfig(allow_private_hosts=True, connect_timeout_s=1, read_timeout_s=0.5, total_timeout_s=3,
                         retries=1, backoff_s=0.01, max_bytes=2_000_000, max_concurrent_downloads=8)


def event(n: int, **fields) -> bytes:
    data = {"event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": n, "shop_id": "s1", **fields}
    return json.dumps(data).encode()


def config(tmp_path, spec=TINY_CLIP) -> EmbedJobConfig:
    return EmbedJobConfig(
        model=ModelConfig(spec=spec, device="cpu", max_batch_size=8),
        images=ImageOptions(FAST_FETCH, max_pixels=4_000_000),
        input_file=str(tmp_path / "events.jsonl"),
        output_dir=str(tmp_path / "out"),
    )


def read_jsonl(pattern: str) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(pattern)) for line in open(path, encoding="utf-8")]


def run_files(tmp_path, lines: list[bytes], job: EmbedJobConfig):
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with TestPipeline(runner="FnApiRunner") as p:
        embed.build_pipeline(p, job)
    return read_jsonl(job.output_dir + "/embeddings/*.jsonl"), read_jsonl(job.output_dir + "/dead_letter/*.jsonl")
