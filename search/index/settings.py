"""What a store is: its model and dimension, segment kind and FAISS parameters, merge policy and
filterable fields; given when it is created, then read back from its catalog (old stores' defaults)."""

from __future__ import annotations

import dataclasses
import json
import os

from search.fields import Field, parse_filterable
from search.index.errors import IndexMismatch
from search.merge_policy import MergePolicy
from search.segment import SegmentParams

__all__ = ["StoreMeta", "StoreSettings", "initial_meta", "read_meta"]


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    # The index's segment kind and FAISS parameters: given when a store is created, then its own.
    segment: SegmentParams = SegmentParams()
    merge: MergePolicy = MergePolicy()
    # Threads a segment build may use; the rest stay free for commits and searches. 0: all cores.
    build_threads: int = max(1, (os.cpu_count() or 2) - 1)
    # Filters that leave fewer docs than this in a segment are searched exactly.
    exact_below: int = 10_000
    # What one step of a filtered graph search costs, in rows scored exactly: a scope (a shop, a
    # filter) is scored exactly when its rows cost less than the widened beam would. Measured 14.5
    # at 1M 8-bit vectors (bench.exact_switch: a beam of 4,000 in 12.3 ms, 50,000 rows in 10.7 ms)
    # and ~38 at 3M; the lower one, so that the graph is kept wherever it might still win.
    # 0: only `exact_below` decides.
    graph_step_cost: float = 15.0
    # The attributes a query may filter and facet on (search.fields): given when a store is created.
    filterable: tuple[Field, ...] = ()


@dataclasses.dataclass
class StoreMeta:
    """The store's identity as its catalog records it (the dimension changes once: adopt_dimension)."""

    model: str
    dim: int
    settings: StoreSettings
    require_sums: bool  # stores made before segments carried checksums keep opening without them


def initial_meta(model: str, dim: int, settings: StoreSettings) -> dict[str, str]:
    """The catalog's meta rows of a new store."""
    if dim < 1:
        raise ValueError(f"an index needs a vector dimension of at least 1, not {dim}")
    return {"model": model, "dim": str(dim), "generation": "0", "next_doc_id": "0",
            "hnsw_m": str(settings.segment.m), "hnsw_ef_construction": str(settings.segment.ef_construction),
            "segment_kind": settings.segment.kind, "ivf_nprobe": str(settings.segment.nprobe),
            "segment_sums": "crc32", "filterable": json.dumps([str(f) for f in settings.filterable])}


def read_meta(meta: dict[str, str], where: str, model: str | None, dim: int | None,
              settings: StoreSettings) -> StoreMeta:
    """The store's identity from its meta rows; IndexMismatch when the caller expects another one."""
    found = StoreMeta(meta["model"], int(meta["dim"]), settings, meta.get("segment_sums") == "crc32")
    if model is not None and model != found.model or dim is not None and dim != found.dim:
        raise IndexMismatch(f"{where} indexes {found.model} ({found.dim}-d), not {model} ({dim}-d)")
    filterable = parse_filterable(json.loads(meta.get("filterable", "[]")))
    if settings.filterable and set(settings.filterable) != set(filterable):  # the same fields in any order
        raise IndexMismatch(f"{where} filters on {','.join(map(str, filterable)) or 'no attributes'}, "
                            f"not {','.join(map(str, settings.filterable))}")
    # A store made before segment kinds is an hnsw one.
    found.settings = dataclasses.replace(settings, segment=dataclasses.replace(
        settings.segment, kind=meta.get("segment_kind", "hnsw"), m=int(meta["hnsw_m"]),
        ef_construction=int(meta["hnsw_ef_construction"]), nprobe=int(meta.get("ivf_nprobe", 32))),
        filterable=filterable)
    return found
