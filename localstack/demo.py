"""`make demo`: the embed pipeline end to end on a catalogue of real product photos.

Builds the Fashion-MNIST catalogue (plus one broken event of each kind), serves its images
from a local HTTP server on 127.0.0.1, runs `pipelines.embed` with the packaged model on
the DirectRunner, and prints what came out: records, dead letters by stage, images/s.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import shutil
import time
from pathlib import Path

from localstack.catalogue import broken_events, build_catalogue
from localstack.image_server import ImageServer, Route
from pipelines import embed


def read_jsonl(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="out/demo")
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--model", default="packaged:effnet-lite0+minilm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.output_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    with ImageServer(out / "images") as server:
        server.routes["/not-an-image.txt"] = Route(body=b"hello", headers={"Content-Type": "text/plain"})
        products = build_catalogue(out / "images", server.url(""), args.products)
        broken = broken_events(server.url(""))
        events_file = out / "events.jsonl"
        with open(events_file, "wb") as f:
            for product in products:
                f.write(json.dumps(product.event).encode() + b"\n")
            for message in broken:
                f.write(message + b"\n")
        print(f"catalogue: {len(products)} products from Fashion-MNIST + {len(broken)} broken events -> {events_file}")
        print(f"images served from {server.url('')} ({out / 'images'})")

        started = time.perf_counter()
        embed.run([
            "--input_file", str(events_file),
            "--output_dir", str(out),
            "--model", args.model,
            "--allow_private_hosts",
            "--runner", "DirectRunner",
        ])
        seconds = time.perf_counter() - started

    records = read_jsonl(str(out / "embeddings" / "*.jsonl"))
    letters = read_jsonl(str(out / "dead_letter" / "*.jsonl"))
    event_letters = [d for d in letters if not d["image_url"]]
    by_stage = collections.Counter(d["stage"] for d in event_letters)
    images = sum(r["image_count"] for r in records)
    print(f"embedded:      {len(records)} products ({images} images) with {records[0]['model'] if records else '-'}")
    print(f"dead-lettered: {len(event_letters)} events: " + ", ".join(f"{k}={v}" for k, v in sorted(by_stage.items())))
    embedded_ids = {r["event_id"] for r in records}
    image_letters = [d for d in letters if d["image_url"]]
    kept = sum(1 for d in image_letters if d["event_id"] in embedded_ids)
    print(f"failed images: {len(image_letters)} ({kept} of products embedded from what was left)")
    print(f"accounted for: {len(records) + len(event_letters)} of {len(products) + len(broken)} input lines")
    print(f"throughput:    {images / seconds:.1f} images/s, {seconds:.1f}s wall (model load included)")
    print(f"output:        {out / 'embeddings'}/  {out / 'dead_letter'}/")


if __name__ == "__main__":
    main()
