"""The quality gate of a rollout: is the candidate index at least as good as the one serving?

    python -m evaluation.gate --root ROOT --candidate NAME [--alias live] [--qrels FILE]
        [--photos fashion-mnist] [--tolerance 0.02]
    python -m evaluation.gate --qdrant_url URL --candidate COLLECTION ...   # Qdrant collections and an alias

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
not compare them (a missing index, unreadable judgements, a crash). It says what it did not measure,
and a candidate of another model than the serving index's is compared on quality or not at all: live
products and recall say nothing about which model ranks better, so without `--qrels` or `--photos`
(or with a model no backend here runs: a vector-only index) it exits 2 before measuring anything.
Two indexes of the same model (and dimension) rank alike, so live products and recall compare them, with
one more check no other model allows: the same products hold the same vectors (the share of a sample
of the serving index's live products whose candidate vector has cosine >= 0.99 with the serving one),
so a candidate of another catalogue, or of vectors that are not the model's, does not pass.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from argtypes import bounded
from evaluation.qrels import read_judgements, score_search
from model_handlers.config import split_model_id
from search.aliases import AliasError, check_root, index_path, read_layout, resolve
from search.qdrant import cli as qdrant_cli
from search.sharded import ShardedIndex

__all__ = ["compare", "main", "measure"]

K = 10
COVERAGE = 0.99  # a candidate holds at least this share of the serving index's live products
SAME_VECTOR = 0.99  # the same model's vectors of one product: cosine at least this (8-bit codes keep the floats)
SAME_VECTORS = "same vectors as serving"
PHOTO_POOL = 60_000  # Fashion-MNIST's train split, which the photo queries are drawn from
MAX_RECALL_QUERIES = 100_000


class CannotCompare(ValueError):
    """The gate cannot judge the candidate against the serving index (exit 2, never a verdict)."""


def _photo_queries(count: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(PNG bytes, class name) of `count` Fashion-MNIST train photos, as the demo catalogue draws its own."""
    from sample_catalogue.fashion_mnist import CLASSES, load_fashion_mnist
    from sample_catalogue.products import product_photo

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


def vector_agreement(serving, candidate, count: int, seed: int = 0) -> float:
    """The share of a sample of `serving`'s live products (at most `count`) whose vector in `candidate`
    is the same (cosine >= SAME_VECTOR); a product the candidate lacks counts as different. Only
    meaningful for two indexes of one model."""
    products = sorted(serving.live_products())
    if not products:
        return 1.0
    sample = np.random.default_rng(seed).choice(products, min(count, len(products)), replace=False)
    same = 0
    for pid in sample:
        a, b = serving.product_vector(str(pid)), candidate.product_vector(str(pid))
        same += a is not None and b is not None and float(a @ b) >= SAME_VECTOR
    return same / len(sample)


def _runs_here(model: str) -> bool:
    from search.query.embedder import runs_here

    return runs_here(split_model_id(model)[0])


