"""Image decode throughput in threads of one process against separate processes: how many images per
second one Python process can decode for the model, whatever its cores.

    python -m bench.decode_scaling [--threads 1,4,16] [--processes 16] [--images 64]

Each task decodes the same 800×600 studio JPEG `--images` times as the pipeline does
(media.decode.decode_image with ViT-B-32's preprocessing). Threads share the GIL; processes do not.
Baseline: one thread. What it answers: the embed pipeline decodes in a thread pool of one SDK process,
so one process feeds the model at most the threads' figure, and a GPU worker needs several SDK
processes (one model shared by them: `--share_model_across_processes`) to be fed at the model's rate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from bench.common import RESULTS, photo_jpeg, write_result

MODEL = "open_clip:ViT-B-32"


def _decode(times: int) -> int:
    from media.decode import decode_image
    from model_handlers.backends import image_preprocess

    spec, body = image_preprocess(MODEL), photo_jpeg((800, 600), seed=1)
    for _ in range(times):
        decode_image(body, spec)
    return times


def rate(executor, workers: int, images: int) -> float:
    """Images/s of `workers` tasks of `images` decodes each (after one warm-up task per worker)."""
    list(executor.map(_decode, [1] * workers))
    started = time.perf_counter()
    done = sum(executor.map(_decode, [images] * workers * 2))
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,4,16", help="thread counts, comma-separated")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes (default: the cores)")
    parser.add_argument("--images", type=int, default=64, help="decodes per task")
    parser.add_argument("--output_dir", help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    rows = {}
    for threads in (int(t) for t in args.threads.split(",")):
        with ThreadPoolExecutor(threads) as pool:
            rows[f"{threads} threads"] = round(rate(pool, threads, args.images), 1)
        print(f"{threads:>3} threads, one process: {rows[f'{threads} threads']:,.0f} images/s", flush=True)
    with ProcessPoolExecutor(args.processes) as pool:
        rows[f"{args.processes} processes"] = round(rate(pool, args.processes, args.images), 1)
    print(f"{args.processes:>3} processes:           {rows[f'{args.processes} processes']:,.0f} images/s", flush=True)
    baseline = rows[next(iter(rows))]
    result = {"model": MODEL, "cores": os.cpu_count(), "images_per_s": rows,
              "speedup_vs_one_thread": {k: round(v / baseline, 2) for k, v in rows.items()}}
    write_result("decode_scaling", result, Path(args.output_dir) if args.output_dir else RESULTS)
    return result


if __name__ == "__main__":
    main()
