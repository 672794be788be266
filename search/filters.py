"""Attribute filters: checked against an index's declared fields, evaluated to a set of live docs.

    {"brand": "acme"}                               equality (keyword, bool, numbers)
    {"category": {"in": ["dress", "coat"]}}         one of
    {"price": {"gte": 10, "lt": 50}}                a range (gt, gte, lt, lte; also eq, in)
    {"in_stock": true, "brand": "acme"}             several keys: all of them
    {"or": [{...}, {...}]}, {"and": [...]}          combinations, nested up to MAX_FILTER_NESTING

`shop_id` filters like a keyword field in every index. A filter is parsed once per request into a
canonical form (its `key` caches the doc set per generation) and evaluated from the per-field
indexes over the store's snapshot (search.fields): slices of each segment's sorted column read
through its liveness, intersected and merged, so a filter costs in proportion to the docs it
matches, not to the shard.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from schemas import valid_unicode
from search.fields import SHOP, Field, FieldIndex, typed

__all__ = ["Filter", "FilterError", "MAX_CLAUSES", "MAX_FILTER_NESTING", "parse_filter"]

MAX_FILTER_NESTING = 8
MAX_CLAUSES = 256  # conditions and `in` values together
RANGE_OPS = ("gt", "gte", "lt", "lte")
OPS = ("eq", "in") + RANGE_OPS


class FilterError(ValueError):
    """A filter that does not fit the index's fields; the message names the field (a 400)."""


class Filter:
    """A parsed filter: `tree` is canonical (nested ("and"|"or", [...]) and (field, op, value))."""

    def __init__(self, tree: tuple):
        self.tree = tree
        self.key = json.dumps(tree, sort_keys=True)

    def evaluate(self, indexes: Mapping[str, FieldIndex], shop_docs: Callable[[str], np.ndarray]) -> np.ndarray:
        """The sorted live docs that pass; `shop_docs(shop)` gives a shop's postings."""
        return _evaluate(self.tree, indexes, shop_docs)


def parse_filter(data: Any, fields: tuple[Field, ...]) -> Filter:
    """Checks `data` against the declared `fields`; FilterError naming the field when it does not fit."""
    by_name = {f.name: f for f in fields} | {SHOP.name: SHOP}
    budget = [MAX_CLAUSES]

    def spend(n: int, where: str) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise FilterError(f"{where}: the filter has over {MAX_CLAUSES} conditions")

    def node(value: Any, where: str, depth: int) -> tuple:
        if depth > MAX_FILTER_NESTING:
            raise FilterError(f"{where}: nested deeper than {MAX_FILTER_NESTING} levels")
        if not isinstance(value, dict) or not value:
            raise FilterError(f"{where}: a filter is a non-empty object of field conditions, 'and' or 'or'")
        parts = []
        for name, condition in value.items():
            if name in ("and", "or"):
                if not isinstance(condition, list) or not condition:
                    raise FilterError(f"{where}.{name}: give a non-empty list of filters")
                parts.append((name, [node(c, f"{where}.{name}[{i}]", depth + 1) for i, c in enumerate(condition)]))
            elif name in by_name:
                parts.append(clause(by_name[name], condition, f"{where}.{name}"))
            else:
                raise FilterError(f"{where}.{name}: not a filterable field of this index (filterable: "
                                  f"{', '.join(sorted(by_name))})")
        return parts[0] if len(parts) == 1 else ("and", sorted(parts, key=json.dumps))

    def clause(field: Field, condition: Any, where: str) -> tuple:
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        if not condition:
            raise FilterError(f"{where}: an empty condition")
        parts = []
        for op, operand in condition.items():
            if op not in OPS:
                raise FilterError(f"{where}: unknown operator {op!r} (use {', '.join(OPS)})")
            if op in RANGE_OPS and not field.numeric:
                raise FilterError(f"{where}: {op} needs a numeric field; {field.name} is {field.type}")
            if op == "in":
                if not isinstance(operand, list) or not operand:
                    raise FilterError(f"{where}.in: give a non-empty list of values")
                spend(len(operand), where)
                values = sorted({value(field, v, f"{where}.in") for v in operand}, key=json.dumps)
                parts.append((field.name, "in", values))
            else:
                spend(1, where)
                parts.append((field.name, op, value(field, operand, f"{where}.{op}")))
        return parts[0] if len(parts) == 1 else ("and", sorted(parts, key=json.dumps))

    def value(field: Field, raw: Any, where: str) -> Any:
        if isinstance(raw, str) and not valid_unicode(raw):  # JSON allows "\ud800"; no engine stores it
            raise FilterError(f"{where}: not valid Unicode (it holds a lone surrogate)")
        checked = typed(Field(field.name, "float") if field.numeric else field, raw)
        if checked is None:
            expected = {"keyword": "a string", "bool": "true or false"}.get(field.type, "a number")
            raise FilterError(f"{where}: {json.dumps(raw)[:80]} is not {expected} ({field.name} is {field.type})")
        return checked

    return Filter(node(data, "filter", 1))


def _evaluate(tree: tuple, indexes: Mapping[str, FieldIndex], shop_docs) -> np.ndarray:
    if tree[0] in ("and", "or"):
        sets = [_evaluate(child, indexes, shop_docs) for child in tree[1]]
        if tree[0] == "and":
            sets.sort(key=len)  # the smallest first: each intersection costs at most that much
            out = sets[0]
            for other in sets[1:]:
                out = np.intersect1d(out, other, assume_unique=True)
            return out
        return np.unique(np.concatenate(sets)) if sets else np.zeros(0, np.int64)
    name, op, operand = tree
    if name == SHOP.name:
        shops = operand if op == "in" else [operand]
        return np.unique(np.concatenate([shop_docs(s) for s in shops])) if len(shops) > 1 else shop_docs(shops[0])
    index = indexes[name]
    if op == "eq":
        return index.equal(operand)
    if op == "in":
        return np.unique(np.concatenate([index.equal(v) for v in operand]))
    bounds = {"gt": dict(low=operand, low_open=True), "gte": dict(low=operand),
              "lt": dict(high=operand, high_open=True), "lte": dict(high=operand)}[op]
    return index.between(**bounds)
