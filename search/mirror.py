"""An index shard on object storage (gs://, or any filesystem Beam knows), Lucene-style.

Object stores have no SQLite and no atomic rename, but they have atomic object creation. So the
writer keeps its store on a local disk (a cache) and ships every commit as files that never change:

    REMOTE/shard-000/seg-*.ids.npy, .vectors.npy, .hnsw      segment files (.faiss for the compressed
                                                             kinds), uploaded before the commit
    REMOTE/shard-000/commits/GENERATION.json                 one per commit: rows changed, segments
                                                             added and removed (the commit point)
    REMOTE/shard-000/snapshots/GENERATION.sqlite             the whole product state, every so often

A reader (or a writer on a fresh machine) restores the latest snapshot, replays the commits after
it in order, and fetches the segments the result names; afterwards it replays new commits as they
appear. A snapshot lets older commits, snapshots and segments that no commit still names be deleted.
A commit that could not be shipped stays queued and is shipped, in order, before the next one.
One writer per shard: a commit file that already exists means another writer, and is refused.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import storage
from search.index import catalog
from search.segment import Segment, SegmentInfo
from search.store import MARKER, CommitDelta

__all__ = ["CommitConflict", "ShardPublisher", "has_snapshot", "local_generation", "pull", "restore"]

_log = logging.getLogger(__name__)
_WIDTH = 20  # generation digits: names sort in commit order
# Segment files younger than this are never pruned: another writer of the shard (a rebalanced key, a
# zombie bundle) may have uploaded them for a commit it has not created yet.
SEGMENT_GRACE_SECS = 900


class CommitConflict(RuntimeError):
    """Another writer created this generation's commit object first: this writer's local store has
    diverged from the shard and must be restored from the remote before it commits again."""


def _generations(pattern: str) -> dict[int, str]:
    """generation → path of the objects matching `pattern` (named GENERATION.ext)."""
    return {int(Path(path).name.split(".")[0]): path for path in storage.match(pattern)}


class _Remote:
    def __init__(self, remote: str):
        self.root = remote.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def commits(self) -> dict[int, str]:
        return _generations(self.path("commits", "*.json"))

    def snapshots(self) -> dict[int, str]:
        return _generations(self.path("snapshots", "*.sqlite"))

    def latest(self) -> int | None:
        known = [*self.commits(), *self.snapshots()]
        return max(known) if known else None

    def segment_files(self, name: str) -> list[str]:
        return [path for path in storage.match(self.path(name + ".*")) if Path(path).name in Segment.files(name)]


def local_generation(local_dir: Path) -> int | None:
    """The generation of the store in `local_dir`, None when there is none."""
    if not (local_dir / "state.sqlite").exists():
        return None
    db = sqlite3.connect(f"file:{local_dir / 'state.sqlite'}?mode=ro", uri=True, timeout=60)
    try:
        return catalog.generation(db)
    finally:
        db.close()


def _replay(db: sqlite3.Connection, delta: dict) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        catalog.write_commit(db, generation=delta["generation"], products=delta["products"], added=delta["added"],
                               removed=delta["removed"], next_doc_id=delta["next_doc_id"])
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _fetch_segments(remote: _Remote, local_dir: Path, names) -> None:
    for name in names:
        if not (local_dir / f"{name}.ids.npy").exists():
            # ids last: its presence marks a whole segment, as in Segment.write
            for path in sorted(remote.segment_files(name), key=lambda p: p.endswith(".ids.npy")):
                storage.copy_to_local(path, local_dir / Path(path).name)


def has_snapshot(remote_dir: str) -> bool:
    return bool(_Remote(remote_dir).snapshots())


def restore(remote_dir: str, local_dir: Path) -> int:
    """Brings `local_dir` to the shard's latest committed state; returns its generation.

    An existing local database is overwritten in one transaction, not replaced, so a reader's
    open connections see the new state like any other commit."""
    remote = _Remote(remote_dir)
    snapshots = remote.snapshots()
    if not snapshots:
        raise FileNotFoundError(f"no index shard at {remote_dir} (no snapshot)")
    local_dir.mkdir(parents=True, exist_ok=True)
    # The remote is the truth now: a local commit marker from before would read as lost commits.
    (local_dir / MARKER).unlink(missing_ok=True)
    state = local_dir / "state.sqlite"
    if not state.exists():
        storage.copy_to_local(snapshots[max(snapshots)], state)
        return pull(remote_dir, local_dir)
    copy = local_dir / "snapshot.sqlite"
    storage.copy_to_local(snapshots[max(snapshots)], copy)
    db = sqlite3.connect(state, isolation_level=None, timeout=60)
    try:
        db.execute("ATTACH DATABASE ? AS snapshot", (str(copy),))
        db.execute("BEGIN IMMEDIATE")
        for table in ("meta", "products", "segments"):
            db.execute(f"DELETE FROM main.{table}")
            db.execute(f"INSERT INTO main.{table} SELECT * FROM snapshot.{table}")
        db.execute("DELETE FROM main.lexical")
        db.execute("INSERT INTO main.lexical(rowid, title, description, attributes) "
                   "SELECT rowid, title, description, attributes FROM snapshot.lexical")
        db.execute("COMMIT")
        db.execute("DETACH DATABASE snapshot")
    finally:
        db.close()
        copy.unlink(missing_ok=True)
    return pull(remote_dir, local_dir)


def pull(remote_dir: str, local_dir: Path) -> int:
    """Replays the commits after the local generation; restores when they no longer connect."""
    remote = _Remote(remote_dir)
    db = sqlite3.connect(local_dir / "state.sqlite", isolation_level=None, timeout=60)
    try:
        generation = catalog.generation(db)
        newer = sorted((g, p) for g, p in remote.commits().items() if g > generation)
        if not newer or newer[0][0] != generation + 1:
            snapshots = remote.snapshots()
            if snapshots and max(snapshots) > generation:
                db.close()
                return restore(remote_dir, local_dir)  # pruned past us: start from the newest snapshot
        for expected, (g, path) in enumerate(newer, generation + 1):
            if g != expected:
                break  # a gap: a commit still being written; the rest waits for the next pull
            delta = json.loads(storage.read_bytes(path))
            _fetch_segments(remote, local_dir, [info[0] for info in delta["added"]])
            _replay(db, delta)
            generation = g
        names = {name for (name,) in db.execute("SELECT name FROM segments")}
        _fetch_segments(remote, local_dir, names)
        for path in local_dir.glob("seg-*"):
            if path.name.split(".", 1)[0] not in names:
                path.unlink(missing_ok=True)
        return generation
    finally:
        db.close()


class ShardPublisher:
    """The writer's side: a `CommitListener` for an `IndexStore` on `local_dir` that publishes each of
    its commits to `remote_dir`, where replicas (`restore`, `pull`) read them."""

    def __init__(self, remote_dir: str, local_dir: Path, snapshot_every: int = 500):
        self.remote = _Remote(remote_dir)
        self.local_dir = Path(local_dir)
        self.snapshot_every = snapshot_every
        self._pending: list[CommitDelta] = []
        self._uncommitted: set[str] = set()  # segments uploaded for a commit still to come: never pruned
        self._lock = threading.Lock()
        snapshots = self.remote.snapshots()
        self._snapshot_generation = max(snapshots) if snapshots else None

    def segment_written(self, directory: Path, info: SegmentInfo) -> None:
        with self._lock:
            self._uncommitted.add(info.name)
        for name in Segment.files(info.name):
            if (directory / name).exists():
                storage.copy_from_local(directory / name, self.remote.path(name))

    def committed(self, delta: CommitDelta) -> None:
        """Ships this commit and any left over from a failure before it, in generation order."""
        with self._lock:
            self._pending.append(delta)
            self._uncommitted.difference_update(info.name for info in delta.added)
            while self._pending:
                self._ship(self._pending[0])
                self._pending.pop(0)
            if self._snapshot_generation is None or delta.generation - self._snapshot_generation >= self.snapshot_every:
                self.snapshot(delta.generation)

    def _ship(self, delta: CommitDelta) -> None:
        path = self.remote.path("commits", f"{delta.generation:0{_WIDTH}d}.json")
        try:  # the remote commit point: exactly one writer creates generation G
            storage.create_only(path, json.dumps({
                "generation": delta.generation, "next_doc_id": delta.next_doc_id, "products": delta.products,
                "added": [[i.name, i.kind, i.count] for i in delta.added],
                "removed": list(delta.removed)}).encode("utf-8"))
        except storage.AlreadyExists as e:
            raise CommitConflict(f"{path} exists: another process is writing to {self.remote.root}") from e

    def snapshot(self, generation: int) -> None:
        """Uploads the whole local state (the caller holds the store's write lock), then prunes."""
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "state.sqlite"
            source, target = sqlite3.connect(self.local_dir / "state.sqlite"), sqlite3.connect(copy)
            try:
                source.backup(target)
                if catalog.generation(target) != generation:
                    raise RuntimeError(f"snapshot of generation {catalog.generation(target)}, expected {generation}")
                live = {name for (name,) in target.execute("SELECT name FROM segments")}
            finally:
                source.close()
                target.close()
            storage.copy_from_local(copy, self.remote.path("snapshots", f"{generation:0{_WIDTH}d}.sqlite"))
        self._snapshot_generation = generation
        self._prune(generation, live | self._uncommitted)

    def _prune(self, generation: int, live: set[str]) -> None:
        """Commits and snapshots the new snapshot replaces (the previous snapshot is kept for readers
        still fetching it), and segment files no longer named."""
        old = [p for g, p in self.remote.commits().items() if g <= generation]
        snapshots = sorted(self.remote.snapshots().items())
        old += [p for _, p in snapshots[:-2]]
        old += [path for path in storage.match(self.remote.path("seg-*"))
                if Path(path).name.split(".", 1)[0] not in live and _age_secs(Path(path).name) > SEGMENT_GRACE_SECS]
        if old:
            try:
                storage.delete(old)
            except Exception as e:  # pruning is housekeeping: the next snapshot tries again
                _log.warning("could not prune %d old objects under %s: %s", len(old), self.remote.root, e)


def _age_secs(segment_file: str) -> float:
    """How long ago the segment was named (`seg-<time_ns>-...`, IndexStore._segment_name)."""
    try:
        return time.time() - int(segment_file.split("-")[1]) / 1e9
    except (IndexError, ValueError):
        return float("inf")
