"""Image download that a merchant's URL can't turn against the worker (docs/ARCHITECTURE.md §7).

One urllib3 `PoolManager` per worker process (keep-alive pools per host; urllib3 rather than
`requests`, whose per-call Python costs about as much again and holds the GIL the model thread
needs), urllib3's `Retry` for bounded retries with backoff (5xx and timeouts only), redirects
followed here so that every hop is checked, and a byte cap and a total deadline enforced while the
body streams, so a huge or dripping body can't hold memory or a thread.
"""

from __future__ import annotations

import dataclasses
import time
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError
from urllib3.util.retry import Retry

from media.host_guard import HostRefused, guarded_pool_manager

__all__ = ["DownloadError", "FetchConfig", "HostRefused", "ImageFetcher"]

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


class DownloadError(IOError):
    """The image could not be fetched: HTTP status, timeout, size, type or too many redirects."""


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 2
    backoff_s: float = 0.25
    max_redirects: int = 5
    allow_private_hosts: bool = False
    max_concurrent_downloads: int = 16

    def __post_init__(self):
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "max_bytes", "max_concurrent_downloads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("retries and max_redirects must be >= 0")


class ImageFetcher:
    """Fetches image bytes; thread-safe, meant to be shared by a worker's download threads."""

    def __init__(self, config: FetchConfig):
        self.config = config
        retry = Retry(
            total=None,
            connect=config.retries,
            read=config.retries,
            status=config.retries,
            other=0,
            redirect=False,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            backoff_factor=config.backoff_s,
            backoff_max=5.0,
            raise_on_status=False,
            respect_retry_after_header=False,
        )
        self._retry = retry
        # Proxies from the environment would bypass the address guard: a PoolManager reads none.
        self._http = guarded_pool_manager(
            config.allow_private_hosts,
            num_pools=32,
            maxsize=config.max_concurrent_downloads,
            block=True,
            retries=retry,
            timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s),
            headers={"Accept": "image/*"},
        )

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """Returns the body of `url`, following at most `max_redirects` redirects, all within
        `total_timeout_s` (or by `deadline`, a `time.monotonic()` instant, if that is sooner):
        every wait (connect, each read) is capped at the time left."""
        deadline = min(time.monotonic() + self.config.total_timeout_s, deadline or float("inf"))
        for _ in range(self.config.max_redirects + 1):
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise DownloadError(f"refusing non-http(s) URL {url[:200]!r}")
            left = self._time_left(deadline)
            timeout = urllib3.Timeout(connect=min(self.config.connect_timeout_s, left),
                                      read=min(self.config.read_timeout_s, left))
            # Retries (with backoff) only while another whole attempt fits before the deadline.
            retries = self._retry if left > self.config.read_timeout_s + self.config.connect_timeout_s else False
            try:
                response = self._http.request("GET", url, preload_content=False, redirect=False, timeout=timeout,
                                              retries=retries)
            except HTTPError as e:
                raise DownloadError(f"GET {url[:200]} failed: {_short(e)}") from e
            body = None
            try:
                if response.status in _REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                body = self._read_body(url, response, deadline)
                return body
            finally:
                if body is None:  # unread bytes would be read as the next response: drop the connection
                    response.close()
                response.release_conn()
        raise DownloadError(f"more than {self.config.max_redirects} redirects")

    def _read_body(self, url: str, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        if response.status != 200:
            raise DownloadError(f"GET {url[:200]} returned HTTP {response.status}")
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
            raise DownloadError(f"content type {content_type!r} is not an image")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.max_bytes:
            raise DownloadError(f"body is {declared} bytes, over the {self.config.max_bytes}-byte cap")
        body = bytearray()
        try:
            while True:
                # One receive per read, waiting at most the time left: a body that trickles in a
                # byte at a time meets the deadline, instead of filling a 64 KiB read for hours.
                _set_read_timeout(response, min(self.config.read_timeout_s, self._time_left(deadline)))
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                body += chunk
                if len(body) > self.config.max_bytes:
                    raise DownloadError(f"body exceeds the {self.config.max_bytes}-byte cap")
        except HTTPError as e:
            if time.monotonic() >= deadline:
                raise DownloadError(f"download took over {self.config.total_timeout_s:g}s") from e
            raise DownloadError(f"reading {url[:200]} failed: {_short(e)}") from e
        if not body:
            raise DownloadError("empty body")
        return bytes(body)

    def _time_left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DownloadError(f"download took over {self.config.total_timeout_s:g}s")
        return left

    def close(self) -> None:
        self._http.clear()


def _set_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _short(error: Exception) -> str:
    """The innermost cause, which says what happened (timeout, refused) in one line."""
    while error.__context__ is not None and isinstance(error.__context__, Exception):
        error = error.__context__
    return f"{type(error).__name__}: {error}"[:500]
