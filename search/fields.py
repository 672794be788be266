"""Filterable attributes: which an index declares, and their per-field indexes, kept per segment.

An index declares its filterable fields once (`--filterable brand,category,price:float,in_stock:bool`,
recorded in `index.json` and the store). As Lucene keeps doc values, each segment holds a `Column` per
field, built once with the segment and never changed:
- its docs' values by position (`by_pos`), for facets: counting a query's matches by value reads only
  those matches;
- its positions sorted by value (`order`, `sorted`): an equality, `in` or range filter is a slice of
  them, read through the view's liveness bitmap, so it costs in proportion to what it matches.
A commit builds the columns of its own segment and nothing else; a merge builds the merged segment's
from the columns it replaces. So a commit costs in proportion to the commit, and memory follows the
docs the segments hold (live ones and tombstones not yet merged away), not every doc id ever written.
Keyword values are coded as numbers in order of first sight (`Codes`, append-only, one per field).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import unicodedata
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

__all__ = ["SHOP", "Codes", "Column", "Field", "FieldIndex", "FIELD_TYPES", "live_at", "numbers", "parse_filterable", "typed"]

FIELD_TYPES = ("keyword", "float", "int", "bool")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
RESERVED = ("shop_id",)  # filtered through the shop postings every index has


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: str = "keyword"

    def __str__(self) -> str:
        return self.name if self.type == "keyword" else f"{self.name}:{self.type}"

    @property
    def numeric(self) -> bool:
        return self.type in ("float", "int")


SHOP = Field("shop_id", "keyword")  # every index's built-in field: its shops


def parse_filterable(text: str | Iterable[str]) -> tuple[Field, ...]:
    """`brand,category,price:float,in_stock:bool` → Fields; ValueError naming what is wrong."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    fields, seen = [], set()
    for part in parts:
        name, _, kind = part.partition(":")
        kind = kind or "keyword"
        if not NAME.match(name):
            raise ValueError(f"filterable field {name!r}: a name is letters, digits and _ (at most 64)")
        if name in RESERVED:
            raise ValueError(f"filterable field {name!r} is built in: every index filters by shop")
        if kind not in FIELD_TYPES:
            raise ValueError(f"filterable field {name!r}: type {kind!r} is not one of {', '.join(FIELD_TYPES)}")
        if name in seen:
            raise ValueError(f"filterable field {name!r} is declared twice")
        seen.add(name)
        fields.append(Field(name, kind))
    return tuple(fields)


def typed(field: Field, value: Any) -> Any:
    """The attribute's value as the field's type, or None when it is absent or of another type (it is
    kept with the product, but neither filtered nor counted)."""
    if field.type == "keyword":
        # NFC: "café" typed as one code point or as e + a combining accent is one value, as keyword
        # search (FTS5's unicode61) already treats it.
        return unicodedata.normalize("NFC", value) if isinstance(value, str) else None
    if field.type == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits: no field holds it
        return None
    if field.type == "int":
        return int(value) if number.is_integer() and abs(value) < 2 ** 53 else None
    return number if np.isfinite(number) else None


class Codes:
    """Keyword value ↔ number, append-only (shared by every view of a store)."""

    def __init__(self):
        self.values: list[str] = []
        self._code: dict[str, int] = {}
        self._lock = threading.Lock()

    def code(self, value: str) -> int:
        with self._lock:
            if value not in self._code:
                self._code[value] = len(self.values)
                self.values.append(value)
            return self._code[value]

    def find(self, value: str) -> int | None:
        return self._code.get(value)


@dataclasses.dataclass(frozen=True)
class Column:
    """One field's values in one segment, by position: built once with the segment and never changed
    (a doc never changes: an update is a new doc in a new segment), as Lucene keeps doc values per
    segment. A commit writes no column but its own segment's; which docs are live is the view's."""

    by_pos: np.ndarray  # float64 by position in the segment, NaN where the doc has no value
    order: np.ndarray  # int32 positions holding a value, by (value, position)
    sorted: np.ndarray  # float64, by_pos[order]

    @classmethod
    def at(cls, count: int, positions: np.ndarray, numbers: np.ndarray) -> "Column":
        """The column of a segment of `count` docs whose docs at `positions` hold `numbers`."""
        by_pos = np.full(count, np.nan)
        by_pos[positions] = numbers
        has = np.flatnonzero(~np.isnan(by_pos)).astype(np.int32)
        order = has[np.argsort(by_pos[has], kind="stable")]
        return cls(by_pos, order, by_pos[order])


