"""Which segments to merge, and when: the store's merge policy, apart from the store as Lucene keeps it.

Commits write small flat segments (searched exactly); merging them into a segment of the index's
kind (an HNSW graph, float or 8-bit, or IVF-PQ) is the expensive part (the build), so the policy
merges flat segments once they are many or large, rebuilds a built segment whose tombstones pass a
ratio, and merges built segments (smallest first) only when there are too many of them: a vector is
rarely built into an index twice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

__all__ = ["MergePolicy", "SegmentState"]


@dataclasses.dataclass(frozen=True)
class SegmentState:
    """What the policy knows of a segment: its name, kind, size and how many of its docs are live."""

    name: str
    kind: str  # "flat", or the kind compaction builds (search.segment.SEGMENT_KINDS)
    count: int
    live: int

    @property
    def dead_ratio(self) -> float:
        return 1 - self.live / self.count if self.count else 1.0


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    # Flat (delta) segments are merged into a built segment once they hold this many vectors or number
    # this many.
    delta_limit: int = 20_000
    max_delta_segments: int = 16
    # Built segments, of whatever kind the index builds (HNSW, 8-bit HNSW, IVF-PQ), are merged,
    # smallest first, only past this many.
    max_built_segments: int = 8
    # A built segment whose tombstones pass this share is rebuilt without them.
    tombstone_ratio: float = 0.3

    def plan(self, segments: Sequence[SegmentState]) -> list[str]:
        """Names of the segments to merge into one new segment; empty when nothing is due."""
        delta = [s for s in segments if s.kind == "flat"]
        built = [s for s in segments if s.kind != "flat"]
        plan = []
        if sum(s.count for s in delta) >= self.delta_limit or len(delta) > self.max_delta_segments:
            plan += delta
        worn = [s for s in built if s.dead_ratio > self.tombstone_ratio]
        plan += worn
        kept = sorted((s for s in built if s not in worn), key=lambda s: s.count)
        excess = len(kept) + (1 if plan else 0) - self.max_built_segments
        if excess > 0:
            # The smallest ones: into the segment the plan already makes, `excess` of them are enough;
            # merged among themselves, one more (n segments into one is n - 1 fewer).
            plan += kept[:excess if plan else excess + 1]
        return [s.name for s in plan]
