"""Writes the BigQuery table schemas as `bq mk --schema` JSON, from the contracts in schemas.py.

    python -m deploy.bigquery_schemas OUT_DIR   # product_embeddings.json, dead_letter.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas import DeadLetter, EmbeddingRecord, bigquery_schema

TABLES = {"product_embeddings": EmbeddingRecord, "dead_letter": DeadLetter}


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, contract in TABLES.items():
        (out / f"{name}.json").write_text(json.dumps(bigquery_schema(contract)["fields"], indent=2) + "\n")


if __name__ == "__main__":
    main()
