"""Filterable attributes: which an index declares, and their per-field indexes, kept at commit.

An index declares its filterable fields once (`--filterable brand,category,price:float,in_stock:bool`,
recorded in `index.json` and the store). Per field a view holds:
- the live docs sorted by value (`values`, `docs`): an equality, `in` or range filter is a slice of
  them, so it costs in proportion to what it matches, never to the shard;
- each doc's value by doc id (`by_doc`), for facets: counting a query's matches by value reads only
  those matches. A doc never changes (an update is a new doc), so this array is append-only and
  shared between views; a view reads only doc ids below its own `next_doc`.
Keyword values are coded as numbers in order of first sight (`Codes`, also append-only).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import unicodedata
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["Codes", "Field", "FieldIndex", "FIELD_TYPES", "parse_filterable", "typed"]

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
class FieldIndex:
    field: Field
    values: np.ndarray  # float64, the live docs' values (keywords as codes), sorted
    docs: np.ndarray  # int64, the doc of each value
    by_doc: np.ndarray  # float64 by doc id, NaN where a doc has no value; shared, append-only
    codes: Codes | None = None  # keyword fields only

    @classmethod
    def build(cls, field: Field, docs: Iterable[int], raw: Iterable[Any], next_doc: int) -> "FieldIndex":
        """From (doc, typed value) pairs of live docs."""
        codes = Codes() if field.type == "keyword" else None
        index = cls(field, np.zeros(0), np.zeros(0, np.int64), np.full(max(next_doc, 1024), np.nan), codes)
        return index.changed(np.zeros(0, np.int64), dict(zip(docs, raw)), next_doc)

    def number(self, value: Any) -> float:
        """A typed value as stored (keywords by their code, made if new)."""
        return float(self.codes.code(value)) if self.codes is not None else float(value)

    def changed(self, dead: np.ndarray, added: Mapping[int, Any], next_doc: int) -> "FieldIndex":
        """The index after a commit: `dead` docs (sorted) leave, `added` {doc: typed value} join."""
        by_doc = self.by_doc
        if next_doc > len(by_doc):  # grown by doubling: a copy now and then, not per commit
            by_doc = np.full(max(next_doc, 2 * len(by_doc)), np.nan)
            by_doc[:len(self.by_doc)] = self.by_doc
        new = {doc: self.number(value) for doc, value in added.items() if value is not None}
        add_docs = np.fromiter(new.keys(), np.int64, len(new))
        add_values = np.fromiter(new.values(), np.float64, len(new))
        by_doc[add_docs] = add_values  # above any view's next_doc
        values, docs_sorted = self.values, self.docs
        if len(dead):
            gone = np.isin(docs_sorted, dead)
            if gone.any():
                values, docs_sorted = values[~gone], docs_sorted[~gone]
        if new:
            # Only the new pairs are sorted, then put in place: a copy of the arrays, not a sort of them.
            # New doc ids are above every existing one, so among equal values they go last.
            order = np.lexsort((add_docs, add_values))
            at = np.searchsorted(values, add_values[order], side="right")
            values = np.insert(values, at, add_values[order])
            docs_sorted = np.insert(docs_sorted, at, add_docs[order])
        return dataclasses.replace(self, values=values, docs=docs_sorted, by_doc=by_doc)

    # Reads ------------------------------------------------------------------------------
    def between(self, low: float = -np.inf, high: float = np.inf, low_open: bool = False,
                high_open: bool = False) -> np.ndarray:
        """The docs (sorted) whose value is in the range."""
        start = np.searchsorted(self.values, low, side="right" if low_open else "left")
        end = np.searchsorted(self.values, high, side="left" if high_open else "right")
        return np.sort(self.docs[start:end]) if end > start else np.zeros(0, np.int64)

    def equal(self, value: Any) -> np.ndarray:
        if self.codes is not None:
            code = self.codes.find(value)
            if code is None:
                return np.zeros(0, np.int64)
            value = code
        return self.between(float(value), float(value))

    def label(self, number: float) -> Any:
        """A stored number back as the field's value."""
        if self.codes is not None:
            return self.codes.values[int(number)]
        if self.field.type == "bool":
            return bool(number)
        return int(number) if self.field.type == "int" else float(number)

    def counts(self, docs: np.ndarray | None) -> dict[Any, int]:
        """Value → how many of `docs` (None: every live doc) have it."""
        values = self.values if docs is None else self.by_doc[docs]
        values = values[~np.isnan(values)]
        distinct, counts = np.unique(values, return_counts=True)
        return {self.label(v): int(c) for v, c in zip(distinct, counts)}

    def histogram(self, docs: np.ndarray | None, edges: list[float]) -> list[int]:
        """How many of `docs` fall in each [edges[i], edges[i+1]) (the last bucket closed)."""
        values = self.values if docs is None else self.by_doc[docs]
        values = values[~np.isnan(values)]
        return [int(c) for c in np.histogram(values, bins=np.asarray(edges, np.float64))[0]]
