"""Serialising for sinks, and the JSON-lines sink of local runs (docs/ARCHITECTURE.md §4, §5).

Serialising is the step that can fail (a non-finite float, say); `Serialize` turns those
failures into dead letters with stage `sink` instead of failing, and in streaming endlessly
retrying, the bundle.
"""

from __future__ import annotations

from typing import Callable

import apache_beam as beam

from schemas import Stage
from transforms.dead_letter import from_beam_failure

__all__ = ["Serialize", "WriteJsonLines"]


class Serialize(beam.PTransform):
    """items → (`fn(item)` for each item that serialises, dead letters of the rest)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self._fn = fn

    def expand(self, items):
        serialized, failed = items | "Serialize" >> beam.Map(self._fn).with_exception_handling()
        return serialized, failed | "SinkFailures" >> beam.FlatMap(lambda f: from_beam_failure(Stage.SINK, f))


def _to_json(item) -> str:
    return item.to_json()


class WriteJsonLines(beam.PTransform):
    """Writes `item.to_json()` lines under `path_prefix`; returns the dead letters of what it could not."""

    def __init__(self, path_prefix: str, num_shards: int = 0):
        super().__init__()
        self._path_prefix = path_prefix
        self._num_shards = num_shards

    def expand(self, items):
        lines, dead_letters = items | "ToJson" >> Serialize(_to_json)
        _ = lines | "Write" >> beam.io.WriteToText(
            self._path_prefix, file_name_suffix=".jsonl", num_shards=self._num_shards
        )
        return dead_letters
