"""FetchImages: concurrency within a bundle, the per-worker cap, order and per-image failures."""

import threading
import time

import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from localstack.image_server import Route
from schemas import ProductEvent
from tests.conftest import TINY_CLIP, image_bytes
from media.download import FetchConfig
from transforms.images import FetchedProduct, ImageOptions, FetchImagesFn


def run_bundle(events, cap: int) -> list[WindowedValue]:
    fn = FetchImagesFn(TINY_CLIP, ImageOptions(FetchConfig(allow_private_hosts=True, max_concurrent_downloads=cap)))
    fn.setup()
    fn.start_bundle()
    out = []
    for n, event in enumerate(events):
        out.extend(fn.process(event, timestamp=Timestamp(n), window=GlobalWindow()))
    out.extend(fn.finish_bundle())
    return out


@pytest.fixture
def slow_images(image_server):
    in_flight, peak, lock = [0], [0], threading.Lock()
    body = image_bytes("JPEG")

    def slow():
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.3)
        with lock:
            in_flight[0] -= 1
        return Route(body=body, headers={"Content-Type": "image/jpeg"})

    for i in range(8):
        image_server.routes[f"/{i}.jpg"] = slow
    return image_server, peak


def products(server, per_product: int, count: int) -> list[ProductEvent]:
    return [
        ProductEvent(f"e{p}", f"p{p}", "upsert", 1,
                     image_urls=tuple(server.url(f"{(p * per_product + i) % 8}.jpg") for i in range(per_product)))
        for p in range(count)
    ]


def test_images_of_a_bundle_download_concurrently_and_come_out_in_order(slow_images):
    server, peak = slow_images
    out = run_bundle(products(server, per_product=2, count=4), cap=8)
    assert [wv.value.event.event_id for wv in out] == ["e0", "e1", "e2", "e3"]
    assert [wv.timestamp for wv in out] == [Timestamp(n) for n in range(4)]
    assert all(isinstance(wv.value, FetchedProduct) and len(wv.value.images) == 2 for wv in out)
    # Overlap is the behaviour (not wall time): images of different products were in flight together.
    assert peak[0] >= 4, f"only {peak[0]} downloads overlapped"


def test_the_per_worker_cap_bounds_concurrent_downloads(slow_images):
    server, peak = slow_images
    run_bundle(products(server, per_product=4, count=2), cap=2)
    assert peak[0] <= 2


def test_failed_images_are_reported_and_the_rest_kept(image_server):
    image_server.routes["/ok.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    image_server.routes["/junk.jpg"] = Route(body=b"junk", headers={"Content-Type": "image/jpeg"})
    event = ProductEvent("e", "p", "upsert", 1, image_urls=(
        image_server.url("ok.jpg"), image_server.url("gone.jpg"), image_server.url("junk.jpg")))
    (product,) = [wv.value for wv in run_bundle([event], cap=4)]
    assert len(product.images) == 1 and product.images[0].shape == (64, 64, 3)
    assert [(f.url.rsplit("/", 1)[1], f.stage) for f in product.failures] == [("gone.jpg", "download"),
                                                                              ("junk.jpg", "decode")]


def test_products_without_images_pass_straight_through(image_server):
    (product,) = [wv.value for wv in run_bundle([ProductEvent("e", "p", "upsert", 1, title="t")], cap=2)]
    assert product.images == () and product.failures == ()


def test_each_input_hands_on_at_most_one_product_and_the_window_holds_two_batches(image_server):
    body = image_bytes("JPEG")

    def slow():
        time.sleep(0.02)
        return Route(body=body, headers={"Content-Type": "image/jpeg"})

    image_server.routes["/a.jpg"] = slow
    fn = FetchImagesFn(TINY_CLIP, ImageOptions(FetchConfig(allow_private_hosts=True, max_concurrent_downloads=2)),
                        batch_size=8)
    fn.setup()
    fn.start_bundle()
    events = [ProductEvent(f"e{n}", f"p{n}", "upsert", 1, image_urls=(image_server.url("a.jpg"),)) for n in range(40)]
    handed, counts = [], []
    for n, event in enumerate(events):
        if n % 10 == 9:
            time.sleep(0.5)  # a model batch holds the thread: everything submitted so far loads meanwhile
        out = list(fn.process(event, timestamp=Timestamp(n), window=GlobalWindow()))
        counts.append(len(out))
        handed.extend(out)
        # Loaded products wait in the window (2 x 8 here) instead of pouring out at once after the pause.
        assert n + 1 - len(handed) <= 16
    handed.extend(fn.finish_bundle())
    assert max(counts) == 1
    assert [wv.value.event.event_id for wv in handed] == [e.event_id for e in events]
