"""What the search service's handlers share: the index served and its refresh, the query embedder,
image-query slots, and the metrics. One `Service` per app, on `app.state.service`; handlers take the
served index through the `served` dependency, which holds it for the whole request (an alias swap
never changes the index or the model under a request) and picks up new commits at most every
`refresh_secs`."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import anyio
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from search.query.embedder import QueryEmbedder
from search.serving import Served
from search.sharded import ShardedIndex

__all__ = ["ImageQueriesBusy", "Service", "served"]


class ImageQueriesBusy(RuntimeError):
    """An image query could not get a fetch slot and finish within its deadline: a 503."""


class Service:
    def __init__(self, source, refresh_secs: float, image_timeout_secs: float | None, image_slots: int):
        self.source = source
        self.refresh_secs = refresh_secs
        self.image_slots = image_slots
        self.image_limiter = anyio.CapacityLimiter(image_slots)
        self.image_timeout = image_timeout_secs or source.current().embedder.fetch_timeout_s
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("search_requests_total", "Search requests by outcome", ["outcome"], registry=registry)
        self.latency = Histogram("search_latency_seconds", "Search request latency, query embedding included",
                                 ["kind"], registry=registry)
        self.embedded = Counter("query_embeddings_total", "Queries run through the query model, by kind",
                                ["kind"], registry=registry)
        self.live_docs = Gauge("index_live_docs", "Live documents in the index", registry=registry)
        self.generation = Gauge("index_generation", "Sum of the shards' commit generations", registry=registry)
        self.failed_reloads = Counter("index_reload_failures_total", "New generations that failed to load (the "
                                      "last good one kept serving)", registry=registry)
        self._state = {"refreshed": 0.0, "failed": 0, "index": None}
        self._lock = threading.Lock()

    def refresh(self, index: ShardedIndex) -> None:
        """Picks up new commits (and an alias's move) at most every `refresh_secs`."""
        self.source.check()
        state = self._state
        with self._lock:
            if time.monotonic() - state["refreshed"] >= self.refresh_secs:
                index.refresh()
                state["refreshed"] = time.monotonic()
                if state["index"] is not index:  # an alias moved: the new index counts from 0
                    state["index"], state["failed"] = index, 0
                self.failed_reloads.inc(index.failed_reloads - state["failed"])
                state["failed"] = index.failed_reloads
                stats = index.stats()
                self.live_docs.set(stats["live_docs"])
                self.generation.set(stats["generation"])

    def answered(self, kind: str, started: float) -> float:
        """Counts a request that succeeded, observes its latency; its milliseconds, for `took_ms`."""
        took = time.perf_counter() - started
        self.latency.labels(kind).observe(took)
        self.requests.labels("ok").inc()
        return round(took * 1000, 3)

    def text_vector(self, embedder: QueryEmbedder, text: str):
        self.embedded.labels("text").inc()
        return embedder.text(text)

    async def image_vector(self, embedder: QueryEmbedder, url: str):
        """Fetches in a thread of the image pool, within the query's deadline (its wait included):
        slow image hosts hold image slots, never the threads text and vector queries run on."""
        deadline = time.monotonic() + self.image_timeout
        try:
            with anyio.fail_after(self.image_timeout):
                vector = await anyio.to_thread.run_sync(embedder.image_url, url, deadline,
                                                        limiter=self.image_limiter)
        except TimeoutError:
            raise ImageQueriesBusy(f"image query did not finish within {self.image_timeout:g} s: "
                                   f"{self.image_slots} image queries were already fetching") from None
        self.embedded.labels("image").inc()
        return vector


def served(request: Request) -> Iterator[Served]:
    """A dependency: the index and embedder this request runs on, refreshed, held until it ends."""
    service: Service = request.app.state.service
    with service.source.use() as current:
        service.refresh(current.index)
        yield current