def not_measured(layouts: dict[str, dict], serving: str, candidate: str, qrels: bool, photos: bool
                 ) -> tuple[list[str], str]:
    """What the gate will not measure, in words, and a note on why that leaves a comparison (or ''),
    decided from the two indexes' layouts before either is opened. CannotCompare when a measure asked
    for cannot run on one of them, or when the candidate holds another model's vectors and no quality
    measure is left to compare them by."""
    models = {name: (layouts[name]["model"], int(layouts[name]["dim"])) for name in (serving, candidate)}
    vector_only = [name for name in (serving, candidate) if not _runs_here(models[name][0])]
    asked = [flag for flag, given in (("--qrels", qrels), ("--photos", photos)) if given]
    same = models[serving] == models[candidate]
    if asked and vector_only:
        name = vector_only[0]
        instead = (f"drop {' and '.join(asked)}: both indexes hold its vectors, so live products and recall@{K} "
                   f"compare them" if same else "judge the candidate with your own evaluation")
        raise CannotCompare(f"{' and '.join(asked)}: index {name} holds vectors of {models[name][0]}, which no backend "
                            f"of this product runs (a vector-only index), so no text or photo query can be embedded "
                            f"for it here; {instead}")
    if not (qrels or photos) and not same:
        why = (f"{' and '.join(vector_only)} hold{'s' if len(vector_only) == 1 else ''} vectors no backend of this "
               f"product can embed queries for (vector-only), so the gate cannot measure quality at all: judge the "
               f"candidate with your own evaluation"
               if vector_only else "measure their quality with --qrels FILE (judged text queries) and/or --photos "
                                   "fashion-mnist (labelled photo queries)")
        raise CannotCompare(f"cannot judge {candidate}: it holds vectors of another model than the serving {serving} "
                            f"({models[candidate][0]}, {models[candidate][1]}-d, against {models[serving][0]}, "
                            f"{models[serving][1]}-d), and live products and recall@{K} say nothing about which "
                            f"model ranks better; {why}")
    missing = []
    if vector_only:
        missing.append(f"nDCG@{K} and MRR of judged text queries, photo precision@{K}: {models[serving][0]} runs on "
                       f"no backend of this product (a vector-only index)")
    else:
        if not qrels:
            missing.append(f"nDCG@{K} and MRR of judged text queries (no --qrels)")
        if not photos:
            missing.append(f"photo precision@{K} (no --photos)")
    note = (f"both indexes hold {models[serving][0]} vectors ({models[serving][1]}-d), which rank alike: live "
            f"products, recall@{K} and the products' own vectors compare them" if missing and same else "")
    return missing, note


def _check_judged_live(index, judgements, name: str, path: str) -> None:
    """CannotCompare when no product judged relevant is live in the serving index: every ranking would
    score 0 and any candidate would pass on judgements that do not fit this catalogue."""
    from evaluation.metrics import ESCI_GAINS

    relevant = {product for labels in judgements.values() for product, label in labels.items()
                if ESCI_GAINS.get(label, 0) > 0}
    live = set(index.live_products())
    if not relevant & live:
        raise CannotCompare(f"--qrels {path}: none of its {len(relevant)} products judged relevant is live in the "
                            f"serving index {name}: the judgements do not fit its catalogue, so nDCG and MRR "
                            f"would be 0 for any candidate")


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
    parser.add_argument("--root", help="The root of named indexes (search.aliases).")
    parser.add_argument("--candidate", required=True, help="The index to roll out (a name under ROOT, or a "
                                                          "collection with --qdrant_url / --qdrant_path).")
    parser.add_argument("--alias", default="live", help="The alias naming the serving index to compare with.")
    parser.add_argument("--qrels", help="Judged queries (JSON lines of {query, product_id, label}).")
    parser.add_argument("--photos", choices=("fashion-mnist",), help="Labelled photos as image queries.")
    parser.add_argument("--photo_queries", type=bounded(int, 1, PHOTO_POOL), default=300,
                        help=f"How many labelled photos (1 to {PHOTO_POOL:,}, the train split).")
    parser.add_argument("--recall_queries", type=bounded(int, 1, MAX_RECALL_QUERIES), default=200,
                        help=f"Queries for recall against exact search (1 to {MAX_RECALL_QUERIES:,}).")
    parser.add_argument("--tolerance", type=bounded(float, 0.0, 1.0, high_open=True), default=0.02,
                        help="How much lower than the serving index's a candidate's metric may be (at least 0, "
                             "below 1: metrics lie in [0, 1], so 1 would pass any candidate).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Where the models run.")
    parser.add_argument("--output", help="Also write the figures as JSON to this local file (its directory is "
                                         "created if missing, before the gate runs).")
    qdrant_cli.add_flags(parser, "Qdrant collections and a collection alias (instead of --root)")
    return parser


def _check_output(parser: argparse.ArgumentParser, output: str) -> Path:
    """The --output file, its directory created now (as `mkdir -p`): a path that cannot be written is
    refused before minutes of measuring, not after them."""
    if "://" in output:
        parser.error(f"--output {output}: give a local file path")
    path = Path(output)
    if path.is_dir():
        parser.error(f"--output {output} is a directory: give a file path, e.g. {path / 'gate.json'}")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        parser.error(f"--output {output}: {existing} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--output {output}: cannot create its directory: {e.strerror or e}")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"--output {output}: cannot be written (permission denied)")
    return path


