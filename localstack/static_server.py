"""A directory of images served over HTTP/1.1 from a child process, as an image host would serve them.

    python -m localstack.static_server --directory DIR --port P

Benchmarks use it instead of `python -m http.server`, which answers in HTTP/1.0 and closes every
connection: a real CDN keeps connections alive, and a new TCP connection per image (on both sides
of a 2-core machine) would be charged to the pipeline. Serving runs in its own process, so it
never holds the worker's GIL; it still shares the machine's cores.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from localstack.emulator import EmulatorProcess, free_port

__all__ = ["StaticFileServer"]


class _KeepAliveHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; SimpleHTTPRequestHandler always sends Content-Length
    # Headers and body go out in two writes: with Nagle's algorithm the body waits for the
    # client's delayed ACK (40 ms) on a kept-alive connection. CDNs set TCP_NODELAY too.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass


class StaticFileServer:
    """`with StaticFileServer(directory) as server: server.url("0.jpg")`."""

    def __init__(self, directory: Path):
        self.port = free_port()

        def ready() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1).close()
                return True
            except OSError:
                return False

        log = Path(tempfile.gettempdir()) / f"static-server-{self.port}.log"
        self._process = EmulatorProcess("static file server", [
            sys.executable, "-m", "localstack.static_server", "--directory", str(directory), "--port", str(self.port),
        ], ready, log)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> "StaticFileServer":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._process.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    handler = functools.partial(_KeepAliveHandler, directory=args.directory)
    ThreadingHTTPServer(("127.0.0.1", args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
