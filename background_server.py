"""Runs an ASGI app (the search service) with uvicorn on a thread, on a free loopback port.

A module of its own, beneath localstack/ and evaluation/ (docs/ARCHITECTURE.md §2): the demo serves
its index with it, the evaluation scores judged queries against a service it starts on `--index_dir`,
the tests serve their indexes with it, and neither of the first two may import the other.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` at `server.url` until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1"):
        # bound here, so the port is ours: no window in which another process can take it
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((host, 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="search-server", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._socket.close()
                raise RuntimeError("the search server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
