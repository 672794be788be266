"""Every name a store puts on disk, and what is kept outside SQLite: the commit marker and orphans.

A store's directory holds `state.sqlite` (the catalog, search.index.catalog), its WAL, `writer.lock`,
the `committed` marker and the segments' files (`seg-<time>-<random>.*`, search.segment).
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from pathlib import Path
from typing import IO

from search.index.errors import IndexLocked
from search.segment import Segment

__all__ = ["LOCK", "MARKER", "STATE", "lock_writer", "mark", "marked_generation", "remove_orphans", "remove_segment", "segment_name"]

STATE = "state.sqlite"
LOCK = "writer.lock"
MARKER = "committed"  # the generation of the last commit


def lock_writer(directory: Path) -> IO:
    """Takes the store's writer lock (held while the returned file is open): generations and views
    assume one writer process per store. Readers are unlimited."""
    lock = open(directory / LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexLocked(f"another process is writing to {directory}") from None
    return lock


# The generation of the last commit is also kept outside SQLite, written after each commit: were the
# WAL lost (deleted, or not copied with the database), the database would quietly fall back to an
# older generation; the marker, ahead of it, says so.
def marked_generation(directory: Path) -> int:
    try:
        return int((directory / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return 0  # a store from before the marker, or a replica (search.mirror keeps none)


def mark(directory: Path, generation: int) -> None:
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(str(generation))
    os.replace(tmp, directory / MARKER)


def segment_name() -> str:
    return f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"


def remove_orphans(directory: Path, live: set[str]) -> None:
    """Removes segment files of commits that never happened (a crash between write and commit)."""
    for path in directory.glob("seg-*"):
        if path.name.split(".", 1)[0] not in live:
            path.unlink(missing_ok=True)


def remove_segment(directory: Path, name: str) -> None:
    for file in Segment.files(name):
        (directory / file).unlink(missing_ok=True)
