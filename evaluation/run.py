"""Retrieval quality of the product embeddings on labelled product photos, pretrained and top-tuned.

    python -m evaluation.run --dataset fashion-mnist [--model SPEC] [--limit 2000] [--train_limit 6000]
    make eval

Fashion-MNIST photos go through the pipeline's own decoder and model handlers (image tower).
Image-to-image retrieval on the test split: every photo is a query, the other test photos are the
index (searched exactly and with HNSW), photos of the same class are relevant, the query itself is
excluded. Top-tuning (Adevinta paper §3.3): a small MLP trained on frozen embeddings of the training
split; its penultimate layer is the tuned embedding. Both are scored with `evaluation.metrics`.
Writes bench/results/quality.json, quality.md and quality.png; embeddings are cached.
"""

from __future__ import annotations

import argparse
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
from localstack.catalogue import CLASSES, load_fashion_mnist
from model_handlers.backends import image_preprocess, load_backend
from model_handlers.config import DEFAULT_MODEL, ModelConfig
from transforms.decode import decode_image

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
METRICS = ("mMP@5", "mR@1", "MAP@5", "MRR", "nDCG@5")


def photo_bytes(pixels: np.ndarray) -> bytes:
    """A Fashion-MNIST photo as a shop shows it (dark on white), PNG-encoded for the real decoder."""
    buffer = io.BytesIO()
    Image.fromarray(255 - pixels, "L").save(buffer, "PNG")
    return buffer.getvalue()


def embed_split(model: str, split: str, limit: int, cache_dir: Path, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, labels) of the first `limit` photos of a split, cached on disk."""
    key = hashlib.sha256(f"{model}|{split}|{limit}".encode()).hexdigest()[:16]
    path = cache_dir / f"{split}-{limit}-{key}.npz"
    if path.exists():
        cached = np.load(path)
        return cached["vectors"], cached["labels"]
    images, labels = load_fashion_mnist(split)
    images, labels = images[:limit], labels[:limit]
    backend = load_backend(ModelConfig(spec=model))
    spec = image_preprocess(model)
    vectors = []
    for start in tqdm(range(0, len(images), batch), desc=f"embedding {split}", unit="batch"):
        pixels = np.stack([decode_image(photo_bytes(p), spec) for p in images[start:start + batch]])
        vectors.append(backend.encode_images(pixels))
    vectors = np.concatenate(vectors).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=vectors, labels=labels)
    return vectors, labels


def retrieval_metrics(vectors: np.ndarray, labels: np.ndarray, k: int, depth: int = 100) -> dict:
    """Image-to-image retrieval, self excluded, same class relevant; exact and HNSW search."""
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [str(i) for i in range(len(vectors))]
    qrels = {}
    for cls in np.unique(labels):
        members = [ids[i] for i in np.flatnonzero(labels == cls)]
        for i in np.flatnonzero(labels == cls):
            qrels[ids[i]] = {m: 1.0 for m in members if m != ids[i]}
    hnsw = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    hnsw.add(vectors)
    hnsw.hnsw.efSearch = 256
    out = {}
    for name, search in (("exact", lambda q: q @ vectors.T), ("hnsw", None)):
        if name == "exact":
            scores = search(vectors)
            np.fill_diagonal(scores, -np.inf)
            order = np.argsort(-scores, axis=1)[:, :depth]
        else:
            _, order = hnsw.search(vectors, depth + 1)
        run = {ids[i]: [ids[j] for j in row if j != i and j >= 0][:depth] for i, row in enumerate(order)}
        out[name] = {metric: round(value, 4) for metric, value in evaluate(run, qrels, k=k).items()}
    return out


class TopTuningHead(torch.nn.Module):
    """Two hidden layers on frozen embeddings; the second is the tuned embedding."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, classes: int):
        super().__init__()
        self.embed = torch.nn.Sequential(torch.nn.Linear(dim_in, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, dim_out))
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=2000, help="test photos (queries and index)")
    parser.add_argument("--train_limit", type=int, default=6000, help="training photos for top-tuning")
    parser.add_argument("--cache_dir", default="out/eval-cache")
    parser.add_argument("--head_dir", default="out/eval-heads", help="where the top-tuned head is saved")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where quality.json/.md/.png go")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cache = Path(args.cache_dir)
    test, test_labels = embed_split(args.model, "t10k", args.limit, cache)
    train, train_labels = embed_split(args.model, "train", args.train_limit, cache)
    pretrained = retrieval_metrics(test, test_labels, k=5)
    head = top_tune(train, train_labels)
    with torch.no_grad():
        tuned = head.embed(torch.from_numpy(test)).numpy()
    top_tuned = retrieval_metrics(tuned, test_labels, k=5)
    head_path = Path(args.head_dir) / f"{args.model.replace(':', '_').replace('/', '_')}-fashion-mnist-v1.pt"
    head_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": head.embed.state_dict(), "model": args.model, "dim_in": test.shape[1],
                "dim_out": tuned.shape[1], "version": 1, "trained_on": f"fashion-mnist train[:{args.train_limit}]"},
               head_path)
    results = {args.model: {"pretrained": pretrained["exact"], "top_tuned": top_tuned["exact"],
                            "hnsw": {"pretrained": pretrained["hnsw"], "top_tuned": top_tuned["hnsw"]},
                            "queries": int(len(test)), "train": int(len(train)), "head": str(head_path)}}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "quality.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update(results)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    lines = ["| model | embedding | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for model, variants in existing.items():
        for variant in ("pretrained", "top_tuned"):
            lines.append(f"| {model} | {variant} | " + " | ".join(f"{variants[variant][m]:.4f}" for m in METRICS) + " |")
    table = "\n".join(lines)
    (results_dir / "quality.md").write_text(table + "\n")
    chart(existing, results_dir / "quality.png")
    print(table)
    print(f"({len(test)} test queries, exact search; HNSW figures in quality.json; "
          f"{time.perf_counter() - started:.0f}s; head saved to {head_path})")
    return results


if __name__ == "__main__":
    main()
