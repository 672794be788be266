"""Shared by the Qdrant tests: records through the sink's DoFn as a runner drives it."""

from __future__ import annotations

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from search.qdrant.collection import QdrantTarget
from search.store import StoreSettings
from transforms.qdrant_sink import _ConditionalWriteFn


def deliver(fn: _ConditionalWriteFn, bundle) -> list[tuple[str, object]]:
    """One bundle through the DoFn as a runner drives it: (tag, value) of every output."""
    fn.start_bundle()
    outputs = []
    for r in bundle:
        outputs += list(fn.process(r, timestamp=Timestamp(0), window=GlobalWindow()) or ())
    outputs += list(fn.finish_bundle() or ())
    out = []
    for o in outputs:
        tag = getattr(o, "tag", "commits")
        value = getattr(o, "value", o)
        out.append((tag, value.value if isinstance(value, WindowedValue) else value))
    return out


def write_collection(target: QdrantTarget, records, settings: StoreSettings = StoreSettings(),
                     batch_size: int = 1000) -> list[tuple[str, object]]:
    """`records` into the collection through one worker of the sink, in one bundle per batch."""
    fn = _ConditionalWriteFn(target, None, 0, settings, batch_size, backoff_s=0.0)
    fn.setup()
    try:
        return [out for start in range(0, len(records), batch_size)
                for out in deliver(fn, records[start:start + batch_size])]
    finally:
        fn.teardown()
