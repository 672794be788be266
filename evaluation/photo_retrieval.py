"""Photo retrieval with top-tuning: Fashion-MNIST image-to-image (and text-to-image) retrieval.

Fashion-MNIST photos go through the pipeline's own decoder and model handlers (image tower).
Image-to-image retrieval on the test split: every photo is a query, the other test photos are the
index (searched exactly and with HNSW), photos of the same class are relevant, the query itself is
excluded. Backends with one space for images and text (open_clip) also run text-to-image
retrieval: one prompt per class. Top-tuning (Adevinta paper §3.3): a small MLP trained on frozen
embeddings of the training split, its penultimate layer the tuned embedding, saved as the
versioned projection artifact that `--projection` serves in production (or a given one is scored).
`--precision bf16|fp16` embeds under autocast, as a job with that flag does, and is reported as its
own row. Writes quality.json, quality.md and quality.png; embeddings are cached.
"""

from __future__ import annotations

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

from evaluation.charts import chart, quality_table
from evaluation.metrics import evaluate
from sample_catalogue.fashion_mnist import CLASSES, load_fashion_mnist
from media.decode import decode_image
from model_handlers.backends import REGISTRY, image_preprocess, load_backend
from model_handlers.config import ModelConfig
from model_handlers.fusion import l2_normalize
from model_handlers.projection import Projection, build_head, load_projection, save_projection

__all__ = ["embed_split", "evaluate_dataset", "retrieval_metrics", "text_to_image_metrics", "top_tune"]


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
    if REGISTRY[ModelConfig(spec=args.model).model_spec.backend].shared_space:  # text queries find images
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
