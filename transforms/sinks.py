"""Sinks for local runs: records and dead letters as JSON lines (DESIGN §4, §5).

Serialising is the step that can fail (a non-finite float, say); those failures come back
as dead letters with stage `sink` instead of failing the bundle.
"""

from __future__ import annotations

import apache_beam as beam

from schemas import Stage
from transforms.dead_letter import from_beam_failure

__all__ = ["WriteJsonLines"]


def _to_json(item) -> str:
    return item.to_json()


class WriteJsonLines(beam.PTransform):
    """Writes `item.to_json()` lines under `path_prefix`; returns the dead letters of what it could not."""

    def __init__(self, path_prefix: str, num_shards: int = 0):
        super().__init__()
        self._path_prefix = path_prefix
        self._num_shards = num_shards

    def expand(self, items):
        lines, failed = items | "ToJson" >> beam.Map(_to_json).with_exception_handling()
        _ = lines | "Write" >> beam.io.WriteToText(
            self._path_prefix, file_name_suffix=".jsonl", num_shards=self._num_shards
        )
        return failed | "SinkFailures" >> beam.FlatMap(lambda failure: from_beam_failure(Stage.SINK, failure))