class _NamedIndexes:
    """Named FAISS indexes under a root and its alias file (search.aliases)."""

    def __init__(self, root: str):
        check_root(root)
        self.root = root

    def resolve(self, alias: str) -> str:
        return resolve(self.root, alias)

    def layout(self, name: str) -> dict:
        return read_layout(self.root, name)

    def open_service(self, name: str, device: str):
        from search.server import open_service

        return open_service(index_path(self.root, name), device=device)

    def open(self, name: str):
        return ShardedIndex.open(index_path(self.root, name))


class _Collections:
    """Collections of a Qdrant engine and its collection aliases (search.qdrant.aliases)."""

    def __init__(self, target):
        self.target = target

    def resolve(self, alias: str) -> str:
        from search.qdrant import aliases

        return aliases.resolve(self.target, alias)

    def layout(self, name: str) -> dict:
        from search.qdrant.collection import connected

        with connected(self.target(name)) as collection:
            layout = collection.layout()
        if layout is None:
            raise AliasError(f"no collection {name!r} at {self.target(name).url or self.target(name).path}")
        return layout

    def open_service(self, name: str, device: str):
        from search.server import open_service

        return open_service(None, device=device, qdrant=self.target(name))

    def open(self, name: str):
        from search.qdrant.index import QdrantIndex

        return QdrantIndex.open(self.target(name))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = _check_output(parser, args.output) if args.output else None
    qdrant = qdrant_cli.chosen(args)
    refused = qdrant_cli.root_or_engine_refusal(args)
    if refused:
        parser.error(refused)
    try:
        indexes = _Collections(qdrant_cli.targets(args)) if qdrant else _NamedIndexes(args.root)
        serving = indexes.resolve(args.alias)
        # both exist, and can be compared, before minutes are spent measuring one
        layouts = {name: indexes.layout(name) for name in (serving, args.candidate)}
        missing, note = not_measured(layouts, serving, args.candidate, bool(args.qrels), bool(args.photos))
        judgements = read_judgements(args.qrels) if args.qrels else None
        photos = _photo_queries(args.photo_queries) if args.photos else None
        figures = {}
        for name in (serving, args.candidate):
            index, embedder = indexes.open_service(name, args.device)
            try:
                if judgements and name == serving:
                    _check_judged_live(index, judgements, name, args.qrels)
                figures[name] = measure(index, embedder, judgements, photos, args.recall_queries)
            finally:
                index.close()
        serving_model, candidate_model = ((layouts[n]["model"], layouts[n]["dim"]) for n in (serving, args.candidate))
        if serving_model == candidate_model:
            opened = [indexes.open(name) for name in (serving, args.candidate)]
            try:
                figures[serving][SAME_VECTORS] = 1.0
                figures[args.candidate][SAME_VECTORS] = vector_agreement(*opened, args.recall_queries)
            finally:
                for index in opened:
                    index.close()
    except (AliasError, OSError, ValueError) as e:
        parser.exit(2, f"evaluation.gate: {e}\n")
    except Exception as e:
        if not qdrant:
            raise
        from search.qdrant.collection import describe_failure  # an engine that does not answer or refuses

        parser.exit(2, f"evaluation.gate: {describe_failure(e, qdrant_cli.targets(args)(args.candidate))}\n")
    except RecursionError:
        parser.exit(2, "evaluation.gate: an input is nested too deep to read\n")
    rows = compare(figures[serving], figures[args.candidate], args.tolerance)
    print(_table(rows, serving, args.candidate, args.tolerance))
    passed = all(passes for *_, passes in rows)
    if output is not None:
        output.write_text(json.dumps({"serving": serving, "candidate": args.candidate, "passed": passed,
                                      "tolerance": args.tolerance, "figures": figures, "not_measured": missing,
                                      **({"note": note} if note else {})},
                                     indent=2) + "\n")
    for line in missing:
        print(f"not measured: {line}")
    if note:
        print(f"note: {note}")
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