class Part(Protocol):
    """What a field index reads of a segment (search.segment.Segment)."""

    ids: np.ndarray

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def numbers(field: Field, codes: Codes | None, values: Iterable[Any]) -> np.ndarray:
    """Typed values as a column stores them (keywords by their code, made if new; None as NaN)."""
    def number(value):
        if value is None:
            return np.nan
        return float(codes.code(value)) if codes is not None else float(value)
    return np.fromiter((number(v) for v in values), np.float64)


def live_at(bits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Whether each position is set in a packed (little bit order) liveness bitmap."""
    return ((bits[positions >> 3] >> (positions & 7).astype(np.uint8)) & 1).astype(bool)


@dataclasses.dataclass(frozen=True)
class FieldIndex:
    """A field over one view of the store: each segment's column, read through the view's liveness.
    Made per view in O(segments); reads cost in proportion to what they match, never to the shard."""

    field: Field
    parts: tuple[tuple[Part, Column, np.ndarray], ...]  # (segment, its column, its liveness bitmap)
    codes: Codes | None = None  # keyword fields only

    # Reads ------------------------------------------------------------------------------
    def between(self, low: float = -np.inf, high: float = np.inf, low_open: bool = False,
                high_open: bool = False) -> np.ndarray:
        """The live docs (sorted) whose value is in the range."""
        out = []
        for seg, column, bits in self.parts:
            start = np.searchsorted(column.sorted, low, side="right" if low_open else "left")
            end = np.searchsorted(column.sorted, high, side="left" if high_open else "right")
            if end > start:
                positions = column.order[start:end]
                out.append(seg.ids[positions[live_at(bits, positions)]])
        return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def equal(self, value: Any) -> np.ndarray:
        if self.codes is not None:
            code = self.codes.find(value)
            if code is None:
                return np.zeros(0, np.int64)
            value = code
        return self.between(float(value), float(value))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, docs) of every live doc holding a value."""
        values, docs = [], []
        for seg, column, bits in self.parts:
            positions = column.order[live_at(bits, column.order)]
            values.append(column.by_pos[positions])
            docs.append(seg.ids[positions])
        if not values:
            return np.zeros(0), np.zeros(0, np.int64)
        return np.concatenate(values), np.concatenate(docs)

    def label(self, number: float) -> Any:
        """A stored number back as the field's value."""
        if self.codes is not None:
            return self.codes.values[int(number)]
        if self.field.type == "bool":
            return bool(number)
        return int(number) if self.field.type == "int" else float(number)

    def _values(self, positions: Sequence[np.ndarray] | None) -> np.ndarray:
        """The values at `positions` (live docs' positions, a list per part; None: every live doc),
        those without one left out."""
        if positions is None:
            return self.items()[0]
        out = [column.by_pos[where] for (_seg, column, _bits), where in zip(self.parts, positions)]
        values = np.concatenate(out) if out else np.zeros(0)
        return values[~np.isnan(values)]

    def counts(self, positions: Sequence[np.ndarray] | None) -> dict[Any, int]:
        """Value → how many of the docs at `positions` (per part, as `Part.locate` gives them; None:
        every live doc) have it."""
        distinct, counts = np.unique(self._values(positions), return_counts=True)
        return {self.label(v): int(c) for v, c in zip(distinct, counts)}

    def histogram(self, positions: Sequence[np.ndarray] | None, edges: list[float]) -> list[int]:
        """How many of the docs at `positions` fall in each [edges[i], edges[i+1]) (the last bucket closed)."""
        values = self._values(positions)
        return [int(c) for c in np.histogram(values, bins=np.asarray(edges, np.float64))[0]]
