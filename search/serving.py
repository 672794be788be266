"""Which index, and which query model, a search service answers with, and the swap when an alias moves.

A request takes the `Served` pair once (`with source.use() as served:`) and finishes on it, so a
swap never changes the index or the model under a request. `AliasFollower` reads the alias file
(search.aliases) at most every `check_secs`; when the alias names another index it opens that
index and its query model (its model id decides: a new model, a new head) in a background
thread, warms both, then swaps; the old pair is closed once its last request has finished. A
new index that cannot be opened is logged and reported (`error`), and the old one serves on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

import numpy as np

from search import aliases
from search.query.embedder import QueryEmbedder
from search.sharded import ShardedIndex

__all__ = ["AliasFollower", "Fixed", "Served"]

_log = logging.getLogger(__name__)
RETIRE_TIMEOUT_SECS = 120.0  # the longest an old index waits for its last requests before it is closed
RETRY_SECS = 30.0  # an alias target that failed to open is tried again after this long


class Served:
    """An index and the query embedder of its space, counted while requests use them."""

    def __init__(self, index: ShardedIndex, embedder: QueryEmbedder, name: str = ""):
        self.index, self.embedder, self.name = index, embedder, name
        self._users = 0
        self._idle = threading.Condition()

    def hold(self) -> "Served":
        with self._idle:
            self._users += 1
        return self

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            self._idle.notify_all()

    @contextlib.contextmanager
    def use(self) -> Iterator["Served"]:
        self.hold()
        try:
            yield self
        finally:
            self.release()

    def warm(self) -> None:
        """One search and (where the model runs here) one text query: the first real request pays for
        neither the index's pages nor the model's first pass."""
        probe = np.zeros(self.index.dim, np.float32)
        probe[0] = 1.0
        self.index.search(probe, k=10)
        if self.embedder.backend is not None:
            self.embedder.text("warm up")

    def retire(self, timeout_s: float = RETIRE_TIMEOUT_SECS) -> None:
        """Waits (at most `timeout_s`) until no request uses this pair, then closes the index."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._users and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.index.close()


class Fixed:
    """One index for the life of the service."""

    def __init__(self, served: Served):
        self._served = served
        self.error = ""

    def use(self):
        return self._served.use()

    def current(self) -> Served:
        return self._served

    def check(self) -> None:
        pass


class AliasFollower:
    """The index an alias of `root` names, followed as the alias moves. `opener(name)` opens index `name`
    with its query model (as search.server.open_service does); `resolve(alias)` names the index the
    alias points at now (default: search.aliases' file under `root`; a Qdrant collection alias for
    search.qdrant.index.collection_alias)."""

    def __init__(self, root: str, alias: str, opener: Callable[[str], Served], check_secs: float = 1.0,
                 resolve: Callable[[str], str] | None = None):
        self.root, self.alias, self.check_secs = root, alias, check_secs
        self._opener = opener
        self._resolve = resolve or (lambda name: aliases.resolve(root, name))
        self._served = opener(self._resolve(alias))
        self._lock = threading.Lock()
        self._swap = threading.Lock()  # a request takes the pair and counts itself in one step
        self._checked = time.monotonic()
        self._loading: str | None = None
        self._failed: tuple[str, float] | None = None  # (name, when) of the last target that would not open
        self.error = ""  # why the alias's newest target is not served ("" when it is)

    @contextlib.contextmanager
    def use(self) -> Iterator[Served]:
        """The pair now served, held until the request ends: it is not closed under the request, even if
        the alias moves meanwhile (the swap and this take the same lock)."""
        with self._swap:
            served = self._served.hold()
        try:
            yield served
        finally:
            served.release()

    def current(self) -> Served:
        return self._served

    def check(self) -> None:
        """Reads the alias (at most every `check_secs`) and starts loading a new target; never blocks on it."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.check_secs or self._loading:
                return
            self._checked = now
        try:
            name = self._resolve(self.alias)
        except Exception as e:  # whatever is wrong with the alias file, the request being served is not failed
            error = f"cannot read alias {self.alias!r}: {e}"
            if error != self.error:  # once per new fault, not every second it lasts
                _log.warning("%s; still serving %s", error, self._served.name)
            self.error = error
            return
        if name == self._served.name:
            self.error = ""
            return
        if self._failed and self._failed[0] == name and now - self._failed[1] < RETRY_SECS:
            return
        with self._lock:
            if self._loading:
                return
            self._loading = name
        threading.Thread(target=self._switch, args=(name,), name=f"open-index-{name}", daemon=True).start()

    def wait_loaded(self, timeout_s: float) -> bool:
        """For tests and tools: True once no new target is loading (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self._loading and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._loading

    def _switch(self, name: str) -> None:
        started = time.monotonic()
        try:
            served = self._opener(name)
            served.warm()
        except Exception as e:  # whatever stops the new index or model, the old one serves on
            self._failed = (name, time.monotonic())
            self.error = f"alias {self.alias!r} names {name!r}, which cannot be served: {type(e).__name__}: {e}"
            _log.error("%s; still serving %s", self.error, self._served.name)
            self._loading = None
            return
        with self._swap:
            old, self._served = self._served, served
        self.error, self._failed, self._loading = "", None, None
        _log.info("alias %s: now serving %s (%s, %d products; opened and warmed in %.1f s), was %s", self.alias,
                  name, served.index.model, served.index.stats()["live_docs"], time.monotonic() - started, old.name)
        old.retire()
