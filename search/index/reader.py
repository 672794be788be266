"""A store's current snapshot, and how it moves on: by applying each new commit's change.

A reader (a serving replica, or the writer's own searches) holds one snapshot. `refresh` moves it to
the newest generation by applying the changes the catalog keeps for the last commits
(catalog.changes_since) with `Snapshot.after`, the function the writer used: in proportion to what
the commits changed, not to the shard. A reader further behind than the log, or one that finds a
segment merged away before it got to it, loads the store anew. A generation that fails to load (a
corrupt segment, lost commits) leaves the last good snapshot served, and is retried after a while.
"""

from __future__ import annotations

import time
from pathlib import Path

from search.fields import Field
from search.index import catalog, files
from search.index.catalog import Catalog
from search.index.errors import StoreCorrupted
from search.index.snapshot import Snapshot
from search.segment import Segment, SegmentCorrupted, SegmentInfo

__all__ = ["Reader"]


class Reader:
    def __init__(self, catalog: Catalog, directory: Path, declared: tuple[Field, ...], require_sums: bool):
        self.catalog = catalog
        self.directory = directory
        self.declared = declared
        self.require_sums = require_sums
        self._broken: tuple[int, float, Exception] | None = None  # a generation that failed to load
        self.snapshot = self.load()

    def load(self, reuse: dict[str, Segment] | None = None) -> Snapshot:
        """The whole store, checked against its commit marker."""
        marked = files.marked_generation(self.directory)  # read first: the writer marks only after committing
        with self.catalog.transaction(immediate=False) as db:
            generation = catalog.generation(db)
            if generation < marked:
                raise StoreCorrupted(f"{self.directory} is at generation {generation} but committed {marked}: "
                                     f"its database lost commits (was state.sqlite-wal deleted?); restore the "
                                     f"shard from a copy or rebuild it")
            return Snapshot.load(db, self.directory, self.declared, self.require_sums, reuse)

    def refresh(self, retry_secs: float = 5.0) -> bool:
        """Picks up commits made by another process; True if there was one. When the new generation
        cannot be loaded this raises and the snapshot stays the last good one; the same generation is
        tried again only after `retry_secs`."""
        with self.catalog.transaction(immediate=False) as db:
            generation = catalog.generation(db)
        if generation == self.snapshot.generation:
            return False
        if self._broken and self._broken[0] == generation and time.monotonic() - self._broken[1] < retry_secs:
            raise self._broken[2]
        try:
            self.snapshot = self._applied_changes() or self._load_consistent()
        except Exception as e:
            self._broken = (generation, time.monotonic(), e)
            raise
        self._broken = None
        return True

    def _applied_changes(self) -> Snapshot | None:
        """The snapshot moved to the newest generation by applying each commit's change; None when that
        cannot be done (the log no longer reaches back to it, or a segment it names is gone: merged
        away meanwhile)."""
        snapshot = self.snapshot
        marked = files.marked_generation(self.directory)
        with self.catalog.transaction(immediate=False) as db:
            newest = catalog.generation(db)
            changes = catalog.changes_since(db, snapshot.generation, newest)
        if changes is None or newest < marked or newest <= snapshot.generation:  # behind its marker, or rewound
            return None
        try:
            for generation, change in enumerate(changes, snapshot.generation + 1):
                if not set(change["segments_removed"]) <= {seg.info.name for seg in snapshot.segments}:
                    return None
                added = {name: Segment(self.directory, SegmentInfo(name, kind, count), self.require_sums)
                         for name, kind, count in change["segments_added"]}
                snapshot = snapshot.after(change, generation, added)
        except SegmentCorrupted as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None  # added, then merged away and deleted before this reader got to it
            raise
        return snapshot

    def _load_consistent(self) -> Snapshot:
        for attempt in range(5):
            try:
                return self.load({s.info.name: s for s in self.snapshot.segments})
            except SegmentCorrupted as e:
                # Compaction removed a segment between our manifest read and its load: read again.
                if not isinstance(e.__cause__, FileNotFoundError) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")
