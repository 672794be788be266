"""The point-in-time view a search reads, and the one function that makes the next one.

A `Snapshot` holds the segments of one generation, a liveness bitmap per segment and each segment's
columns (its docs' shops and filterable values, search.fields). It is immutable: the writer and every
reader swap in a new one, so a search never sees half a commit. `Snapshot.after(change)` makes the
next snapshot from a commit's change (catalog.write_commit) in proportion to the change, copy-on-write;
the writer's commits, its merges and every reader's refresh go through it, so they cannot drift.
`load` reads a whole store instead, once at open or when a reader is too far behind.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from search.fields import SHOP, Codes, Column, Field, FieldIndex, numbers, typed
from search.index import catalog
from search.segment import Segment, SegmentInfo

__all__ = ["Snapshot", "ones", "unpack"]


def ones(count: int) -> np.ndarray:
    return np.packbits(np.ones(count, bool), bitorder="little")


def unpack(bits: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(bits, count=count, bitorder="little").view(bool)


def bitmap(seg: Segment, docs: np.ndarray) -> tuple[np.ndarray, int]:
    """(the packed bitmap of the doc ids `docs` over the segment's positions, how many it holds)."""
    mask = np.zeros(seg.info.count, bool)
    found, positions = seg.locate(docs)
    mask[positions] = True
    return np.packbits(mask, bitorder="little"), int(found.sum())


def column(seg: Segment, docs: np.ndarray, values: np.ndarray) -> Column:
    """A segment's column from (docs, numbers) of any docs: those it holds are its values."""
    found, positions = seg.locate(docs)
    return Column.at(seg.info.count, positions, values[found])


@dataclasses.dataclass(frozen=True)
class Snapshot:
    generation: int
    next_doc: int
    segments: tuple[Segment, ...]
    live: dict[str, np.ndarray]  # segment name → packed liveness bitmap over its positions (little bit order)
    live_count: dict[str, int]
    columns: dict[str, dict[str, Column]]  # segment name → field name (and "shop_id") → its column
    declared: tuple[Field, ...]  # the filterable fields
    codes: dict[str, Codes]  # keyword field (and "shop_id") → its codes, shared by a store's snapshots

    @classmethod
    def load(cls, db, directory: Path, declared: tuple[Field, ...], require_sums: bool,
             reuse: dict[str, Segment] | None = None) -> "Snapshot":
        """The whole store as its catalog has it now (inside the caller's read transaction); segments
        in `reuse` are taken as they are."""
        reuse = reuse or {}
        generation = catalog.generation(db)
        next_doc = int(catalog.meta(db, "next_doc_id"))
        infos = [SegmentInfo(*row) for row in catalog.segment_rows(db)]
        codes = {SHOP.name: Codes()} | {f.name: Codes() for f in declared if f.type == "keyword"}
        docs, shops = catalog.live_docs(db, codes[SHOP.name])
        values = {SHOP.name: (docs, shops)} | {
            field.name: catalog.field_values(db, field, codes.get(field.name)) for field in declared}
        segments = tuple(reuse.get(info.name) or Segment(directory, info, require_sums) for info in infos)
        live, live_count, columns = {}, {}, {}
        for seg in segments:
            live[seg.info.name], live_count[seg.info.name] = bitmap(seg, docs)
            columns[seg.info.name] = {name: column(seg, *pairs) for name, pairs in values.items()}
        return cls(generation, next_doc, segments, live, live_count, columns, declared, codes)

    def after(self, change: dict, generation: int, added: dict[str, Segment]) -> "Snapshot":
        """The snapshot after one commit's change: the bitmaps of segments that lost docs are copied, a
        commit's own segment gets its columns from the change, a merged one from the columns of the
        segments it replaces (its docs are live as they are in those: docs that died while the merge
        was built stay dead)."""
        dead = np.array(sorted(doc for doc, _ in change["dead"]), np.int64)
        removed = set(change["segments_removed"])
        live, live_count, columns = dict(self.live), dict(self.live_count), dict(self.columns)
        for seg in self.segments if len(dead) else ():
            _, positions = seg.locate(dead)
            if len(positions):
                bits = live[seg.info.name].copy()
                np.bitwise_and.at(bits, positions >> 3, ~(1 << (positions & 7)).astype(np.uint8))
                live[seg.info.name], live_count[seg.info.name] = bits, live_count[seg.info.name] - len(positions)
        merged_from = [seg for seg in self.segments if seg.info.name in removed]
        for name, _kind, count in change["segments_added"]:
            seg = added[name]
            if merged_from:
                old_ids = np.concatenate([old.ids for old in merged_from])
                order = np.argsort(old_ids, kind="stable")
                at = order[np.searchsorted(old_ids[order], seg.ids)]
                alive = np.concatenate([unpack(live[old.info.name], old.info.count) for old in merged_from])[at]
                live[name], live_count[name] = np.packbits(alive, bitorder="little"), int(alive.sum())
                columns[name] = {
                    field: column(seg, seg.ids, np.concatenate(
                        [self.columns[old.info.name][field].by_pos for old in merged_from])[at])
                    for field in self.columns[merged_from[0].info.name]}
            else:  # a commit's own segment: every doc in it is new and live
                live[name], live_count[name] = ones(count), count
                docs = np.array([doc for doc, _shop, _values in change["added"]], np.int64)
                columns[name] = {SHOP.name: column(seg, docs, numbers(SHOP, self.codes[SHOP.name], (
                    shop for _doc, shop, _values in change["added"])))} | {
                    field.name: column(seg, docs, numbers(field, self.codes.get(field.name), (
                        typed(field, values.get(field.name)) for _doc, _shop, values in change["added"])))
                    for field in self.declared}
        for name in removed:
            live.pop(name, None)
            live_count.pop(name, None)
            columns.pop(name, None)
        next_doc = self.next_doc if change["next_doc"] is None else change["next_doc"]
        segments = tuple(seg for seg in self.segments if seg.info.name not in removed) + tuple(
            added[name] for name, _kind, _count in change["segments_added"])
        return Snapshot(generation, next_doc, segments, live, live_count, columns, self.declared, self.codes)

    # Reads --------------------------------------------------------------------------------
    @functools.cached_property
    def fields(self) -> dict[str, FieldIndex]:
        """Filterable attribute → its index over this snapshot (search.fields)."""
        return {field.name: self._index(field) for field in self.declared}

    @functools.cached_property
    def shops(self) -> FieldIndex:
        return self._index(SHOP)

    def _index(self, field: Field) -> FieldIndex:
        return FieldIndex(field, tuple((seg, self.columns[seg.info.name][field.name], self.live[seg.info.name])
                                       for seg in self.segments), self.codes.get(field.name))

    def shop_docs(self, shop: str) -> np.ndarray:
        """A shop's live docs, sorted (in proportion to them)."""
        return self.shops.equal(shop)

    @property
    def live_docs(self) -> int:
        return sum(self.live_count.values())

    def vectors_of(self, docs, dim: int) -> np.ndarray:
        """The stored vectors of `docs` (rows of zeros for docs the snapshot does not hold)."""
        docs = np.asarray(docs, np.int64)
        out = np.zeros((len(docs), dim), np.float32)
        for seg in self.segments:
            found, positions = seg.locate(docs)
            if len(positions):
                out[found] = seg.vectors[positions]
        return out

    def live_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids, vectors) of every live doc, for exact-search baselines and recall."""
        ids, vectors = [], []
        for seg in self.segments:
            keep = unpack(self.live[seg.info.name], seg.info.count)
            ids.append(seg.ids[keep])
            vectors.append(seg.vectors[keep])
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate(ids), np.concatenate(vectors)
