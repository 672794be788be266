"""`CountOutcomes`: what a job has produced so far, as Beam counters and a progress line.

Records, dead letters (by stage) and failed-image reports (an image that failed for a product
still embedded) are counted under the `outcome` namespace, which the command line's closing
summary reads, and every worker process logs one line every
`every_secs` while output flows, so a long run is never silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

__all__ = ["CountOutcomes", "NAMESPACE", "describe_outcomes", "read_outcomes"]

NAMESPACE = "outcome"
_log = logging.getLogger(__name__)


class _ProcessProgress:
    """One tally per worker process, shared by the DoFn's threads and both of its steps."""

    lock = threading.Lock()
    counts: Counter = Counter()
    started = 0.0
    logged = 0.0

    @classmethod
    def add(cls, kind: str, every_secs: float) -> None:
        now = time.monotonic()
        with cls.lock:
            if not cls.started:
                cls.started = cls.logged = now
            cls.counts[kind] += 1
            if now - cls.logged < every_secs:
                return
            cls.logged = now
            records = cls.counts["records"]
            dead = sum(n for name, n in cls.counts.items() if name.startswith("dead_letters_"))
            rate = records / max(now - cls.started, 1e-9)
        _log.info("progress: %d records, %d dead letters, %.1f records/s", records, dead, rate)


class _CountFn(beam.DoFn):
    def __init__(self, kind: str, every_secs: float):
        self._kind = kind
        self._every_secs = every_secs

    def setup(self):
        self._counters: dict[str, object] = {}

    def process(self, element):
        if self._kind == "records":
            name = "records"
        else:  # an image that failed for a product still embedded is a report, not the event's outcome
            name = f"{'dead_letters' if element.is_event_level else 'image_failures'}_{element.stage}"
        if name not in self._counters:
            self._counters[name] = Metrics.counter(NAMESPACE, name)
        self._counters[name].inc()
        _ProcessProgress.add(name, self._every_secs)
        return ()


class CountOutcomes(beam.PTransform):
    """Counts `records` (any elements) or `dead_letters` (`DeadLetter`s, by stage); outputs nothing."""

    def __init__(self, kind: str, every_secs: float = 5.0):
        super().__init__()
        if kind not in ("records", "dead_letters"):
            raise ValueError(f"kind must be records or dead_letters, got {kind!r}")
        self._fn = _CountFn(kind, every_secs)

    def expand(self, pcoll):
        return pcoll | beam.ParDo(self._fn)


def read_outcomes(result) -> dict[str, int]:
    """The `outcome` counters of a finished run (committed where the runner has them)."""
    from apache_beam.metrics.metric import MetricsFilter

    totals: Counter = Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += value or 0
    return dict(totals)


def describe_outcomes(totals: dict[str, int], records: str = "records") -> str:
    """`300 records, 10 dead letters (download=3, parse=2, validate=5); plus 3 failed-image reports`
    (`records`: what to call them)."""
    stages = {name.removeprefix("dead_letters_"): n for name, n in sorted(totals.items())
              if name.startswith("dead_letters_")}
    by_stage = f" ({', '.join(f'{stage}={n}' for stage, n in stages.items())})" if stages else ""
    line = f"{totals.get('records', 0)} {records}, {sum(stages.values())} dead letters{by_stage}"
    images = sum(n for name, n in totals.items() if name.startswith("image_failures_"))
    return line + (f"; plus {images} failed-image reports" if images else "")
