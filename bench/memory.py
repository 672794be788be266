"""Peak memory of a worker under a burst of large images, at two download caps, then double the burst.

    python -m bench.memory [--events 2000] [--caps 4,16]

Each run is a fresh process (its peak RSS, `VmHWM`, is the figure) running the batch pipeline on
`--events` products, each with one 5-10 MB JPEG served by a separate HTTP server process on
127.0.0.1 (so the server's memory is not counted). The tiny open_clip model keeps inference
cheap: what is measured is the images in flight. Memory is bounded by design when doubling the
burst grows the peak by less than 10% (the target), at every cap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import photo_jpeg, write_result
from localstack.static_server import StaticFileServer

MODEL = "open_clip:tiny-clip-test"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(events_file: str, out: str, cap: int) -> None:
    """One pipeline run; prints its peak RSS as JSON on the last line."""
    from pipelines import embed

    started = time.perf_counter()
    embed.run(["--input_file", events_file, "--output_dir", out, "--model", MODEL, "--device", "cpu",
               "--allow_private_hosts", "--max_concurrent_downloads", str(cap), "--runner", "FnApiRunner"])
    records = sum(1 for path in Path(out, "embeddings").glob("*.jsonl") for _ in open(path))
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "records": records,
                      "seconds": round(time.perf_counter() - started, 1)}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--caps", default="4,16")
    parser.add_argument("--worker", nargs=3, metavar=("EVENTS_FILE", "OUT", "CAP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return {}

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    images = work / "images"
    images.mkdir()
    sizes = []
    for i, (w, h) in enumerate([(4000, 3000), (4200, 3150), (4600, 3450), (5000, 3750)]):
        body = photo_jpeg((w, h), seed=i, quality=95, noise=10.0)
        (images / f"{i}.jpg").write_bytes(body)
        sizes.append(len(body))
    rows = []
    try:
        with StaticFileServer(images) as server:
            for events in (args.events, 2 * args.events):
                events_file = work / f"events-{events}.jsonl"
                events_file.write_text("\n".join(json.dumps({
                    "event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": 1, "title": f"p{n}",
                    "image_urls": [server.url(f"{n % 4}.jpg")]}) for n in range(events)))
                for cap in (int(c) for c in args.caps.split(",")):
                    out = work / f"out-{events}-{cap}"
                    run = subprocess.run([sys.executable, "-m", "bench.memory", "--worker", str(events_file), str(out),
                                          str(cap)], capture_output=True, text=True, check=True)
                    row = {"events": events, "max_concurrent_downloads": cap, **json.loads(run.stdout.splitlines()[-1])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    growth = {}
    for cap in (int(c) for c in args.caps.split(",")):
        single, double = (next(r["peak_rss_mb"] for r in rows if r["events"] == n and r["max_concurrent_downloads"] == cap)
                          for n in (args.events, 2 * args.events))
        growth[str(cap)] = round(double / single - 1, 4)
    holds = all(g < 0.10 for g in growth.values()) and all(r["records"] == r["events"] for r in rows)
    print("peak growth when the burst doubles: " + ", ".join(f"cap {c}: {g:+.1%}" for c, g in growth.items()))
    print(f"{'holds' if holds else 'MISSES'}: < 10% growth at every cap")
    write_result("memory", {
        "what": f"peak RSS of a batch pipeline worker process, images of {min(sizes) / 1e6:.1f}-{max(sizes) / 1e6:.1f} MB",
        "figure": {"peak_growth_when_burst_doubles": growth},
        "baseline": {f"{r['events']} events, cap {r['max_concurrent_downloads']}": r["peak_rss_mb"] for r in rows},
        "ratio": growth, "target": "< 10% peak growth when the burst doubles", "holds": holds, "runs": rows,
    })
    return {"rows": rows, "growth": growth}


if __name__ == "__main__":
    main()
