"""Running a local emulator as a child process: free loopback port, readiness wait, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Emulator", "EmulatorProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatorProcess:
    """Starts `command` in its own process group and waits until `ready()` is true."""

    def __init__(self, name: str, command: Sequence[str], ready: Callable[[], bool], log_path: Path,
                 timeout_s: float = 60.0, env: dict[str, str] | None = None):
        self.name = name
        self._command = list(command)
        self._ready = ready
        self._log_path = log_path
        self._timeout_s = timeout_s
        self._env = {**os.environ, **(env or {})}
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self._log_path, "wb")
        self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self._env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}; see {self._log_path}:\n"
                                   + self._log_path.read_text(errors="replace")[-2000:])
            if self._ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {self._timeout_s}s; see {self._log_path}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        except ProcessLookupError:
            pass


class Emulator:
    """Start/stop and context management for an emulator: subclasses set `_process` and `env()`.

    `start()` also exports `env()` into this process, so clients created afterwards find it.
    """

    _process: EmulatorProcess

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self):
        self._process.start()
        os.environ.update(self.env())
        return self

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
