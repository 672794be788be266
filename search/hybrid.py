"""Keywords with vectors: the lexical query the store's FTS5 index runs, and reciprocal rank fusion.

A shopper's words are matched as any of their terms (OR), ranked by BM25 with the title weighing
most; each term is quoted, so no FTS5 syntax (NEAR, column filters, `*`) can come from a query. The
vector list and the lexical list are fused by reciprocal rank fusion (Cormack et al., 2009): a
doc's score is the sum over lists of weight / (RRF_K + its rank), ranks from 1, so the two lists'
incomparable scores (cosine, BM25) never meet.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

__all__ = ["BM25_WEIGHTS", "FUSION_WINDOW", "MODES", "RRF_K", "fold", "fts_query", "fuse", "fusion_window", "query_terms"]

MODES = ("vector", "lexical", "hybrid")
RRF_K = 60
FUSION_WINDOW = 100  # each list contributes at least its top 100 to the fusion


def fusion_window(k: int, given: int | None = None) -> int:
    """How deep each list goes into the fusion: `given`, or max(FUSION_WINDOW, k). The page size's k,
    never a deepened one: every page of one page size then comes from one fused list."""
    return given or max(FUSION_WINDOW, k)
BM25_WEIGHTS = (3.0, 1.0, 2.0)  # title, description, declared keyword attributes
MAX_TERMS = 32
_TERM = re.compile(r"\w+", re.UNICODE)


def query_terms(text: str) -> list[str]:
    """A shopper's words, lowercased, each once, at most MAX_TERMS: what both backends match."""
    return list(dict.fromkeys(term.lower() for term in _TERM.findall(text)))[:MAX_TERMS]


def fold(text: str) -> str:
    """`text` without diacritics ("Café naïve" → "Cafe naive"), as FTS5's `remove_diacritics` folds the
    FAISS store's keywords: the Qdrant backend folds its keywords and queries with it, since a Qdrant text
    index that folds (`ascii_folding`) cannot be scored in its local mode."""
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def fts_query(text: str) -> str | None:
    """The FTS5 MATCH expression for a shopper's text: its words, each quoted, OR-ed; None if it has none."""
    terms = query_terms(text)
    return " OR ".join(f'"{term}"' for term in terms) if terms else None


def fuse(lists: Sequence[Sequence[tuple[float, int]]], weights: Sequence[float], k: int = RRF_K
         ) -> list[tuple[float, int]]:
    """(score, doc) lists, each best first → one list by reciprocal rank fusion, best first."""
    scores: dict[int, float] = {}
    for ranked, weight in zip(lists, weights):
        for rank, (_, doc) in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + weight / (k + rank)
    return sorted(((score, doc) for doc, score in scores.items()), key=lambda item: (-item[0], item[1]))
