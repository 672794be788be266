"""Argparse types every CLI shares (the pipelines, the search service, the router, the gate): no Beam,
no torch, so a service imports them without the pipelines."""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["bounded", "matching"]


def bounded(kind: type, low: float, high: float, unit: str = "", low_open: bool = False, high_open: bool = False):
    """An argparse `type` that parses an int or a finite float in low..high (`low_open`/`high_open`: that
    end excluded) and refuses anything else in one line naming the range, e.g. `argument --num_shards:
    must be an integer in 1..1024, got '3000'` (argparse exits 2, as for any bad value)."""
    if kind is int:
        span = f"an integer in {low}..{high}"
    elif low_open and high_open:
        span = f"a number strictly between {low:g} and {high:g}"
    elif low_open:
        span = f"a number over {low:g}, at most {high:g}"
    elif high_open:
        span = f"a number from {low:g}, below {high:g}"
    else:
        span = f"a number in {low:g}..{high:g}"
    span += f" ({unit})" if unit and kind is not int else ""

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or not (low < value if low_open else low <= value) \
                or not (value < high if high_open else value <= high):
            raise argparse.ArgumentTypeError(f"must be {span}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def matching(pattern: str, what: str):
    """An argparse `type` that takes a value matching `pattern` and refuses anything else in one line,
    e.g. `argument --collection: must be a collection name, got 'a b'`."""
    compiled = re.compile(pattern)

    def parse(text: str) -> str:
        if not compiled.match(text):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text[:80]!r}")
        return text

    parse.__name__ = what
    return parse
