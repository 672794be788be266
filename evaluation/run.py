"""Retrieval quality of the product embeddings: labelled product photos, and labelled search queries.

    python -m evaluation.run --dataset fashion-mnist [--model SPEC] [--precision bf16] [--limit 2000] [--projection PATH]
    python -m evaluation.run --qrels FILE (--index_dir DIR | --search_url URL) [--projection PATH] [--k 10]
    make eval

Fashion-MNIST photos go through the pipeline's own decoder and model handlers (image tower).
Image-to-image retrieval on the test split: every photo is a query, the other test photos are the
index (searched exactly and with HNSW), photos of the same class are relevant, the query itself is
excluded. Backends with one space for images and text (open_clip) also run text-to-image
retrieval: one prompt per class. Top-tuning (Adevinta paper §3.3): a small MLP trained on frozen
embeddings of the training split, its penultimate layer the tuned embedding, saved as the
versioned projection artifact that `--projection` serves in production (or a given one is scored).
`--precision bf16|fp16` embeds under autocast, as a job with that flag does, and is reported as its
own row: the check to run before a worker pool moves off fp32.
Writes bench/results/quality.json, quality.md and quality.png; embeddings are cached.

With `--qrels`, judged queries (evaluation.qrels) are sent to the search service and its rankings
scored; the figures go to bench/results/search_quality.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.metrics import evaluate
from evaluation.qrels import http_searcher, read_judgements, score_search
from localstack.catalogue import CLASSES, load_fashion_mnist
from model_handlers.backends import image_preprocess, load_backend
from model_handlers.config import DEFAULT_MODEL, PRECISIONS, ModelConfig, ModelSpec
from model_handlers.fusion import l2_normalize
from model_handlers.projection import Projection, build_head, load_projection, save_projection
from transforms.decode import decode_image

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
METRICS = ("mMP@5", "mR@1", "MAP@5", "MRR", "nDCG@5")


def photo_bytes(pixels: np.ndarray) -> bytes:
    """A Fashion-MNIST photo as a shop shows it (dark on white), PNG-encoded for the real decoder."""
    buffer = io.BytesIO()
    Image.fromarray(255 - pixels, "L").save(buffer, "PNG")
    return buffer.getvalue()


def _variant(precision: str, mark: str = " @") -> str:
    """What a precision adds to a run's names, keys and files: nothing for fp32, so earlier results
    stay valid."""
    return "" if precision == "fp32" else f"{mark}{precision}"


def embed_split(model: str, split: str, limit: int, cache_dir: Path, batch: int = 64,
                precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, labels) of the first `limit` photos of a split, cached on disk."""
    key = hashlib.sha256(f"{model}|{split}|{limit}{_variant(precision)}".encode()).hexdigest()[:16]
    path = cache_dir / f"{split}-{limit}-{key}.npz"
    if path.exists():
        cached = np.load(path)
        return cached["vectors"], cached["labels"]
    images, labels = load_fashion_mnist(split)
    images, labels = images[:limit], labels[:limit]
    backend = load_backend(ModelConfig(spec=model, precision=precision))
    spec = image_preprocess(model)
    vectors = []
    for start in tqdm(range(0, len(images), batch), desc=f"embedding {split}", unit="batch"):
        pixels = np.stack([decode_image(photo_bytes(p), spec) for p in images[start:start + batch]])
        vectors.append(backend.encode_images(pixels))
    vectors = np.concatenate(vectors).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=vectors, labels=labels)
    return vectors, labels


