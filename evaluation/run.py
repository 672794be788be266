"""Retrieval quality of the product embeddings: labelled product photos, and labelled search queries.

    python -m evaluation.run --dataset fashion-mnist [--model SPEC] [--precision bf16] [--limit 2000] [--projection PATH]
    python -m evaluation.run --qrels FILE (--index_dir DIR | --search_url URL) [--mode all] [--projection PATH] [--k 10]
    make eval

The command line of the three evaluations: photo retrieval with top-tuning
(evaluation.photo_retrieval; `--precision bf16` is the check to run before a worker pool moves
off fp32), its report (evaluation.charts: bench/results/quality.json, .md, .png), and judged
queries against the search service (evaluation.qrels).

With `--qrels`, judged queries (evaluation.qrels) are sent to the search service and its rankings
scored; the figures go to bench/results/search_quality.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.photo_retrieval import evaluate_dataset
from evaluation.qrels import evaluate_judgements
from model_handlers.config import DEFAULT_MODEL, PRECISIONS

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"],
                        help="the labelled photos retrieval is measured on")
    parser.add_argument("--model", help=f"model spec (none: {DEFAULT_MODEL}; with --index_dir, the index's)")
    parser.add_argument("--projection",
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
    parser.add_argument("--results_dir", help="where the results (.json/.md/.png) go (none: bench/results/ "
                                              "of this checkout)")
    judged = parser.add_argument_group("labelled search evaluation")
    judged.add_argument("--qrels", help="JSON lines of {query, product_id, label: E|S|C|I}")
    judged.add_argument("--index_dir", help="serve this index (as search.server does) and score it")
    judged.add_argument("--search_url", help="score a running search service, e.g. http://127.0.0.1:8080")
    judged.add_argument("--k", type=int, default=10, help="cut-off of the @k metrics")
    judged.add_argument("--ef_search", type=int, help="HNSW breadth per query (none: the service's)")
    judged.add_argument("--mode", default="all", choices=("vector", "lexical", "hybrid", "all"),
                        help="how the service ranks: by embedding, by keywords (BM25), both fused, or each of "
                             "the three, one row each")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir or str(RESULTS)
    if args.qrels:
        return evaluate_judgements(args)
    if args.index_dir or args.search_url:
        parser.error("--index_dir and --search_url score labelled queries: pass --qrels FILE")
    args.model = args.model or DEFAULT_MODEL
    return evaluate_dataset(args)


if __name__ == "__main__":
    main()
