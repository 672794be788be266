"""Refuses to connect to hosts that resolve to internal addresses (SSRF guard, docs/ARCHITECTURE.md §7).

Merchants control image URLs, so a URL is untrusted input: `http://169.254.169.254/...`
would read the worker's metadata server. The check sits inside the HTTP connection itself:
the host is resolved once, every address is checked, and the socket connects to the
checked address. So it holds for every redirect hop and leaves no gap for DNS rebinding
between the check and the connect.

`allow_loopback` (the pipelines' `--allow_private_hosts`, for local runs and tests) opens
loopback only: private, link-local (the metadata server) and the rest stay refused.
"""

from __future__ import annotations

import ipaddress
import socket

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["HostRefused", "check_address", "guarded_pool_manager", "resolve_allowed"]


class HostRefused(ValueError):
    """The URL's host is, or resolves to, an address the guard refuses."""


def check_address(address: str, allow_loopback: bool = False) -> None:
    """Raises `HostRefused` for loopback, private, link-local, reserved, multicast or unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_loopback and ip.is_loopback:
        return
    # Most specific first: Python counts link-local and loopback as private too.
    for reason in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{reason}"):
            raise HostRefused(f"address {ip} is {reason.replace('_', '-')}")
    if not ip.is_global:
        raise HostRefused(f"address {ip} is not globally routable")


def resolve_allowed(host: str, port: int, allow_loopback: bool = False) -> str:
    """Resolves `host` and returns an address to connect to, if every address it has is allowed.

    All addresses are checked, not just the first, so a name that mixes a public and an
    internal address is refused outright.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise HostRefused(f"cannot resolve {host!r}: {e}") from e
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        try:
            check_address(address, allow_loopback)
        except HostRefused as e:
            raise HostRefused(f"host {host!r} refused: {e}") from None
    return addresses[0]


def _guarded_pools(allow_loopback: bool) -> dict[str, type]:
    """Connection pools whose connections dial only addresses `resolve_allowed` returns."""

    class _Guarded:
        def _new_conn(self):
            # TLS still verifies against self.host (SNI and certificate); only the dial target changes.
            self._dns_host = resolve_allowed(self._dns_host, self.port, allow_loopback)
            return super()._new_conn()

    class _HTTPConnection(_Guarded, HTTPConnection):
        pass

    class _HTTPSConnection(_Guarded, HTTPSConnection):
        pass

    class _HTTPPool(HTTPConnectionPool):
        ConnectionCls = _HTTPConnection

    class _HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _HTTPSConnection

    return {"http": _HTTPPool, "https": _HTTPSPool}


def guarded_pool_manager(allow_loopback: bool = False, **kwargs) -> urllib3.PoolManager:
    """A urllib3 `PoolManager` (`kwargs` as its own) whose connections go through `resolve_allowed` first."""
    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = _guarded_pools(allow_loopback)
    return manager
