"""Freshness: how long from publishing a product event to its record on the output topic, and
to a search through the router finding it.

Runs the streaming demo (Pub/Sub emulator, bqemulator, DirectRunner) at a steady rate with both
pipelines, a search replica per shard and `search.router` in front, and reports p50/p99 of
publish → a consumer of the output topic has the record, and publish → a vector query through the
router returns the product at that version, against the baseline of the same hop through the
emulator with no pipeline in between.

    python -m bench.freshness [--products 300] [--rate 5] [--model packaged:effnet-lite0+minilm]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from localstack.demo import DemoReport, print_report, run_streaming_demo
from model_handlers.config import DEFAULT_MODEL

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--output_dir", default="out/bench-freshness")
    args = parser.parse_args(argv)
    report = run_streaming_demo(args.products, args.rate, args.model, Path(args.output_dir).resolve(),
                                router=True)
    print_report(report)
    p = DemoReport.percentile
    result = {
        "name": "freshness",
        "what": "publish -> consumer of the output topic has the record (ms); publish -> a vector query "
                "through search.router over a replica per shard returns the product at that version (ms)",
        "model": report.model,
        "rate_events_per_s": report.rate,
        "products": report.published,
        "runner": "BundleBasedDirectRunner (streaming), Pub/Sub emulator, bqemulator",
        "machine": f"{platform.machine()}, CPU only",
        "freshness_p50_ms": round(p(report.freshness_ms, 50), 1),
        "freshness_p99_ms": round(p(report.freshness_ms, 99), 1),
        "searchable_p50_ms": round(p(report.searchable_ms, 50), 1),
        "searchable_p99_ms": round(p(report.searchable_ms, 99), 1),
        "searchable_products": len(report.searchable_ms),
        "searchable_probe_every_ms": 250,
        "baseline": "the same hop through the emulator with no pipeline",
        "baseline_p50_ms": round(p(report.transport_ms, 50), 1),
        "baseline_p99_ms": round(p(report.transport_ms, 99), 1),
        "records": report.records,
        "bigquery_rows": report.bigquery_rows,
        "dead_letters_by_stage": report.event_letters,
    }
    result["ratio_p50"] = round(result["freshness_p50_ms"] / max(result["baseline_p50_ms"], 1e-3), 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "freshness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'freshness.json'}")


if __name__ == "__main__":
    main()
