"""An index shard on object storage (gs://, or any filesystem Beam knows), Lucene-style.

Object stores have no SQLite and no atomic rename, but they have atomic object creation. So the
writer keeps its store on a local disk (a cache) and ships every commit as files that never change:

    REMOTE/shard-000/seg-*.ids.npy, .vectors.npy, .hnsw     segment files, uploaded before the commit
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
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

from search.segment import Segment, SegmentInfo
from search.store import MARKER, CommitDelta

__all__ = ["ShardReplica", "exists", "has_snapshot", "is_remote", "local_generation", "pull", "read_text", "restore", "write_text"]

_log = logging.getLogger(__name__)
_WIDTH = 20  # generation digits: names sort in commit order
_UPSERT = ("INSERT INTO products VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(product_id) DO UPDATE SET "
           "version=excluded.version, doc_id=excluded.doc_id, shop_id=excluded.shop_id, "
           "title=excluded.title, image_url=excluded.image_url")


def _fs():
    """Beam's FileSystems, imported only when an index is remote: the search service runs without Beam."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def exists(path: str) -> bool:
    return _fs().exists(path)


def read_text(path: str) -> str:
    with _fs().open(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    with _fs().create(path) as f:
        f.write(text.encode("utf-8"))


def _download(remote: str, local: Path) -> None:
    tmp = local.with_name(local.name + ".part")
    with _fs().open(remote) as source, open(tmp, "wb") as sink:
        shutil.copyfileobj(source, sink, 8 * 1024 * 1024)
    os.replace(tmp, local)


def _upload(local: Path, remote: str) -> None:
    with open(local, "rb") as source, _fs().create(remote) as sink:
        shutil.copyfileobj(source, sink, 8 * 1024 * 1024)


def _generations(pattern: str) -> dict[int, str]:
    """generation → path of the objects matching `pattern` (named GENERATION.ext)."""
    (result,) = _fs().match([pattern])
    return {int(Path(m.path).name.split(".")[0]): m.path for m in result.metadata_list}


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
        (result,) = _fs().match([self.path(name + ".*")])
        return [m.path for m in result.metadata_list if Path(m.path).name in Segment.files(name)]


def _generation(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])


def local_generation(local_dir: Path) -> int | None:
    """The generation of the store in `local_dir`, None when there is none."""
    if not (local_dir / "state.sqlite").exists():
        return None
    db = sqlite3.connect(f"file:{local_dir / 'state.sqlite'}?mode=ro", uri=True, timeout=60)
    try:
        return _generation(db)
    finally:
        db.close()


def _replay(db: sqlite3.Connection, delta: dict) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(_UPSERT, [tuple(row) for row in delta["products"]])
        db.executemany("DELETE FROM segments WHERE name = ?", [(name,) for name in delta["removed"]])
        db.executemany("INSERT INTO segments VALUES (?, ?, ?)", [tuple(info) for info in delta["added"]])
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_doc_id'", (str(delta["next_doc_id"]),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(delta["generation"]),))
        if delta.get("checkpoint") is not None:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('checkpoint', ?)", (delta["checkpoint"],))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _fetch_segments(remote: _Remote, local_dir: Path, names) -> None:
    for name in names:
        if not (local_dir / f"{name}.ids.npy").exists():
            # ids last: its presence marks a whole segment, as in Segment.write
            for path in sorted(remote.segment_files(name), key=lambda p: p.endswith(".ids.npy")):
                _download(path, local_dir / Path(path).name)


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
        _download(snapshots[max(snapshots)], state)
        return pull(remote_dir, local_dir)
    copy = local_dir / "snapshot.sqlite"
    _download(snapshots[max(snapshots)], copy)
    db = sqlite3.connect(state, isolation_level=None, timeout=60)
    try:
        db.execute("ATTACH DATABASE ? AS snapshot", (str(copy),))
        db.execute("BEGIN IMMEDIATE")
        for table in ("meta", "products", "segments"):
            db.execute(f"DELETE FROM main.{table}")
            db.execute(f"INSERT INTO main.{table} SELECT * FROM snapshot.{table}")
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
        generation = _generation(db)
        newer = sorted((g, p) for g, p in remote.commits().items() if g > generation)
        if not newer or newer[0][0] != generation + 1:
            snapshots = remote.snapshots()
            if snapshots and max(snapshots) > generation:
                db.close()
                return restore(remote_dir, local_dir)  # pruned past us: start from the newest snapshot
        for expected, (g, path) in enumerate(newer, generation + 1):
            if g != expected:
                break  # a gap: a commit still being written; the rest waits for the next pull
            delta = json.loads(read_text(path))
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


class ShardReplica:
    """The writer's side: a `CommitListener` for an `IndexStore` on `local_dir` that ships to `remote_dir`."""

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
                _upload(directory / name, self.remote.path(name))

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
        if _fs().exists(path):
            raise RuntimeError(f"{path} exists: another process is writing to {self.remote.root}")
        write_text(path, json.dumps({
            "generation": delta.generation, "next_doc_id": delta.next_doc_id, "products": delta.products,
            "added": [[i.name, i.kind, i.count] for i in delta.added], "removed": list(delta.removed),
            "checkpoint": delta.checkpoint}))

    def snapshot(self, generation: int) -> None:
        """Uploads the whole local state (the caller holds the store's write lock), then prunes."""
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "state.sqlite"
            source, target = sqlite3.connect(self.local_dir / "state.sqlite"), sqlite3.connect(copy)
            try:
                source.backup(target)
                if _generation(target) != generation:
                    raise RuntimeError(f"snapshot of generation {_generation(target)}, expected {generation}")
                live = {name for (name,) in target.execute("SELECT name FROM segments")}
            finally:
                source.close()
                target.close()
            _upload(copy, self.remote.path("snapshots", f"{generation:0{_WIDTH}d}.sqlite"))
        self._snapshot_generation = generation
        self._prune(generation, live | self._uncommitted)

    def _prune(self, generation: int, live: set[str]) -> None:
        """Commits and snapshots the new snapshot replaces (the previous snapshot is kept for readers
        still fetching it), and segment files no longer named."""
        old = [p for g, p in self.remote.commits().items() if g <= generation]
        snapshots = sorted(self.remote.snapshots().items())
        old += [p for _, p in snapshots[:-2]]
        (segments,) = _fs().match([self.remote.path("seg-*")])
        old += [m.path for m in segments.metadata_list if Path(m.path).name.split(".", 1)[0] not in live]
        if old:
            try:
                _fs().delete(old)
            except Exception as e:  # pruning is housekeeping: the next snapshot tries again
                _log.warning("could not prune %d old objects under %s: %s", len(old), self.remote.root, e)
