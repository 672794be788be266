"""A local HTTP server standing in for merchants' image hosts (docs/ARCHITECTURE.md §14).

Serves files from a directory and programmable routes (status codes, redirects, slow or
hanging bodies), binds to 127.0.0.1 on a free port, and records every request it gets,
so tests can prove which hosts the pipeline did and did not contact.
"""

from __future__ import annotations

import mimetypes
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

__all__ = ["ImageServer", "Route"]


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to wait before answering; the body is then sent in `chunks` pieces `drip` apart.
    delay: float = 0.0
    drip: float = 0.0
    chunks: int = 1


class ImageServer:
    def __init__(self, root: Path | None = None, host: str = "127.0.0.1"):
        self.root = Path(root) if root else None
        self.routes: dict[str, Route | Callable[[], Route]] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requested(self, path: str) -> int:
        with self._lock:
            return sum(1 for seen in self.requests if seen == "/" + path.lstrip("/"))

    def start(self) -> "ImageServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _resolve(self, path: str) -> Route:
        route = self.routes.get(path)
        if route is not None:
            return route() if callable(route) else route
        if self.root is not None:
            candidate = (self.root / path.lstrip("/")).resolve()
            if candidate.is_file() and self.root.resolve() in candidate.parents:
                content_type = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
                return Route(body=candidate.read_bytes(), headers={"Content-Type": content_type})
        return Route(status=404, body=b"not found", headers={"Content-Type": "text/plain"})

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append(path)
                route = server._resolve(path)
                time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    if "Content-Length" not in route.headers:
                        self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    step = max(1, -(-len(route.body) // max(1, route.chunks)))
                    for start in range(0, len(route.body), step):
                        self.wfile.write(route.body[start:start + step])
                        self.wfile.flush()
                        time.sleep(route.drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        return Handler
