"""Batching on a bursty stream: in-bundle against stateful (`--max_batch_duration_secs`) batching.

    python -m bench.batching [--products 240] [--burst 24] [--rate 6] [--duration 0.5]

Runs the streaming demo machinery (Pub/Sub emulator, DirectRunner, packaged model on CPU) twice on
the same stream: `--burst` events published together every `burst / rate` seconds. Reports batch
fill (mean and max products per RunInference batch, from the pipeline's `batch_size` metric) and
freshness (publish → output topic, p50/p99) for each. No target: the figures say when to choose
which (docs/PERFORMANCE.md §4). Writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import percentiles, write_result
from localstack.demo import run_streaming_demo
from model_handlers.config import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=240)
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=0.5, help="max_batch_duration_secs of the stateful run")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--output_dir", default="out/bench-batching")
    args = parser.parse_args(argv)
    rows = {}
    for name, duration in (("in-bundle", 0.0), ("stateful", args.duration)):
        report = run_streaming_demo(args.products, args.rate, args.model, Path(args.output_dir).resolve() / name,
                                    say=lambda *_: None, search=False, burst=args.burst,
                                    max_batch_duration_secs=duration, dataset=name.replace("-", "_"))
        p50, p99 = percentiles(report.freshness_ms, 50, 99)
        rows[name] = {"max_batch_duration_secs": duration, "batch_fill": report.batch_sizes,
                      "freshness_p50_ms": p50, "freshness_p99_ms": p99, "records": report.records}
        print(f"{name:>10}: batches {report.batch_sizes}, freshness p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
              f"{report.records}/{report.published} records", flush=True)
    added = round(rows["stateful"]["freshness_p50_ms"] - rows["in-bundle"]["freshness_p50_ms"], 1)
    write_result("batching", {
        "what": f"bursts of {args.burst} events every {args.burst / args.rate:g}s, {args.products} events, "
                f"{args.model} on CPU, BundleBasedDirectRunner + Pub/Sub emulator",
        "figure": {"stateful": rows["stateful"]},
        "baseline": {"in-bundle": rows["in-bundle"]},
        "ratio": {"added_p50_latency_ms": added},
        "target": "none: reported to choose between them",
        "holds": all(r["records"] == args.products for r in rows.values()),
        "runs": rows,
    })
    return rows


if __name__ == "__main__":
    main()
