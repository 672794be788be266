"""The merge policy alone: which segments it merges, and when (search.merge_policy)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from search.merge_policy import MergePolicy, SegmentState

POLICY = MergePolicy(delta_limit=100, max_delta_segments=3, max_built_segments=3, tombstone_ratio=0.3)


def flat(name, count=10, live=None):
    return SegmentState(name, "flat", count, count if live is None else live)


def graph(name, count=1000, live=None):
    return SegmentState(name, "hnsw", count, count if live is None else live)


def test_nothing_is_due_for_a_few_small_flat_segments_and_healthy_graphs():
    assert POLICY.plan([flat("f1"), flat("f2"), graph("g1"), graph("g2")]) == []


def test_flat_segments_merge_once_they_are_large_or_many():
    assert POLICY.plan([flat("f1", 60), flat("f2", 50), graph("g1")]) == ["f1", "f2"]
    assert POLICY.plan([flat(f"f{n}") for n in range(4)]) == ["f0", "f1", "f2", "f3"]


def test_a_graph_past_the_tombstone_ratio_is_rebuilt_alone():
    assert POLICY.plan([graph("g1", 1000, 650), graph("g2", 1000, 900)]) == ["g1"]


def test_too_many_graphs_merge_smallest_first_counting_the_new_one():
    segments = [graph("big", 5000), graph("mid", 2000), graph("small", 300), graph("tiny", 100)]
    assert POLICY.plan(segments) == ["tiny", "small"]
    # merging the flat segments makes a new graph, so one more small graph joins the merge
    flats = [flat(f"f{n}") for n in range(4)]
    assert POLICY.plan([*segments[:3], *flats]) == ["f0", "f1", "f2", "f3", "small"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["flat", "hnsw"]), st.integers(1, 5000), st.floats(0, 1)), max_size=20))
def test_after_a_plan_is_carried_out_the_graphs_fit_and_none_is_worn(shapes):
    """Applying the plan (its segments merged into one graph of their live docs) leaves at most
    max_built_segments graphs, none of them past the tombstone ratio."""
    segments = [SegmentState(f"s{n}", kind, count, int(count * share)) for n, (kind, count, share) in enumerate(shapes)]
    names = POLICY.plan(segments)
    assert len(names) == len(set(names)) and set(names) <= {s.name for s in segments}
    merged = [s for s in segments if s.name in names]
    after = [s for s in segments if s.name not in names]
    live = sum(s.live for s in merged)
    if live:  # the store writes no segment when nothing merged is live
        after.append(SegmentState("merged", "hnsw", live, live))
    graphs = [s for s in after if s.kind == "hnsw"]
    assert len(graphs) <= POLICY.max_built_segments
    assert all(s.dead_ratio <= POLICY.tombstone_ratio for s in graphs)
