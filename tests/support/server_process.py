"""`python -m search.server` as a user starts it: a subprocess on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from localstack.emulator import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m search.server` (or `module`) on a free loopback port; waits for its ready line."""

    def __init__(self, index_dir: Path | None, *extra: str, module: str = "search.server", ready_secs: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        where = ["--index_dir", str(index_dir)] if index_dir is not None else []
        self.process = subprocess.Popen([sys.executable, "-m", module, *where, "--port", str(self.port), *extra],
                                        cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.ready_line = ""
        deadline = time.monotonic() + ready_secs
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"{module} exited with {self.process.returncode}")
            if "search page: " in line:
                self.ready_line = line.strip()
                # Keep reading what it logs, so a full pipe never blocks it.
                self.log: list[str] = []
                threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
                return
        raise RuntimeError(f"{module} did not log its ready line")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
