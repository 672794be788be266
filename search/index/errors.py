"""The store's errors, under one base class: a caller can catch any of them, or the one it handles."""

from __future__ import annotations

__all__ = ["IndexLocked", "IndexMismatch", "IndexUnavailable", "StoreCorrupted", "StoreError"]


class StoreError(Exception):
    """Something about an index store, or a record or query for it, that the store refuses."""


class StoreCorrupted(StoreError, RuntimeError):
    """The store on disk is not what its commits made it: it must not be served as if it were."""


class IndexMismatch(StoreError, ValueError):
    """A record or query of another model or dimension than the index: refused, never mixed in."""


class IndexLocked(StoreError, RuntimeError):
    """Another process holds the store's writer lock: one writer per store."""


class IndexUnavailable(StoreError, RuntimeError):
    """The engine that holds the index does not answer (a Qdrant server down or overloaded): the
    request cannot be served now, a 503, and a later one may be."""
