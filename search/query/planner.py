"""How each segment is searched for one query: exactly, by its index, or not at all. Pure: decided from
counts (the segment's kind and size, the docs the query may return in it), k and the beam.

- A segment with none of the query's docs is skipped.
- A flat segment, a segment holding fewer of them than `exact_below`, or an exact query is scored
  exactly: filtered approximate search loses recall when few docs pass, and costs more than it saves.
- A scope (a shop, a filter) is scored exactly over its own docs when those rows cost less than the
  graph searches would: each segment's beam widened by the inverse of its passing share
  (search.segment.filtered_ef), at `graph_step_cost` rows per step (measured by bench.exact_switch).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from search.segment import filtered_ef

__all__ = ["EXACT", "GRAPH", "SKIP", "SegmentCounts", "choose", "scope_exactly"]

EXACT, GRAPH, SKIP = "exact", "graph", "skip"


@dataclasses.dataclass(frozen=True)
class SegmentCounts:
    kind: str  # "flat", or the kind compaction builds (search.segment.SEGMENT_KINDS)
    count: int  # docs in the segment
    allowed: int  # of them, the ones the query may return (live, and in its scope)


def choose(segment: SegmentCounts, exact: bool, exact_below: int) -> str:
    """EXACT, GRAPH or SKIP for one segment."""
    if segment.allowed == 0:
        return SKIP
    if exact or segment.kind == "flat" or segment.allowed < exact_below:
        return EXACT
    return GRAPH


def scope_exactly(scope_size: int, segments: Iterable[SegmentCounts], k: int, ef_search: int,
                  exact_below: int, graph_step_cost: float) -> bool:
    """Whether a scope of `scope_size` docs costs less scored exactly than searched as the graph path
    would: in each segment holding some, by its graph with the beam widened by that segment's own
    share, or exactly where it has no graph, holds too few of them, or is IVF (the same cost either
    way). `segments` is read only when the scope is not small already."""
    if scope_size < exact_below:
        return True
    graph = 0.0
    for seg in segments:
        if choose(seg, False, exact_below) != GRAPH or seg.kind == "ivf_pq":
            graph += seg.allowed
        else:
            graph += graph_step_cost * filtered_ef(seg.kind, seg.count, k, ef_search, seg.allowed)
    return scope_size < graph
