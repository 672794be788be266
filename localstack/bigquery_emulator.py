"""`bqemulator` (PyPI, DuckDB-backed BigQuery REST API) on 127.0.0.1, and clients for it.

Out of the box bqemulator insists on downloading DuckDB's spatial extension and exits when
it can't (no network here); `python -m localstack.bigquery_emulator start ...` runs its CLI
with that loader replaced by a no-op. Only GEOGRAPHY is lost, which this product never uses.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from localstack.emulator import Emulator, EmulatorProcess, free_port

__all__ = ["BigQueryEmulator"]


class BigQueryEmulator(Emulator):
    def __init__(self, project: str = "test-project", log_dir: Path | None = None):
        self.project = project
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bq-emulator-"))
        self._process = EmulatorProcess(
            "bqemulator",
            [sys.executable, "-m", "localstack.bigquery_emulator", "start", "--rest-host", "127.0.0.1",
             "--rest-port", str(self.port), "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
             "--project", project, "--ephemeral", "--log-level", "warning"],
            ready=self._ready,
            log_path=log_dir / "bqemulator.log",
        )

    def _ready(self) -> bool:
        try:
            url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/datasets"
            with urllib.request.urlopen(url, timeout=1) as response:
                json.load(response)
                return True
        except (OSError, ValueError):
            return False

    def env(self) -> dict[str, str]:
        return {"BIGQUERY_EMULATOR_HOST": self.endpoint}



def _main() -> None:
    from bqemulator.cli import main
    from bqemulator.storage.engine import DuckDBEngine

    DuckDBEngine._load_spatial = lambda self: None
    main()


if __name__ == "__main__":
    _main()
