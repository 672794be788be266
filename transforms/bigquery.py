"""BigQuery sinks for records and dead letters (docs/ARCHITECTURE.md §4, §5), emulator-aware.

The table schema comes from the contract's dataclass (`schemas.bigquery_schema`); tables are
created if needed, day-partitioned on the record's timestamp and clustered by product_id.
Rows BigQuery rejects come back as dead letters with stage `sink`; transient errors are
retried by Beam. `BIGQUERY_EMULATOR_HOST` points the sink at an emulator, as it does for
the client library.
"""

from __future__ import annotations

import json
import os
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy

from schemas import DeadLetter, Stage, bigquery_schema

__all__ = ["EmulatorBigQueryClient", "WRITE_METHODS", "WriteToBigQueryTable", "emulator_client"]

WRITE_METHODS = ("STORAGE_WRITE_API", "STREAMING_INSERTS", "FILE_LOADS")
EMULATOR_ENV = "BIGQUERY_EMULATOR_HOST"


class EmulatorBigQueryClient:
    """What Beam's BigQuery sink needs of a client (`tables`, `datasets`, `insert_rows_json`),
    pointed at an emulator. Only the endpoint is pickled; clients are built on first use."""

    def __init__(self, endpoint: str, project: str):
        self.endpoint = endpoint.rstrip("/")
        self.project = project
        self._api = self._rows = None

    def __getstate__(self):
        return {"endpoint": self.endpoint, "project": self.project, "_api": None, "_rows": None}

    def _connect(self):
        if self._api is None:
            from apache_beam.io.gcp.internal.clients import bigquery as bigquery_v2
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import bigquery

            self._api = bigquery_v2.BigqueryV2(url=f"{self.endpoint}/bigquery/v2/", get_credentials=False,
                                               credentials=None)
            self._rows = bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                                         client_options={"api_endpoint": self.endpoint})
        return self._api

    @property
    def tables(self):
        return self._connect().tables

    @property
    def datasets(self):
        return self._connect().datasets

    @property
    def jobs(self):
        return self._connect().jobs

    def insert_rows_json(self, *args, **kwargs):
        self._connect()
        return self._rows.insert_rows_json(*args, **kwargs)


def emulator_client(table: str) -> EmulatorBigQueryClient | None:
    endpoint = os.environ.get(EMULATOR_ENV)
    if not endpoint:
        return None
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return EmulatorBigQueryClient(endpoint, table.split(":", 1)[0].split(".", 1)[0])


def _row(item) -> dict[str, Any]:
    """A contract as a BigQuery row; a JSON column's value goes as JSON text, as insertAll wants it."""
    row = item.to_dict()
    for name, value in row.items():
        if isinstance(value, dict):
            row[name] = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return row


def _rejected(contract: type, failure) -> DeadLetter:
    """Beam's failed row `(table, row, errors)` → a sink dead letter that keeps the row."""
    _table, row, errors = failure
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = errors[0].get("message") or errors[0].get("reason") or str(errors)
    else:  # the Storage Write API reports a message string
        reason = str(errors)
    return DeadLetter.of_payload(Stage.SINK, "BigQueryRowRejected", f"{contract.__name__} row rejected: {reason}",
                                 json.dumps(row, default=str), event_id=str(row.get("event_id", "")),
                                 product_id=str(row.get("product_id", "")))


class WriteToBigQueryTable(beam.PTransform):
    """Writes contract objects (records or dead letters) as rows; returns dead letters of rejected rows."""

    def __init__(self, table: str, contract: type, method: str, partition_field: str, client=None):
        """`client` replaces the one `BIGQUERY_EMULATOR_HOST` selects (tests pass fakes here)."""
        super().__init__()
        self._client = client
        if method not in WRITE_METHODS:
            raise ValueError(f"BigQuery write method must be one of {WRITE_METHODS}, got {method!r}")
        self._table = table
        self._contract = contract
        self._method = method
        self._partition_field = partition_field

    def expand(self, items):
        client = self._client or emulator_client(self._table)
        result = items | "ToRows" >> beam.Map(_row) | "Write" >> WriteToBigQuery(
            self._table,
            schema=bigquery_schema(self._contract),
            method=self._method,
            create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=BigQueryDisposition.WRITE_APPEND,
            additional_bq_parameters={
                "timePartitioning": {"type": "DAY", "field": self._partition_field},
                "clustering": {"fields": ["product_id"]},
            },
            insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
            test_client=client,
        )
        contract = self._contract
        return result.failed_rows_with_errors | "Rejected" >> beam.Map(lambda failure: _rejected(contract, failure))
