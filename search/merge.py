"""One merge of partial answers: hits and facet counts from shards (search.sharded) or from backends
that each serve some shards (search.router), so the two can never disagree.

Hits are ordered by score, then product id (the order every page size agrees on), a product counted
once (a shard that moved between backends mid-query must not count twice), then cut to the page.
Facet counts are exact per part and added value by value (bucket by bucket); only the total is cut to
the most frequent values, so a value rare in every part keeps every part's count.
"""

from __future__ import annotations

from typing import Any, Iterable

from search.query.searcher import Hit

__all__ = ["MAX_FACET_VALUES", "counts_of", "facet_lists", "merge_hits", "sum_facets"]

MAX_FACET_VALUES = 100  # values per facet an answer lists, the most frequent


def merge_hits(parts: Iterable[Iterable[Hit]], offset: int = 0, k: int | None = None) -> list[Hit]:
    """The page offset..offset+k of the parts' hits merged by score (all of them when k is None)."""
    unique: dict[str, Hit] = {}
    for hit in sorted((hit for part in parts for hit in part), key=lambda hit: (-hit.score, hit.product_id)):
        unique.setdefault(hit.product_id, hit)
    hits = list(unique.values())
    return hits[offset:None if k is None else offset + k]


def sum_facets(parts: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """Counts of several parts added up, in the store's shape (IndexStore.facets): per field
    {"values": {value: count}} or {"buckets": [count per bucket]}."""
    out: dict[str, dict] = {}
    for part in parts:
        for name, counts in part.items():
            if "values" in counts:
                merged = out.setdefault(name, {"values": {}})["values"]
                for value, count in counts["values"].items():
                    merged[value] = merged.get(value, 0) + count
            else:
                merged = out.setdefault(name, {"buckets": [0] * len(counts["buckets"])})
                merged["buckets"] = [a + b for a, b in zip(merged["buckets"], counts["buckets"])]
    return out


def facet_lists(counts: dict[str, dict], buckets: dict[str, list[float]],
                limit: int | None = MAX_FACET_VALUES) -> dict[str, list[dict[str, Any]]]:
    """Counts in the store's shape → an answer's lists: values by count, most frequent first (the
    `limit` most; None: all), buckets in order as [from, to)."""
    out = {}
    for name, part in counts.items():
        if "buckets" in part:
            edges = buckets[name]
            out[name] = [{"value": [a, b], "count": c} for a, b, c in zip(edges, edges[1:], part["buckets"])]
        else:
            ranked = sorted(part["values"].items(), key=lambda item: (-item[1], str(item[0])))
            out[name] = [{"value": value, "count": count} for value, count in ranked[:limit]]
    return out


def counts_of(lists: dict[str, list[dict[str, Any]]], buckets: dict[str, list[float]]) -> dict[str, dict]:
    """An answer's lists (facet_lists, all values) back in the store's shape, to be summed."""
    out = {}
    for name, items in lists.items():
        if name in buckets:
            out[name] = {"buckets": [item["count"] for item in items]}
        else:
            out[name] = {"values": {_hashable(item["value"]): item["count"] for item in items}}
    return out


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
