"""Real search evaluation: labelled relevance judgements scored against the search service's rankings.

The judgement format is JSON lines, one (query, product, ESCI label) a line:

    {"query": "red wool coat", "product_id": "p123", "label": "E"}

E(xact), S(ubstitute), C(omplement) or I(rrelevant), as in Amazon's shopping-queries data. Each
distinct query is sent to `POST /v1/search` as a text query, exactly as a storefront would send it,
and the returned product ids are scored with `evaluation.metrics` (ESCI labels mapped to gains).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from evaluation.metrics import ESCI_GAINS, esci_qrels, evaluate

MODES = ("vector", "lexical", "hybrid")

__all__ = ["Judgements", "evaluate_judgements", "http_searcher", "read_judgements", "score_search"]

Judgements = dict[str, dict[str, str]]  # query → product_id → ESCI label


def read_judgements(path: str | Path, labels: Sequence[str] = tuple(ESCI_GAINS)) -> Judgements:
    """Reads the JSON-lines file; a bad line is a ValueError naming the file and line."""
    judgements: Judgements = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from e
            except RecursionError:
                raise ValueError(f"{where}: nested too deep to read") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with query, product_id and label")
            query, product, label = row.get("query"), row.get("product_id"), row.get("label")
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"{where}: query must be a non-empty string")
            if not isinstance(product, str) or not product:
                raise ValueError(f"{where}: product_id must be a non-empty string")
            if label not in labels:
                raise ValueError(f"{where}: label {label!r} is not one of {', '.join(labels)}")
            previous = judgements.setdefault(query, {}).setdefault(product, label)
            if previous != label:
                raise ValueError(f"{where}: ({query!r}, {product}) was already labelled {previous}")
    if not judgements:
        raise ValueError(f"{path} holds no judgements")
    return judgements


def http_searcher(url: str, ef_search: int | None = None, timeout: float = 30.0, mode: str | None = None
                  ) -> Callable[[str, int], list[str]]:
    """Text query → ranked product ids from a running search service (retries on 5xx and resets),
    ranked by `mode` (vector, lexical, hybrid; none: the service's default)."""
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=3, backoff_factor=0.2,
                                                           status_forcelist=(502, 503, 504),
                                                           allowed_methods=None)))
    endpoint = f"{url.rstrip('/')}/v1/search"

    def search(query: str, k: int) -> list[str]:
        body = {"text": query, "k": k, **({"ef_search": ef_search} if ef_search else {}),
                **({"mode": mode} if mode else {})}
        response = session.post(endpoint, json=body, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"search for {query!r} failed: {response.status_code} {response.text[:300]}")
        return [hit["product_id"] for hit in response.json()["results"]]

    return search


def score_search(judgements: Judgements, search: Callable[[str, int], list[str]], k: int = 10,
                 depth: int = 100, gains: Mapping[str, float] = ESCI_GAINS) -> dict:
    """Means of every metric over the judged queries, and each query's ranking."""
    run = {query: search(query, depth) for query in judgements}
    return {"metrics": evaluate(run, esci_qrels(judgements, gains), k=k), "queries": len(run), "run": run}


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
            from background_server import BackgroundServer
            from search.server import create_app, open_service

            try:
                index, embedder = open_service(args.index_dir, args.model, args.projection or "")
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"--index_dir: {e}") from e
            url = stack.enter_context(BackgroundServer(create_app(index, embedder))).url
        modes = MODES if args.mode == "all" else (args.mode,)
        scored = {mode: score_search(judgements, http_searcher(url, args.ef_search, mode=mode), k=args.k)
                  for mode in modes}
    metrics = {mode: {name: round(value, 4) for name, value in result["metrics"].items()}
               for mode, result in scored.items()}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "search_quality.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    queries = len(judgements)
    for mode, values in metrics.items():
        existing[f"{target} ({mode})"] = {"qrels": str(args.qrels), "queries": queries, "k": args.k, "mode": mode,
                                          **values}
    path.write_text(json.dumps(existing, indent=2) + "\n")
    names = list(next(iter(metrics.values())))
    print("| mode | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for mode, values in metrics.items():
        print(f"| {mode} | " + " | ".join(f"{values[name]:.4f}" for name in names) + " |")
    print(f"({queries} judged queries against {target})")
    return {"metrics": metrics, "run": {mode: result["run"] for mode, result in scored.items()}}
