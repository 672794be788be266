"""Download and decode a product's images, several at a time, with memory bounded per worker.

Each image is fetched and decoded by one task of a process-wide thread pool of
`max_concurrent_downloads` threads, so at most that many raw bodies are in memory per
worker process, however many harness threads Dataflow runs. Tasks of all products in a
bundle run concurrently; results come out in input order, each with its own timestamp
and window. What fails is reported per image; the product goes on with what is left.

Each input hands on at most one loaded product, so a window of products keeps loading
while a handed-on product fills a batch and the model holds the bundle's thread: the
pool works during inference instead of after it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from apache_beam.utils.shared import Shared

from media.decode import DEFAULT_MAX_PIXELS, decode_image
from media.download import FetchConfig, ImageFetcher
from model_handlers.backends import image_preprocess
from schemas import ProductEvent, Stage
from transforms.dead_letter import event_of

__all__ = ["FetchImages", "FetchImagesFn", "FetchedProduct", "ImageFailure", "ImageOptions"]


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    fetch: FetchConfig = FetchConfig()
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class ImageFailure:
    url: str
    stage: str
    error_type: str
    error: str


@dataclasses.dataclass(frozen=True)
class FetchedProduct:
    """An upsert with the pixels of the images that worked and the reasons of those that did not."""

    event: ProductEvent
    images: tuple[np.ndarray, ...]
    failures: tuple[ImageFailure, ...]


event_of.register(FetchedProduct, lambda product: product.event)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    pixels: np.ndarray | None
    failure: ImageFailure | None
    download_ms: float


class _ImageWorker:
    """One per process (Beam's `Shared`): its pool is the per-worker concurrency cap."""

    def __init__(self, config: FetchConfig):
        self.fetcher = ImageFetcher(config)
        self.pool = ThreadPoolExecutor(config.max_concurrent_downloads, thread_name_prefix="image-fetch")


def _load(fetcher: ImageFetcher, url: str, preprocess, max_pixels: int) -> _Loaded:
    started = time.perf_counter()
    try:
        body = fetcher.fetch(url)
    except Exception as e:  # every download failure is reported, none escapes the pool
        return _Loaded(None, ImageFailure(url, Stage.DOWNLOAD, type(e).__name__, str(e)[:1000]), 0.0)
    download_ms = (time.perf_counter() - started) * 1000
    try:
        pixels = decode_image(body, preprocess, max_pixels)
    except Exception as e:
        return _Loaded(None, ImageFailure(url, Stage.DECODE, type(e).__name__, str(e)[:1000]), download_ms)
    return _Loaded(pixels, None, download_ms)


class FetchImagesFn(beam.DoFn):
    def __init__(self, model_spec: str, options: ImageOptions, batch_size: int = 1):
        self._model_spec = model_spec
        self._options = options
        # Products loading or loaded but not handed on. It bounds the decoded pixels held per
        # DoFn instance, and holds two model batches so that one loads while the other runs.
        self._max_pending = max(4 * options.fetch.max_concurrent_downloads, 2 * batch_size)
        self._shared_worker = Shared()  # every copy of this DoFn in a process gets the same worker
        self._ok = Metrics.counter("embed", "images_ok")
        self._failed = {stage: Metrics.counter("embed", f"{stage}_failed") for stage in (Stage.DOWNLOAD, Stage.DECODE)}
        self._download_ms = Metrics.distribution("embed", "download_ms")

    def setup(self):
        self._preprocess = image_preprocess(self._model_spec)
        fetch = self._options.fetch
        self._worker = self._shared_worker.acquire(lambda: _ImageWorker(fetch), tag=repr(fetch))

    def start_bundle(self):
        self._pending: collections.deque[tuple[ProductEvent, list[Future], WindowedValue]] = collections.deque()

    def process(self, event: ProductEvent, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        futures = [
            self._worker.pool.submit(_load, self._worker.fetcher, url, self._preprocess, self._options.max_pixels)
            for url in event.image_urls
        ]
        self._pending.append((event, futures, WindowedValue(None, timestamp, (window,))))
        # One in, at most one out: the window stays full, so the next products are already
        # loading when the one handed on here fills a batch and the model runs.
        yield from self._drain(block=len(self._pending) > self._max_pending, most=1)

    def finish_bundle(self):
        yield from self._drain(block=True)

    def _drain(self, block: bool, most: int | None = None) -> Iterable[WindowedValue]:
        """Hands on loaded products in input order; `block` waits for the oldest to load."""
        handed = 0
        while self._pending and (most is None or handed < most):
            event, futures, where = self._pending[0]
            if not (block or all(f.done() for f in futures)):
                return
            self._pending.popleft()
            handed += 1
            yield where.with_value(self._collect(event, [f.result() for f in futures]))

    def _collect(self, event: ProductEvent, loaded: list[_Loaded]) -> FetchedProduct:
        images, failures = [], []
        for item in loaded:
            if item.download_ms:
                self._download_ms.update(int(item.download_ms))
            if item.failure:
                self._failed[item.failure.stage].inc()
                failures.append(item.failure)
            else:
                self._ok.inc()
                images.append(item.pixels)
        return FetchedProduct(event, tuple(images), tuple(failures))


class FetchImages(beam.PTransform):
    """Upsert `ProductEvent`s → `FetchedProduct`s (one each, never dropped)."""

    def __init__(self, model_spec: str, options: ImageOptions = ImageOptions(), batch_size: int = 1):
        """`batch_size`: the model's largest batch, which the loading window is made to hold twice."""
        super().__init__()
        self._fn = FetchImagesFn(model_spec, options, batch_size)

    def expand(self, events):
        return events | "DownloadAndDecode" >> beam.ParDo(self._fn)
