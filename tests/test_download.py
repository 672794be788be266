"""The fetcher against a real HTTP server on loopback, one misbehaviour at a time."""

import time

import pytest

import media.host_guard as host_guard
from localstack.image_server import ImageServer, Route
from media.download import DownloadError, FetchConfig, HostRefused, ImageFetcher

JPEG = b"\xff\xd8\xff" + b"x" * 1000


def fetcher(**overrides) -> ImageFetcher:
    settings = dict(allow_private_hosts=True, connect_timeout_s=1.0, read_timeout_s=1.0, backoff_s=0.01)
    settings.update(overrides)
    return ImageFetcher(FetchConfig(**settings))


def image_route(body=JPEG, **kwargs) -> Route:
    return Route(body=body, headers={"Content-Type": "image/jpeg"}, **kwargs)


def test_fetches_an_image(image_server):
    image_server.routes["/a.jpg"] = image_route()
    assert fetcher().fetch(image_server.url("a.jpg")) == JPEG


def test_a_404_fails_without_retrying(image_server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetcher().fetch(image_server.url("missing.jpg"))
    assert image_server.requested("missing.jpg") == 1


def test_5xx_is_retried_with_backoff_then_succeeds(image_server):
    answers = iter([Route(status=503), Route(status=502), image_route()])
    image_server.routes["/flaky.jpg"] = lambda: next(answers)
    assert fetcher(retries=2).fetch(image_server.url("flaky.jpg")) == JPEG
    assert image_server.requested("flaky.jpg") == 3


def test_retries_are_bounded(image_server):
    image_server.routes["/down.jpg"] = Route(status=500)
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetcher(retries=2).fetch(image_server.url("down.jpg"))
    assert image_server.requested("down.jpg") == 3


def test_a_hanging_server_times_out_and_is_retried(image_server):
    image_server.routes["/hang.jpg"] = image_route(delay=3.0)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="(?i)timed out|timeout"):
        fetcher(read_timeout_s=0.3, retries=1).fetch(image_server.url("hang.jpg"))
    assert time.monotonic() - started < 2.5
    assert image_server.requested("hang.jpg") == 2


def test_a_dripping_body_hits_the_total_deadline(image_server):
    image_server.routes["/drip.jpg"] = image_route(body=b"x" * 40, chunks=40, drip=0.1)
    with pytest.raises(DownloadError, match="took over"):
        fetcher(total_timeout_s=0.5).fetch(image_server.url("drip.jpg"))


def test_the_deadline_holds_while_a_body_trickles_in(image_server):
    """A byte every 50 ms never trips a per-read timeout; the deadline must still end it on time."""
    image_server.routes["/trickle.jpg"] = image_route(body=b"x" * 2000, chunks=2000, drip=0.05)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="took over 0.8s"):
        fetcher(total_timeout_s=0.8, read_timeout_s=10.0).fetch(image_server.url("trickle.jpg"))
    assert time.monotonic() - started < 2.5


def test_declared_oversize_bodies_are_refused_before_reading(image_server):
    image_server.routes["/big.jpg"] = image_route(body=b"x" * 5000)
    with pytest.raises(DownloadError, match="over the 1000-byte cap"):
        fetcher(max_bytes=1000).fetch(image_server.url("big.jpg"))


def test_undeclared_oversize_bodies_are_cut_while_streaming(image_server):
    body = b"x" * 200_000
    image_server.routes["/sneaky.jpg"] = Route(
        body=body, headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))}
    )
    # Lie about nothing, but give a cap below the body: the stream check must catch it too.
    with pytest.raises(DownloadError, match="cap"):
        fetcher(max_bytes=100_000).fetch(image_server.url("sneaky.jpg"))


def test_a_connection_left_with_unread_bytes_is_not_reused(image_server):
    body = b"y" * 200_000
    image_server.routes["/big.jpg"] = Route(body=body, headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
    image_server.routes["/a.jpg"] = image_route()
    fetch = fetcher(max_bytes=100_000, max_concurrent_downloads=1)
    for _ in range(3):
        with pytest.raises(DownloadError, match="cap"):
            fetch.fetch(image_server.url("big.jpg"))
        assert fetch.fetch(image_server.url("a.jpg")) == JPEG


def test_non_image_content_types_are_refused(image_server):
    image_server.routes["/page.html"] = Route(body=b"<html>", headers={"Content-Type": "text/html; charset=utf-8"})
    with pytest.raises(DownloadError, match="not an image"):
        fetcher().fetch(image_server.url("page.html"))


def test_empty_bodies_are_refused(image_server):
    image_server.routes["/empty.jpg"] = image_route(body=b"")
    with pytest.raises(DownloadError, match="empty"):
        fetcher().fetch(image_server.url("empty.jpg"))


def test_redirects_are_followed_up_to_five(image_server):
    for hop in range(5):
        image_server.routes[f"/r{hop}"] = Route(status=302, headers={"Location": f"/r{hop + 1}"})
    image_server.routes["/r5"] = image_route()
    assert fetcher().fetch(image_server.url("r0")) == JPEG
    image_server.routes["/r5"] = Route(status=301, headers={"Location": "/r6"})
    image_server.routes["/r6"] = image_route()
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        fetcher().fetch(image_server.url("r0"))


def test_a_redirect_to_a_non_http_scheme_is_refused(image_server):
    image_server.routes["/to-file"] = Route(status=302, headers={"Location": "file:///etc/passwd"})
    with pytest.raises(DownloadError, match="non-http"):
        fetcher().fetch(image_server.url("to-file"))


def test_loopback_is_refused_by_default_and_never_contacted(image_server):
    image_server.routes["/a.jpg"] = image_route()
    url = f"http://localhost:{image_server.port}/a.jpg"
    for target in (url, image_server.url("a.jpg")):
        with pytest.raises(HostRefused):
            fetcher(allow_private_hosts=False).fetch(target)
    assert image_server.requests == []


def test_a_redirect_to_the_metadata_server_is_refused(image_server):
    image_server.routes["/evil"] = Route(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    with pytest.raises(HostRefused, match="link-local"):
        fetcher().fetch(image_server.url("evil"))


def test_a_redirect_to_a_refused_host_never_reaches_it(monkeypatch):
    """127.0.0.2 stands in for an internal host: the guard refuses it, its server must see nothing."""
    real_check = host_guard.check_address

    def check(address, allow_loopback=False):
        if address == "127.0.0.2":
            raise HostRefused("address 127.0.0.2 is internal (test policy)")
        real_check(address, allow_loopback)

    monkeypatch.setattr(host_guard, "check_address", check)
    with ImageServer() as public, ImageServer(host="127.0.0.2") as internal:
        internal.routes["/secret"] = image_route()
        public.routes["/hop"] = Route(status=307, headers={"Location": f"http://127.0.0.2:{internal.port}/secret"})
        with pytest.raises(HostRefused, match="internal"):
            fetcher().fetch(public.url("hop"))
        with pytest.raises(HostRefused):
            fetcher().fetch(f"http://127.0.0.2:{internal.port}/secret")
        assert public.requests == ["/hop"]
        assert internal.requests == []


def test_config_is_validated():
    with pytest.raises(ValueError):
        FetchConfig(max_bytes=0)
    with pytest.raises(ValueError):
        FetchConfig(retries=-1)
