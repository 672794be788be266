"""Retrieval metrics on ranked ids and graded relevance, as the embedding benchmarks report them.

MAP@k, MRR, nDCG@k and recall@k come from ir-measures (pytrec_eval underneath), the reference
implementation IR work is compared against. It lacks the two metrics of the universal-embedding
benchmark (Ypsilantis et al., used by the Adevinta paper), written here:

- mMP@k, modified mean precision: relevant results in the top k over min(k, relevant that exist),
  so a query with fewer than k relevant items can still score 1;
- mR@1: the share of queries whose first result is relevant.

Graded labels (ESCI: Exact, Substitute, Complement, Irrelevant) map to gains through a parameter;
a result is relevant for the binary metrics when its gain is positive.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ir_measures
import numpy as np

__all__ = ["ESCI_GAINS", "evaluate", "mmp_at_k", "r_at_1", "esci_qrels"]

# The gains of Amazon's ESCI shopping-queries benchmark; nDCG only depends on their ratios.
ESCI_GAINS: Mapping[str, float] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
# pytrec_eval takes integer relevance: gains are scaled to integers, which nDCG does not notice.
_GAIN_SCALE = 1000

Run = Mapping[str, Sequence[str]]  # query id → ranked doc ids, best first
Qrels = Mapping[str, Mapping[str, float]]  # query id → doc id → gain


def esci_qrels(labels: Mapping[str, Mapping[str, str]], gains: Mapping[str, float] = ESCI_GAINS) -> Qrels:
    """query → doc → ESCI label (E/S/C/I) into gains."""
    unknown = {label for docs in labels.values() for label in docs.values()} - set(gains)
    if unknown:
        raise ValueError(f"unknown relevance labels {sorted(unknown)} (known: {sorted(gains)})")
    return {q: {d: float(gains[label]) for d, label in docs.items()} for q, docs in labels.items()}


def _relevant(qrels: Mapping[str, float]) -> set[str]:
    return {doc for doc, gain in qrels.items() if gain > 0}


def mmp_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Modified precision at k of one query (0 when nothing relevant exists)."""
    relevant = _relevant(qrels)
    if not relevant:
        return 0.0
    hits = sum(1 for doc in ranked[:k] if doc in relevant)
    return hits / min(k, len(relevant))


def r_at_1(ranked: Sequence[str], qrels: Mapping[str, float]) -> float:
    return float(bool(ranked) and ranked[0] in _relevant(qrels))


def _library_metrics(k: int):
    return {f"MAP@{k}": ir_measures.AP @ k, "MRR": ir_measures.RR, f"nDCG@{k}": ir_measures.nDCG @ k,
            f"recall@{k}": ir_measures.R @ k}


def evaluate(run: Run, qrels: Qrels, k: int = 5, per_query: bool = False) -> dict:
    """Mean of each metric over the queries of `run` (a query without judgements scores 0).

    With `per_query`, also returns {metric: {query: value}}.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    queries = list(run)
    ours = {
        f"mMP@{k}": {q: mmp_at_k(run[q], qrels.get(q, {}), k) for q in queries},
        "mR@1": {q: r_at_1(run[q], qrels.get(q, {})) for q in queries},
    }
    library = {name: dict.fromkeys(queries, 0.0) for name in _library_metrics(k)}
    judged = [q for q in queries if _relevant(qrels.get(q, {}))]
    if judged:
        lib_qrels = [ir_measures.Qrel(q, d, int(round(g * _GAIN_SCALE))) for q in judged
                     for d, g in qrels[q].items()]
        # Scores strictly decrease with rank, so the library ranks exactly as given.
        lib_run = [ir_measures.ScoredDoc(q, d, float(len(run[q]) - i)) for q in judged
                   for i, d in enumerate(dict.fromkeys(run[q]))]
        by_measure = {measure: name for name, measure in _library_metrics(k).items()}
        for metric in ir_measures.iter_calc(list(by_measure), lib_qrels, lib_run):
            library[by_measure[metric.measure]][metric.query_id] = float(metric.value)
    values = {**ours, **library}
    means = {name: float(np.mean(list(v.values()))) if v else 0.0 for name, v in values.items()}
    return (means, values) if per_query else means
