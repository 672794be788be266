"""Flex Template metadata for the embed and index pipelines, generated from their options.

    python -m deploy.flex_templates        # rewrites deploy/templates/*-metadata.json

Parameters come from the same argparse definitions the pipelines parse (names, help texts), plus
a validation regex per parameter, so the templates cannot drift from the code (a test regenerates
them and compares). Options that only make sense locally (files mode, `--allow_private_hosts`)
are left out on purpose.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_handlers.config import DEVICES, PRECISIONS
from pipelines.options import (SINKS, SUBSCRIPTION_PATTERN, TABLE_PATTERN, TOPIC_PATTERN, EmbedOptions, IndexOptions,
                               SharedOptions, SinkOptions)
from search.qdrant.collection import COLLECTION_PATTERN, SECRET_PATTERN
from search.segment import SEGMENT_KINDS
from transforms.bigquery import WRITE_METHODS

__all__ = ["TEMPLATES", "metadata", "main"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

_SUBSCRIPTION, _TOPIC, _TABLE = SUBSCRIPTION_PATTERN, TOPIC_PATTERN, TABLE_PATTERN
_POSITIVE_INT = r"^[1-9][0-9]*$"
_NON_NEGATIVE_NUMBER = r"^[0-9]+(\.[0-9]+)?$"
_BOOLEAN = r"^(true|false)$"

REGEXES = {
    "model": r"^(open_clip:[A-Za-z0-9._-]+(/.+)?|packaged:effnet-lite0\+minilm)$",
    "projection": r"^(gs://[^\s]+|/[^\s]*)\.(pt|pth)$",
    "input_subscription": _SUBSCRIPTION,
    "output_topic": _TOPIC,
    "dead_letter_topic": _TOPIC,
    "bigquery_table": _TABLE,
    "bigquery_dead_letter_table": _TABLE,
    "state_table": _TABLE,
    "bigquery_write_method": "^(" + "|".join(("auto",) + WRITE_METHODS) + ")$",
    "timestamp_attribute": r"^[A-Za-z][-\w.]{0,255}$",
    "id_label": r"^[A-Za-z][-\w.]{0,255}$",
    "max_batch_duration_secs": _NON_NEGATIVE_NUMBER,
    "device": "^(" + "|".join(DEVICES) + ")$",
    "precision": "^(" + "|".join(PRECISIONS) + ")$",
    "min_batch_size": _POSITIVE_INT,
    "max_batch_size": _POSITIVE_INT,
    "image_batch_size": _POSITIVE_INT,
    "share_model_across_processes": _BOOLEAN,
    "image_weight": r"^0?\.[0-9]+$",
    "max_concurrent_downloads": _POSITIVE_INT,
    "max_image_bytes": _POSITIVE_INT,
    "max_image_pixels": _POSITIVE_INT,
    "download_timeout_secs": _NON_NEGATIVE_NUMBER,
    "download_retries": r"^[0-9]+$",
    "number_of_worker_harness_threads": _POSITIVE_INT,
    "index_dir": r"^(/[^:]*|gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?)$",
    "cache_dir": r"^/[^:]*$",
    "num_shards": _POSITIVE_INT,
    "commit_batch_size": _POSITIVE_INT,
    "hnsw_m": _POSITIVE_INT,
    "hnsw_ef_construction": _POSITIVE_INT,
    "segment_kind": "^(" + "|".join(SEGMENT_KINDS) + ")$",
    "ivf_nprobe": _POSITIVE_INT,
    "filterable": r"^([A-Za-z_][A-Za-z0-9_]{0,63}(:(keyword|float|int|bool))?(,[A-Za-z_][A-Za-z0-9_]{0,63}(:(keyword|float|int|bool))?)*)?$",
    "commit_batching": "^(auto|bundle|stateful)$",
    "commit_max_delay_secs": _NON_NEGATIVE_NUMBER,
    "sink": "^(" + "|".join(SINKS) + ")$",
    "collection": COLLECTION_PATTERN,
    "qdrant_url": r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$",
    "qdrant_api_key_secret": SECRET_PATTERN,
    "qdrant_timeout_secs": _POSITIVE_INT,
    "qdrant_retries": r"^[0-9]+$",
    "qdrant_shards": r"^[0-9]+$",
    "qdrant_replication_factor": r"^[0-9]+$",
}

# Beam's own flag, passed through to Dataflow (the Shopify memory lesson): a template parameter too.
_HARNESS_THREADS_HELP = ("Threads per SDK process on a worker; with max_concurrent_downloads it bounds the images "
                         "in memory. Default: Dataflow's choice.")

TEMPLATES = {
    "embed": {
        "name": "product-embeddings-embed",
        "description": "Streaming: product-change events on Pub/Sub → fused image+text embeddings on a Pub/Sub "
                       "topic and in BigQuery, with a dead-letter topic (docs/ARCHITECTURE.md §1).",
        "options": (SharedOptions, EmbedOptions),
        "required": ("input_subscription", "output_topic", "dead_letter_topic"),
        "excluded": ("input_file", "output_dir", "allow_private_hosts"),
        "harness_threads": True,
    },
    "index": {
        "name": "product-embeddings-index",
        "description": "Streaming: embedding records on Pub/Sub → the sharded FAISS index "
                       "(docs/ARCHITECTURE.md §10), batched per shard by a stateful step, each commit fenced "
                       "(index_dir: gs://..., each shard's writer restored on the worker that owns it, or a path "
                       "mounted on the workers); or, with sink=qdrant, a Qdrant collection, last writer wins in "
                       "the engine (collection, qdrant_url, the API key from qdrant_api_key_secret; §18).",
        "options": (SharedOptions, IndexOptions, SinkOptions),
        "required": ("input_subscription",),
        "excluded": ("input_dir", "dead_letter_dir", "qdrant_path"),
        "harness_threads": False,
    },
}


def _actions(option_classes) -> list[argparse.Action]:
    parser = argparse.ArgumentParser()
    for cls in option_classes:
        cls._add_argparse_args(parser)
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def metadata(kind: str) -> dict:
    spec = TEMPLATES[kind]
    parameters = []
    for action in _actions(spec["options"]):
        if action.dest in spec["excluded"]:
            continue
        required = action.dest in spec["required"]
        help_text = (action.help or action.dest).strip()
        if action.default not in (None, False, "") and not required:
            help_text += f" Default: {action.default}."
        parameters.append({"name": action.dest, "label": action.dest.replace("_", " ").capitalize(),
                           "helpText": help_text, "isOptional": not required, "regexes": [REGEXES[action.dest]]})
    if spec["harness_threads"]:
        parameters.append({"name": "number_of_worker_harness_threads", "label": "Number of worker harness threads",
                           "helpText": _HARNESS_THREADS_HELP, "isOptional": True,
                           "regexes": [REGEXES["number_of_worker_harness_threads"]]})
    return {"name": spec["name"], "description": spec["description"], "streaming": True,
            "sdkInfo": {"language": "PYTHON"}, "parameters": parameters}


def main() -> None:
    TEMPLATE_DIR.mkdir(parents=True, exist_ok=True)
    for kind in TEMPLATES:
        path = TEMPLATE_DIR / f"{kind}-metadata.json"
        path.write_text(json.dumps(metadata(kind), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
