"""Product state: written by the embed pipeline, read back and folded by the re-embed backfill
(docs/ARCHITECTURE.md §6).

Every accepted event leaves one `ProductState` row (JSON lines in files mode, the `product_state`
BigQuery table with `--state_table`). A product's current state is its newest upsert or delete by
version, with the attributes of a newer patch over it: `latest_state` is that fold in Python, and
`LATEST_STATE_VIEW` the same in BigQuery SQL (one row per product, for people and for the backfill).
"""

from __future__ import annotations

import dataclasses
import glob
import json

import apache_beam as beam
from apache_beam.coders import BytesCoder

from schemas import DeadLetter, ProductState, Stage
from transforms.events import ids_in_text, readable_id

__all__ = ["LATEST_STATE_VIEW", "LatestStates", "ReadProductState", "latest_state"]

# `bq query --use_legacy_sql=false` with {table} and {view} filled in (deploy.sh infra makes it).
LATEST_STATE_VIEW = """CREATE OR REPLACE VIEW `{view}` AS
WITH content AS (
  SELECT * FROM `{table}` WHERE op != 'patch'
  QUALIFY ROW_NUMBER() OVER (PARTITION BY product_id ORDER BY version DESC, recorded_at DESC) = 1
), patch AS (
  SELECT product_id, version, attributes FROM `{table}` WHERE op = 'patch'
  QUALIFY ROW_NUMBER() OVER (PARTITION BY product_id ORDER BY version DESC, recorded_at DESC) = 1
)
SELECT c.* REPLACE (IF(p.version > c.version, p.attributes, c.attributes) AS attributes,
                    GREATEST(c.version, IFNULL(p.version, c.version)) AS version)
FROM content AS c LEFT JOIN patch AS p USING (product_id)
"""


def _newer(a: ProductState | None, b: ProductState | None) -> ProductState | None:
    if a is None or b is None:
        return a or b
    return b if (b.version, b.recorded_at) > (a.version, a.recorded_at) else a


def latest_state(rows) -> ProductState | None:
    """A product's rows (any order, repeats allowed) → its current state; None when it has no content
    (patches only: as the index refuses them) or its newest content is a delete. The fold LatestStates
    runs on the workers, run here in one piece."""
    fn = _LatestStateFn()
    accumulator = fn.create_accumulator()
    for row in rows:
        accumulator = fn.add_input(accumulator, row)
    return fn.extract_output(accumulator)


def _resolve(content: ProductState | None, patch: ProductState | None) -> ProductState | None:
    if content is None or content.op == "delete":
        return None
    if patch is None or patch.version <= content.version:
        return content
    return dataclasses.replace(content, attributes=dict(patch.attributes), version=patch.version)


class _LatestStateFn(beam.CombineFn):
    """`latest_state` as a combiner: (newest content, newest patch) per product, merged across workers."""

    def create_accumulator(self):
        return None, None

    def add_input(self, accumulator, row):
        content, patch = accumulator
        return (content, _newer(patch, row)) if row.op == "patch" else (_newer(content, row), patch)

    def merge_accumulators(self, accumulators):
        content = patch = None
        for c, p in accumulators:
            content, patch = _newer(content, c), _newer(patch, p)
        return content, patch

    def extract_output(self, accumulator):
        return _resolve(*accumulator)


class LatestStates(beam.PTransform):
    """State rows → the current state of every live product (deleted and patch-only products dropped)."""

    def expand(self, rows):
        return (rows
                | "ByProduct" >> beam.Map(lambda row: (row.product_id, row))
                | "Latest" >> beam.CombinePerKey(_LatestStateFn())
                | "Live" >> beam.FlatMap(lambda kv: [kv[1]] if kv[1] is not None else []))


def _parse_line(line: bytes) -> ProductState:
    return ProductState.from_dict(json.loads(line))


def _unreadable(failure: tuple) -> DeadLetter:
    """A state row (a table's dict or a file's line) that is no `ProductState` → its dead letter, with the
    ids that can be read from it, so that the product it names can be found."""
    row, (error_type, error, _traceback) = failure
    if isinstance(row, dict):
        ids = {name: readable_id(row.get(name)) for name in ("event_id", "product_id")}
        row = json.dumps(row, default=str, ensure_ascii=False)
    else:
        ids = ids_in_text(row)
    return DeadLetter.of_payload(Stage.PARSE, getattr(error_type, "__name__", str(error_type)), error, row, **ids)


class ReadProductState(beam.PTransform):
    """`bigquery:P:DATASET.TABLE` (the table or its view) or a directory of JSON lines → (state rows,
    dead letters of rows that cannot be read)."""

    def __init__(self, source: str):
        super().__init__()
        self._source = source

    def expand(self, p):
        if self._source.startswith("bigquery:"):
            rows = p | "ReadTable" >> beam.io.ReadFromBigQuery(
                table=self._source.removeprefix("bigquery:"), method=beam.io.ReadFromBigQuery.Method.DIRECT_READ)
            states, failed = rows | "ToState" >> beam.Map(ProductState.from_dict).with_exception_handling()
        else:
            # Bytes, not text: a line that is not UTF-8 is a dead letter, not a failed read of the whole file.
            lines = p | "ReadFiles" >> beam.io.ReadFromText(f"{glob.escape(self._source.rstrip('/'))}/*.jsonl", validate=False,
                                                            coder=BytesCoder())
            rows = lines | "SkipBlank" >> beam.Filter(lambda line: bool(line.strip()))
            states, failed = rows | "ToState" >> beam.Map(_parse_line).with_exception_handling()
        return states, failed | "Unreadable" >> beam.Map(_unreadable)
