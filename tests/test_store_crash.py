"""Crash test: the updater is killed (SIGKILL) at random points of its commits, many times.

Every reopen must equal the last-writer-wins state of some prefix of the input's batches (each
batch is one commit), and replaying the whole input must then restore the full state.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from search.segment import SEGMENT_KINDS
from tests.support.crash_writer import WORDS, batches, open_store
from tests.support.index_helpers import last_writer_wins, live_truth

RUNS = 25


def kill_at_random(directory, seed: int, kind: str, rng: random.Random) -> None:
    """Kills the writer a random few milliseconds after a random commit: inside the next commit,
    a compaction, or between them, wherever that time lands. Counting commits (not seconds) keeps
    the kill points spread over the run however fast or loaded the machine is."""
    child = subprocess.Popen([sys.executable, "-m", "tests.support.crash_writer", str(directory), str(seed), kind],
                             stdout=subprocess.PIPE, cwd=os.getcwd())
    assert child.stdout.readline().strip() == b"ready"
    after = rng.randrange(-1, 28)  # -1: during the first commit
    for _ in range(after + 1):
        child.stdout.readline()
    time.sleep(rng.uniform(0.0, 0.02))
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()


def assert_consistent(store, records) -> None:
    assert store.live_products() == live_truth(records)
    ids, vectors = store.live_vectors()
    assert len(ids) == len(live_truth(records))
    # The keyword index and the attribute fields are of the same commit as the vectors.
    live = {pid: r for pid, r in last_writer_wins(records).items() if r.op == "upsert"}
    for word in WORDS:
        found = {h.product_id for h in store.search(None, k=200, text=word, mode="lexical")}
        assert found == {pid for pid, r in live.items() if r.title == word}, word
    assert store.facets(["brand"])["brand"]["values"] == dict(collections.Counter(r.attributes["brand"]
                                                                                  for r in live.values()))
    for vector in vectors[:20]:
        hits = store.search(vector, k=3, ef_search=32)
        assert hits and hits[0].score > 0.999


@pytest.mark.parametrize("kind", SEGMENT_KINDS)
def test_every_reopen_is_a_committed_prefix_and_replay_restores_the_rest(tmp_path, kind):
    rng = random.Random(20261121)
    interrupted = 0
    for run in range(RUNS):
        directory = tmp_path / f"run-{run}"
        stream = batches(seed=run)
        kill_at_random(directory, run, kind, rng)

        store = open_store(str(directory), kind)
        live = store.live_products()
        prefixes = [n for n in range(len(stream) + 1)
                    if live_truth([r for batch in stream[:n] for r in batch]) == live]
        assert prefixes, f"run {run}: the reopened store is no committed prefix of the input"
        assert_consistent(store, [r for batch in stream[:prefixes[-1]] for r in batch])
        interrupted += prefixes[0] < len(stream)
        assert not [p for p in directory.glob("seg-*") if p.name.endswith(".tmp")], "orphans are cleaned on open"

        for batch in stream:  # replay everything: repeats are no-ops
            store.apply(batch)
        assert_consistent(store, [r for batch in stream for r in batch])
        store.close()
    assert interrupted >= RUNS // 2, f"only {interrupted} of {RUNS} runs were killed before the end"
