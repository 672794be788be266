"""Search replicas and the router, as a deployment runs them, on loopback: one `search.server
--shards N` process per shard and a `search.router` in front, each on a free port."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from localstack.emulator import free_port

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["SearchStack", "ServiceProcess"]


class ServiceProcess:
    """`python -m ARGS --port P` on a free loopback port, started once it logs its ready line."""

    def __init__(self, args: list[str], log: Path, timeout_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", *args, "--port", str(self.port)], cwd=ROOT,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            self.log.write(line)
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {self.process.returncode}; see {log}")
            if "search page: " in line:
                threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block it
                return
        self.stop()
        raise RuntimeError(f"{args[0]} did not start within {timeout_s:g} s; see {log}")

    def _drain(self):
        for line in self.process.stderr:
            self.log.write(line)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class SearchStack:
    """`with SearchStack(index_dir, 2, log_dir) as stack:` then query `stack.url` (the router)."""

    def __init__(self, index_dir: Path, num_shards: int, log_dir: Path, timeout_s: float = 180):
        self.index_dir, self.num_shards, self.log_dir, self.timeout_s = index_dir, num_shards, log_dir, timeout_s
        self._processes: list[ServiceProcess] = []
        self.url = ""

    def __enter__(self) -> "SearchStack":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            replicas = [ServiceProcess(["search.server", "--index_dir", str(self.index_dir), "--shards", str(n),
                                  "--device", "cpu"], self.log_dir / f"search-shard-{n}.log", self.timeout_s)
                        for n in range(self.num_shards)]
            self._processes += replicas
            router = ServiceProcess(["search.router", "--backends", ",".join(r.url for r in replicas)],
                              self.log_dir / "search-router.log", self.timeout_s)
            self._processes.append(router)
        except BaseException:
            self.__exit__()
            raise
        self.url = router.url
        return self

    def __exit__(self, *_):
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()
