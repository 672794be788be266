"""The local stand-ins themselves: the image server records requests, the catalogue is real data."""

import json

import numpy as np
import pytest
import requests

from localstack.image_server import ImageServer, Route
from sample_catalogue.fashion_mnist import CLASSES, load_fashion_mnist
from sample_catalogue.products import STYLES, broken_events, build_catalogue
from transforms.events import InvalidEvent, parse_event


def test_fashion_mnist_is_read_from_the_debian_package():
    images, labels = load_fashion_mnist("t10k")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(len(CLASSES)))


def test_catalogue_writes_photos_and_valid_events(tmp_path):
    products = build_catalogue(tmp_path, "http://127.0.0.1:9", 20, seed=1)
    assert len({p.event["product_id"] for p in products}) == 20
    for product in products:
        event = parse_event(json.dumps(product.event))
        assert product.image_path.exists() and event.image_urls[0].endswith(product.image_path.name)
        category = CLASSES[product.label]
        assert event.attributes["category"] == category and any(style in event.title for style in STYLES[category])
        assert not any(colour in event.title + event.description for colour in ("black", "white", "red", "navy"))
    assert {p.image_path.suffix for p in products} == {".png", ".jpg"}


def test_broken_events_are_all_refused_or_unfetchable():
    refused = 0
    for message in broken_events("http://127.0.0.1:9"):
        try:
            parse_event(message)
        except InvalidEvent:
            refused += 1
    assert refused == 7  # the other three parse but point at images that cannot be had


def test_image_server_serves_files_and_routes_and_records(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png-bytes")
    with ImageServer(tmp_path) as server:
        server.routes["/teapot"] = Route(status=418, body=b"short and stout")
        got = requests.get(server.url("a.png"), timeout=5)
        assert got.content == b"png-bytes" and got.headers["Content-Type"] == "image/png"
        assert requests.get(server.url("teapot"), timeout=5).status_code == 418
        assert requests.get(server.url("../etc/passwd"), timeout=5).status_code == 404
        assert server.requested("a.png") == 1 and server.requests[1] == "/teapot"


def test_the_static_file_server_keeps_connections_alive_and_stops(tmp_path):
    import http.client

    from localstack.static_server import StaticFileServer

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 first")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 second")
    with StaticFileServer(tmp_path) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        bodies = []
        for name in ("a.jpg", "b.jpg"):  # both over one connection: HTTP/1.1 keep-alive
            connection.request("GET", f"/{name}")
            response = connection.getresponse()
            assert response.status == 200 and response.version == 11 and not response.will_close
            bodies.append(response.read())
        connection.close()
        assert bodies == [b"\xff\xd8 first", b"\xff\xd8 second"]
        assert requests.get(server.url("missing.jpg"), timeout=5).status_code == 404
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url("a.jpg"), timeout=2)
