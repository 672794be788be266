"""The BigQuery sink against bqemulator: schema from the contract, rows written, rejected rows kept."""

from __future__ import annotations

import datetime as dt
import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from schemas import DeadLetter, EmbeddingRecord, bigquery_schema
from transforms.bigquery import EmulatorBigQueryClient, WriteToBigQueryTable, emulator_client

pytestmark = pytest.mark.emulator
WHEN = dt.datetime(2026, 11, 21, 12, tzinfo=dt.timezone.utc)


def record(n: int) -> EmbeddingRecord:
    return EmbeddingRecord(f"p{n}", "s", "upsert", n, f"e{n}", (0.6, 0.8), (1.0,), (), 1, f"t{n}",
                           "http://x/a.jpg", "m", WHEN, WHEN, description=f"d{n}",
                           attributes={"brand": f"b{n}", "price": n * 1.5, "tags": ["x", "ü"]})


class RejectingClient(EmulatorBigQueryClient):
    """The emulator for tables; rejects rows of odd versions the way BigQuery reports it."""

    def insert_rows_json(self, table, json_rows, row_ids=None, **kwargs):
        keep = [(i, row) for i, row in enumerate(json_rows) if row["version"] % 2 == 0]
        super().insert_rows_json(table, [row for _, row in keep], **kwargs)
        return [{"index": i, "errors": [{"reason": "invalid", "message": "no such field: version"}]}
                for i, row in enumerate(json_rows) if row["version"] % 2]


@pytest.fixture
def dataset(bigquery_emulator, unique_name):
    client = bigquery.Client(project="test-project", credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": bigquery_emulator.endpoint})
    name = unique_name("ds").replace("-", "_")
    client.create_dataset(name)
    return client, name


def test_the_schema_is_derived_from_the_contract():
    fields = {f["name"]: (f["type"], f["mode"]) for f in bigquery_schema(EmbeddingRecord)["fields"]}
    assert fields["embedding"] == ("FLOAT", "REPEATED")
    assert fields["version"] == ("INTEGER", "REQUIRED")
    assert fields["embedded_at"] == ("TIMESTAMP", "REQUIRED")
    assert [f["name"] for f in bigquery_schema(DeadLetter)["fields"]][:3] == ["stage", "error_type", "error"]


def test_the_emulator_env_var_selects_the_emulator_client(monkeypatch):
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", "127.0.0.1:9050")
    client = emulator_client("my-project:ds.table")
    assert client.endpoint == "http://127.0.0.1:9050" and client.project == "my-project"
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST")
    assert emulator_client("my-project:ds.table") is None


def test_records_are_written_and_rejected_rows_become_sink_dead_letters(dataset, bigquery_emulator):
    client, name = dataset
    table = f"test-project:{name}.records"
    fake = RejectingClient(bigquery_emulator.endpoint, "test-project")
    with TestPipeline(runner="FnApiRunner") as p:
        letters = (p | beam.Create([1, 2, 3, 4]) | beam.Map(record)
                   | WriteToBigQueryTable(table, EmbeddingRecord, "STREAMING_INSERTS", "embedded_at", client=fake))
        assert_that(letters | beam.Map(lambda d: (d.stage, d.event_id, d.product_id, "no such field" in d.error)),
                    equal_to([("sink", "e1", "p1", True), ("sink", "e3", "p3", True)]))
    rows = list(client.query(f"SELECT event_id, embedding, description, JSON_VALUE(attributes, '$.brand') AS brand, "
                             f"attributes FROM `test-project.{name}.records` ORDER BY event_id").result())
    assert [r["event_id"] for r in rows] == ["e2", "e4"]
    assert list(rows[0]["embedding"]) == [0.6, 0.8]
    assert [(r["description"], r["brand"]) for r in rows] == [("d2", "b2"), ("d4", "b4")]
    attributes = rows[1]["attributes"]  # the JSON column, read back whole
    assert (json.loads(attributes) if isinstance(attributes, str) else attributes) == \
        {"brand": "b4", "price": 6.0, "tags": ["x", "ü"]}
