"""The bare model on glibc's malloc against tcmalloc, each in a fresh process, same batches.

    python -m bench.allocator [--products 384] [--rounds 2]

Why it matters (model_handlers/allocator.py): glibc unmaps every buffer over its mmap threshold on
free, so each forward pass faults a batch's activations back in; tcmalloc keeps them. Each run is a
child process (malloc is chosen at process start) embedding the same pre-decoded products in batches
of 32; runs alternate glibc, tcmalloc, ... and the best of each is reported with its minor page faults
and kernel CPU time. Reported, no target: it is why every job runs on tcmalloc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.common import write_result
from model_handlers.allocator import TCMALLOC, malloc_in_use

MODEL = "packaged:effnet-lite0+minilm"


def child(products: int) -> dict:
    from bench.common import photo_jpeg
    from bench.pipeline import bare_model, studio_products

    batch = studio_products(MODEL, [photo_jpeg((800, 600), seed=i) for i in range(16)], products)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, _ = bare_model(MODEL, batch)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"malloc": malloc_in_use(), "images_per_s": round(products / seconds, 1),
            "minor_page_faults": after.ru_minflt - before.ru_minflt,
            "kernel_cpu_s": round(after.ru_stime - before.ru_stime, 2), "user_cpu_s": round(after.ru_utime - before.ru_utime, 2)}


def run_child(products: int, preload: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-m", "bench.allocator", "--child", "--products", str(products)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.products)))
        return {}
    if not os.path.exists(TCMALLOC):
        sys.exit(f"{TCMALLOC} is missing: apt-get install libtcmalloc-minimal4 (make setup does)")
    runs: dict[str, list[dict]] = {"glibc": [], "tcmalloc": []}
    for _ in range(args.rounds):
        for name, preload in (("glibc", ""), ("tcmalloc", TCMALLOC)):
            started = time.perf_counter()
            result = run_child(args.products, preload)
            assert result["malloc"] == name, result
            runs[name].append(result)
            print(f"{name:>9}: {result['images_per_s']} images/s, {result['minor_page_faults']:,} minor page faults, "
                  f"kernel {result['kernel_cpu_s']} s / user {result['user_cpu_s']} s CPU "
                  f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    best = {name: max(rs, key=lambda r: r["images_per_s"]) for name, rs in runs.items()}
    ratio = round(best["tcmalloc"]["images_per_s"] / best["glibc"]["images_per_s"], 2)
    print(f"tcmalloc runs the bare {MODEL} model {ratio}x as fast as glibc's malloc")
    write_result("allocator", {
        "what": f"bare {MODEL} model, {args.products} products in batches of 32, CPU, best of {args.rounds} runs each",
        "figure": best["tcmalloc"]["images_per_s"], "baseline": best["glibc"]["images_per_s"], "ratio": ratio,
        "target": "reported (why jobs run on tcmalloc)", "holds": None, "runs": runs,
    })
    return best


if __name__ == "__main__":
    main()