def _rankings(queries: np.ndarray, docs: np.ndarray, depth: int, exclude_self: bool) -> dict[str, list[list[int]]]:
    """Doc positions per query, best first, by exact inner product and by HNSW (efSearch 256)."""
    scores = queries @ docs.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    exact = np.argsort(-scores, axis=1)[:, :depth]
    hnsw = faiss.IndexHNSWFlat(docs.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    hnsw.add(docs)
    hnsw.hnsw.efSearch = 256
    _, approximate = hnsw.search(queries, depth + int(exclude_self))
    return {"exact": [list(row) for row in exact],
            "hnsw": [[j for j in row if j >= 0 and not (exclude_self and j == i)][:depth]
                     for i, row in enumerate(approximate)]}


def _scored(rankings: dict, qrels: dict, query_ids: list[str], k: int) -> dict:
    return {name: {metric: round(value, 4) for metric, value in
                   evaluate({q: [str(j) for j in row] for q, row in zip(query_ids, ranked)}, qrels, k=k).items()}
            for name, ranked in rankings.items()}


def retrieval_metrics(vectors: np.ndarray, labels: np.ndarray, k: int, depth: int = 100) -> dict:
    """Image-to-image retrieval, self excluded, same class relevant; exact and HNSW search."""
    vectors = l2_normalize(vectors)
    ids = [str(i) for i in range(len(vectors))]
    qrels = {}
    for cls in np.unique(labels):
        members = [ids[i] for i in np.flatnonzero(labels == cls)]
        for i in np.flatnonzero(labels == cls):
            qrels[ids[i]] = {m: 1.0 for m in members if m != ids[i]}
    return _scored(_rankings(vectors, vectors, depth, exclude_self=True), qrels, ids, k)


def text_to_image_metrics(image_vectors: np.ndarray, labels: np.ndarray, class_vectors: np.ndarray, k: int,
                          depth: int = 100) -> dict:
    """One text query per class (its prompt), the photos of that class relevant; exact and HNSW."""
    image_vectors, class_vectors = l2_normalize(image_vectors), l2_normalize(class_vectors)
    query_ids = [f"class-{c}" for c in range(len(class_vectors))]
    qrels = {q: {str(i): 1.0 for i in np.flatnonzero(labels == c)} for c, q in enumerate(query_ids)}
    return _scored(_rankings(class_vectors, image_vectors, depth, exclude_self=False), qrels, query_ids, k)


def class_prompts() -> list[str]:
    return [f"a photo of a {name.lower()}" for name in CLASSES]


class TopTuningHead(torch.nn.Module):
    """Two layers on frozen embeddings (`embed`, the artifact that is served) and a classifier."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, classes: int):
        super().__init__()
        self.embed = build_head([dim_in, hidden, dim_out])
        self.classify = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(dim_out, classes))

    def forward(self, x):
        return self.classify(self.embed(x))


def top_tune(train: np.ndarray, labels: np.ndarray, epochs: int = 30, seed: int = 0) -> TopTuningHead:
    torch.manual_seed(seed)
    head = TopTuningHead(train.shape[1], 512, 256, len(CLASSES))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(train), torch.from_numpy(labels.astype(np.int64))
    for _ in tqdm(range(epochs), desc="top-tuning", unit="epoch"):
        head.train()
        for batch in torch.randperm(len(x)).split(256):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return head.eval()


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (2 * len(results))
    for n, (model, variants) in enumerate(results.items()):
        for m, variant in enumerate(("pretrained", "top_tuned")):
            offset = (2 * n + m) * width
            values = [variants[variant][metric] for metric in METRICS]
            ax.bar([i + offset for i in range(len(METRICS))], values, width, label=f"{model} {variant}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], METRICS)
    ax.set_ylim(0, 1)
    ax.set_title("Fashion-MNIST image-to-image retrieval (test split, exact search)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_artifact(args, train: np.ndarray, train_labels: np.ndarray) -> Path:
    """The head to evaluate: `--projection`, or one trained here and saved as a versioned artifact."""
    if args.projection:
        return Path(args.projection)
    head = top_tune(train, train_labels)
    path = Path(args.head_dir) / (f"{args.model.replace(':', '_').replace('/', '_')}{_variant(args.precision, '-')}"
                                  f"-fashion-mnist-v{args.head_version}.pt")
    save_projection(path, head.embed, model=args.model, name="fashion-mnist", version=args.head_version,
                    trained_on=f"fashion-mnist train[:{args.train_limit}]")
    return path


def _check_head(projection: Projection, model: str) -> None:
    try:
        projection.check_model(model)
    except ValueError as e:
        raise SystemExit(str(e)) from e


def evaluate_dataset(args) -> dict:
    started = time.perf_counter()
    if args.projection:
        _check_head(load_projection(args.projection), args.model)
    cache = Path(args.cache_dir)
    test, test_labels = embed_split(args.model, "t10k", args.limit, cache, precision=args.precision)
    train, train_labels = (np.zeros((0, test.shape[1]), np.float32), None) if args.projection else \
        embed_split(args.model, "train", args.train_limit, cache, precision=args.precision)
    head_path = head_artifact(args, train, train_labels)
    projection = load_projection(str(head_path))
    _check_head(projection, args.model)
    tuned = projection(test)
    pretrained, top_tuned = retrieval_metrics(test, test_labels, k=5), retrieval_metrics(tuned, test_labels, k=5)
    result = {"pretrained": pretrained["exact"], "top_tuned": top_tuned["exact"],
              "hnsw": {"pretrained": pretrained["hnsw"], "top_tuned": top_tuned["hnsw"]},
              "queries": int(len(test)), "train": int(len(train)), "head": str(head_path),
              "tuned_model_id": projection.model_id, "precision": args.precision}
    if ModelSpec.parse(args.model).backend == "open_clip":  # one space for images and text
        prompts = load_backend(ModelConfig(spec=args.model, precision=args.precision)).encode_texts(class_prompts())
        result["text_to_image"] = {
            "pretrained": text_to_image_metrics(test, test_labels, prompts, k=5)["exact"],
            "top_tuned": text_to_image_metrics(tuned, test_labels, projection(prompts), k=5)["exact"],
        }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "quality.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    run_name = args.model + _variant(args.precision)
    existing[run_name] = result
    path.write_text(json.dumps(existing, indent=2) + "\n")
    table = quality_table(existing)
    (results_dir / "quality.md").write_text(table + "\n")
    chart(existing, results_dir / "quality.png")
    print(table)
    print(f"({len(test)} test queries, exact search; HNSW figures in quality.json; "
          f"{time.perf_counter() - started:.0f}s; head {head_path}, served as {projection.model_id})")
    return {run_name: result}


def quality_table(results: dict) -> str:
    lines = ["| model | task | embedding | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for model, result in results.items():
        for task, variants in (("image → image", result), ("text → image", result.get("text_to_image"))):
            for variant in ("pretrained", "top_tuned") if variants else ():
                values = " | ".join(f"{variants[variant][m]:.4f}" for m in METRICS)
                lines.append(f"| {model} | {task} | {variant} | {values} |")
    return "\n".join(lines)


def evaluate_judgements(args) -> dict:
    """`--qrels` against the search service: a running one (`--search_url`) or one started on `--index_dir`."""
    if bool(args.index_dir) == bool(args.search_url):
        raise SystemExit("--qrels needs exactly one of --index_dir and --search_url")
    try:
        judgements = read_judgements(args.qrels)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--qrels: {e}") from e
    target = args.search_url or args.index_dir
    with contextlib.ExitStack() as stack:
        url = args.search_url
        if args.index_dir:
            from localstack.http_server import BackgroundServer
            from search.server import create_app, open_service

            try:
                index, embedder = open_service(args.index_dir, args.model, args.projection)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"--index_dir: {e}") from e
            url = stack.enter_context(BackgroundServer(create_app(index, embedder))).url
        scored = score_search(judgements, http_searcher(url, args.ef_search), k=args.k)
    metrics = {name: round(value, 4) for name, value in scored["metrics"].items()}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "search_quality.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[str(target)] = {"qrels": str(args.qrels), "queries": scored["queries"], "k": args.k, **metrics}
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print("| metric | value |\n|---|---|\n" + "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items()))
    print(f"({scored['queries']} judged queries against {target})")
    return {"metrics": metrics, "run": scored["run"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"],
                        help="the labelled photos retrieval is measured on")
    parser.add_argument("--model", help=f"model spec (none: {DEFAULT_MODEL}; with --index_dir, the index's)")
    parser.add_argument("--projection", default="",
                        help="a saved head to evaluate instead of training one (dataset), or the head the "
                             "index's vectors went through (--index_dir)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="embed under autocast at this precision (as the pipeline's --precision); "
                             "reported as its own row, e.g. 'MODEL @bf16'")
    parser.add_argument("--limit", type=int, default=2000, help="test photos (queries and index)")
    parser.add_argument("--train_limit", type=int, default=6000, help="training photos for top-tuning")
    parser.add_argument("--head_version", type=int, default=1, help="version of the head this run saves")
    parser.add_argument("--cache_dir", default="out/eval-cache", help="where embeddings are cached between runs")
    parser.add_argument("--head_dir", default="out/eval-heads", help="where the top-tuned head is saved")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the results (.json/.md/.png) go")
    judged = parser.add_argument_group("labelled search evaluation")
    judged.add_argument("--qrels", help="JSON lines of {query, product_id, label: E|S|C|I}")
    judged.add_argument("--index_dir", help="serve this index (as search.server does) and score it")
    judged.add_argument("--search_url", help="score a running search service, e.g. http://127.0.0.1:8080")
    judged.add_argument("--k", type=int, default=10, help="cut-off of the @k metrics")
    judged.add_argument("--ef_search", type=int, help="HNSW breadth per query (none: the service's)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.qrels:
        return evaluate_judgements(args)
    if args.index_dir or args.search_url:
        parser.error("--index_dir and --search_url score labelled queries: pass --qrels FILE")
    args.model = args.model or DEFAULT_MODEL
    return evaluate_dataset(args)


if __name__ == "__main__":
    main()
