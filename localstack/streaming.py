"""Running a streaming pipeline on the DirectRunner in the background, and stopping it promptly.

The DirectRunner's Pub/Sub read blocks in a pull; `cancel()` waits until that pull returns
(up to ~30 s). `StreamingJob.stop()` cancels in a thread and publishes wake-up messages to
the input topic until the cancel goes through (docs/ARCHITECTURE.md §14).
"""

from __future__ import annotations

import threading
import time

import apache_beam as beam

__all__ = ["StreamingJob"]


class StreamingJob:
    def __init__(self, pipeline: beam.Pipeline, wake_topic: str):
        self._pipeline = pipeline
        self._wake_topic = wake_topic
        self.result = None

    def start(self) -> "StreamingJob":
        self.result = self._pipeline.run()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.result is None:
            return
        from google.cloud import pubsub_v1

        done = threading.Event()

        def cancel():
            try:
                self.result.cancel()
            finally:
                done.set()

        threading.Thread(target=cancel, name="cancel-streaming-job", daemon=True).start()
        publisher = pubsub_v1.PublisherClient()
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.5) and time.monotonic() < deadline:
            publisher.publish(self._wake_topic, b"wake-up", event_id="wake-up").result(timeout=10)
        if not done.is_set():
            raise TimeoutError(f"streaming job did not stop within {timeout_s}s")

    def __enter__(self) -> "StreamingJob":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
