"""Writes the BigQuery table schemas as `bq mk --schema` JSON, from the contracts in schemas.py.

    python -m deploy.bigquery_schemas OUT_DIR [PROJECT:DATASET]
        # product_embeddings.json, dead_letter.json, product_state.json; with a dataset also
        # product_state_latest.sql, the view of each product's current state
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas import DeadLetter, EmbeddingRecord, ProductState, bigquery_schema
from transforms.product_state import LATEST_STATE_VIEW

TABLES = {"product_embeddings": EmbeddingRecord, "dead_letter": DeadLetter, "product_state": ProductState}


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, contract in TABLES.items():
        (out / f"{name}.json").write_text(json.dumps(bigquery_schema(contract)["fields"], indent=2) + "\n")
    if len(args) > 1:
        dataset = args[1].replace(":", ".")
        (out / "product_state_latest.sql").write_text(LATEST_STATE_VIEW.format(
            table=f"{dataset}.product_state", view=f"{dataset}.product_state_latest"))


if __name__ == "__main__":
    main()
