"""The quality gate of a rollout: is the candidate index at least as good as the one serving?

    python -m evaluation.gate --root ROOT --candidate NAME [--alias live] [--qrels FILE]
        [--photos fashion-mnist] [--tolerance 0.02]

Both indexes are opened as the search service opens them (each with its own query model and head)
and measured the same way, in process:
- coverage: live products, the candidate's against the serving index's (a backfill that stopped
  halfway is not a better index);
- recall@10 of the served search against exact search over the same index (search.recall);
- with `--qrels`: nDCG@10 and MRR of judged text queries (evaluation.qrels), ranked by vector (what
  the model decides) and hybrid (what shoppers get);
- with `--photos fashion-mnist`: labelled Fashion-MNIST photos (the train split; the demo catalogue is
  drawn from t10k) as image queries, precision@10 of results whose `category` attribute is the
  photo's class: what a new image head changes, and text queries do not see.

It prints one table and exits 1 when the candidate is worse than the serving index by more than
`--tolerance` on any of them (0 when it passes), so a rollout script can stop on it; 2 when it could
not compare them (a missing index, unreadable judgements, a crash).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from evaluation.qrels import read_judgements, score_search
from search.aliases import AliasError, index_path, read_layout, resolve

__all__ = ["compare", "main", "measure"]

K = 10
COVERAGE = 0.99  # a candidate holds at least this share of the serving index's live products


def _photo_queries(count: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(PNG bytes, class name) of `count` Fashion-MNIST train photos, as the demo catalogue draws its own."""
    from evaluation.fashion_mnist import CLASSES, load_fashion_mnist
    from localstack.catalogue import product_photo

    images, labels = load_fashion_mnist("train")
    picks = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    out = []
    for n in picks:
        buffer = io.BytesIO()
        product_photo(images[n], 112).save(buffer, "PNG")
        out.append((buffer.getvalue(), CLASSES[int(labels[n])]))
    return out


def measure(index, embedder, judgements=None, photos=None, recall_queries: int = 200, ef_search: int | None = None
            ) -> dict[str, float]:
    """The gate's metrics of one index, served with `embedder` (search.server.open_service's pair)."""
    from media.decode import decode_image
    from search.recall import measure_recall
    from search.server import DEFAULT_EF_SEARCH

    ef = ef_search or DEFAULT_EF_SEARCH
    out = {"live products": float(index.stats()["live_docs"])}
    recall = measure_recall(index, K, [ef], recall_queries)
    out[f"recall@{K} vs exact"] = recall["by_ef_search"][0]["mean"]
    if judgements:
        for mode in ("vector", "hybrid"):
            def search(query: str, k: int, mode=mode) -> list[str]:
                hits = index.search(embedder.text(query), k=k, ef_search=ef, text=query, mode=mode)
                return [hit.product_id for hit in hits]

            metrics = score_search(judgements, search, k=K)["metrics"]
            out[f"nDCG@{K} ({mode})"] = metrics[f"nDCG@{K}"]
            out[f"MRR ({mode})"] = metrics["MRR"]
    if photos:
        if embedder.backend is None:
            raise ValueError(f"--photos needs the index's model ({index.model}) to run here")
        precisions, labelled = [], 0
        for data, label in photos:
            vector = embedder.backend.embed_query(image=decode_image(data, embedder.backend.preprocess))
            hits = index.search(vector, k=K, ef_search=ef)
            categories = [hit.attributes.get("category") for hit in hits]
            labelled += sum(c is not None for c in categories)
            precisions.append(sum(c == label for c in categories) / K)
        if not labelled:
            raise ValueError("--photos fashion-mnist: the index's products carry no `category` attribute (the demo "
                             "catalogue's products do: the class of their photo)")
        out[f"photo precision@{K}"] = float(np.mean(precisions))
    return out


def compare(serving: dict[str, float], candidate: dict[str, float], tolerance: float,
            coverage: float = COVERAGE) -> list[tuple[str, float, float, bool]]:
    """(metric, serving, candidate, passes) rows: quality metrics may drop by `tolerance` at most; live
    products by (1 - `coverage`) of the serving index's."""
    rows = []
    for name, before in serving.items():
        after = candidate[name]
        passes = after >= before * coverage if name == "live products" else after >= before - tolerance
        rows.append((name, before, after, passes))
    return rows


def _table(rows, serving: str, candidate: str, tolerance: float) -> str:
    lines = [f"| metric | {serving} (serving) | {candidate} (candidate) | change | |", "|---|---|---|---|---|"]
    for name, before, after, passes in rows:
        number = "{:,.0f}" if name == "live products" else "{:.4f}"
        lines.append(f"| {name} | {number.format(before)} | {number.format(after)} | {after - before:+.4f} | "
                     f"{'ok' if passes else 'WORSE'} |")
    return "\n".join(lines) + f"\n(tolerance {tolerance}; live products at least {COVERAGE:.0%} of the serving index's)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.gate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", required=True, help="The root of named indexes (search.aliases).")
    parser.add_argument("--candidate", required=True, help="The index to roll out (a name under ROOT).")
    parser.add_argument("--alias", default="live", help="The alias naming the serving index to compare with.")
    parser.add_argument("--qrels", help="Judged queries (JSON lines of {query, product_id, label}).")
    parser.add_argument("--photos", choices=("fashion-mnist",), help="Labelled photos as image queries.")
    parser.add_argument("--photo_queries", type=int, default=300, help="How many labelled photos.")
    parser.add_argument("--recall_queries", type=int, default=200, help="Queries for recall against exact search.")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="How much lower than the serving index's a candidate's metric may be.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Where the models run.")
    parser.add_argument("--output", help="Also write the figures as JSON here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    from search.server import open_service

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        serving = resolve(args.root, args.alias)
        for name in (serving, args.candidate):  # both exist, before minutes are spent measuring one
            read_layout(args.root, name)
        judgements = read_judgements(args.qrels) if args.qrels else None
        photos = _photo_queries(args.photo_queries) if args.photos else None
        figures = {}
        for name in (serving, args.candidate):
            index, embedder = open_service(index_path(args.root, name), device=args.device)
            figures[name] = measure(index, embedder, judgements, photos, args.recall_queries)
            index.close()
    except (AliasError, OSError, ValueError) as e:
        parser.exit(2, f"evaluation.gate: {e}\n")
    except RecursionError:
        parser.exit(2, "evaluation.gate: an input is nested too deep to read\n")
    rows = compare(figures[serving], figures[args.candidate], args.tolerance)
    print(_table(rows, serving, args.candidate, args.tolerance))
    passed = all(passes for *_, passes in rows)
    if args.output:
        Path(args.output).write_text(json.dumps({"serving": serving, "candidate": args.candidate, "passed": passed,
                                                 "tolerance": args.tolerance, "figures": figures}, indent=2) + "\n")
    if serving == args.candidate:
        print(f"note: {args.candidate} is the index the alias already serves")
    print(f"gate: {args.candidate} {'passes' if passed else 'is WORSE than ' + serving + ': not rolled out'}")
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # exit 1 means "worse": a crash must not read as a verdict
        traceback.print_exc()
        sys.exit(2)
