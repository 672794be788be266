"""The query planner's choices, as tables: from counts alone, like the merge policy's."""

from __future__ import annotations

import pytest

from search.query.planner import EXACT, GRAPH, SKIP, SegmentCounts, choose, scope_exactly


@pytest.mark.parametrize("kind, count, allowed, exact, exact_below, expected", [
    ("hnsw", 1000, 0, False, 10, SKIP),  # none of the query's docs: never searched
    ("hnsw", 1000, 0, True, 10, SKIP),
    ("flat", 1000, 900, False, 10, EXACT),  # no graph to search
    ("hnsw", 1000, 9, False, 10, EXACT),  # too few pass: filtered graph search loses recall
    ("hnsw", 1000, 10, False, 10, GRAPH),
    ("hnsw_sq8", 1000, 500, False, 10, GRAPH),
    ("ivf_pq", 1000, 500, False, 10, GRAPH),
    ("hnsw", 1000, 1000, True, 10, EXACT),  # the query asked for exact
])
def test_each_segment_is_skipped_scored_exactly_or_searched_by_its_index(kind, count, allowed, exact, exact_below,
                                                                          expected):
    assert choose(SegmentCounts(kind, count, allowed), exact, exact_below) == expected


def never_read():
    raise AssertionError("a small scope's per-segment counts were made")
    yield


@pytest.mark.parametrize("scope, segments, k, ef, step, expected", [
    # A scope under exact_below (100): exact, and its per-segment counts are never made.
    (99, never_read(), 10, 64, 15.0, True),
    # 5,000 of 1M in one graph: the beam widens to 10 × 1M / 5,000 = 2,000 steps × 15 rows > 5,000 rows.
    (5_000, [SegmentCounts("hnsw", 1_000_000, 5_000)], 10, 64, 15.0, True),
    # 500,000 of 1M: the beam stays at ef 64, 960 rows' worth < 500,000 rows.
    (500_000, [SegmentCounts("hnsw", 1_000_000, 500_000)], 10, 64, 15.0, False),
    # Flat and IVF segments cost their rows either way, so they never tip the choice to the graph.
    (500_000, [SegmentCounts("flat", 500_000, 250_000), SegmentCounts("ivf_pq", 500_000, 250_000)], 10, 64, 15.0,
     False),
    # graph_step_cost 0: only exact_below decides.
    (5_000, [SegmentCounts("hnsw", 1_000_000, 5_000)], 10, 64, 0.0, False),
    # An 8-bit graph re-scores 2k candidates: its beam is at least max(ef, 2k).
    (1_000, [SegmentCounts("hnsw_sq8", 1_000, 1_000)], 100, 16, 15.0, True),
])
def test_a_scope_is_scored_exactly_when_its_rows_cost_less_than_the_widened_beams(scope, segments, k, ef, step,
                                                                                   expected):
    assert scope_exactly(scope, segments, k, ef, exact_below=100, graph_step_cost=step) is expected
