"""A model rollout end to end on the local stack, run as `make rollout` runs it, with a storefront client of
its own querying all along: zero failed requests, answers from the new model after the switch, and the
changes made during the backfill in the new index at their latest versions."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from model_handlers.projection import build_head, load_projection, save_projection
from search.filters import parse_filter
from search.qdrant.collection import QdrantTarget
from search.qdrant.index import QdrantIndex
from search.sharded import ShardedIndex
from tests.conftest import DIM, TINY_CLIP

ROOT = Path(__file__).resolve().parents[1]


def identity_head(path: Path) -> Path:
    """A head that leaves tiny CLIP's vectors as they are: a new model id, the same quality (the gate passes)."""
    head = build_head([DIM, DIM])
    with torch.no_grad():
        head[0].weight.copy_(torch.eye(DIM))
        head[0].bias.zero_()
    save_projection(path, head, model=TINY_CLIP, name="identity", version=1, trained_on="nothing: the identity")
    return path


class Storefront(threading.Thread):
    """Text and vector queries in a loop against the service, every answer's model and every failure kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.answers, self.failures = url, [], []
        self.stop_event = threading.Event()

    def run(self):
        session = requests.Session()
        n = 0
        while not self.stop_event.is_set():
            n += 1
            body = {"text": "leather ankle boots"} if n % 2 else {"vector": [1.0] * DIM, "filter": {"in_stock": True}}
            try:
                response = session.post(f"{self.url}/v1/search", json={**body, "k": 10}, timeout=30)
            except requests.RequestException as e:
                self.failures.append(repr(e))
                continue
            if response.status_code == 200:
                self.answers.append(response.json()["model"])
            else:
                self.failures.append(f"{response.status_code} {response.text[:200]}")


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_a_rollout_to_a_new_head_while_a_storefront_queries(tmp_path, backend):
    head = identity_head(tmp_path / "identity.pt")
    new_model = load_projection(str(head)).model_id
    out = tmp_path / "rollout"
    process = subprocess.Popen(
        [sys.executable, "-m", "localstack.rollout", "--from_model", TINY_CLIP, "--model", TINY_CLIP, "--projection",
         str(head), "--products", "24", "--photos", "fashion-mnist", "--photo_queries", "60", "--linger_secs", "3",
         "--output_dir", str(out), "--backend", backend], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    lines, client, switched_at = [], None, None
    deadline = time.monotonic() + 900
    try:
        for line in process.stdout:
            lines.append(line.rstrip())
            if line.startswith("search: http://") and client is None:
                client = Storefront(line.split()[1].rstrip("/"))
                client.start()
            if line.startswith("serving v2 ") and client is not None:
                switched_at = len(client.answers)
                time.sleep(1.5)
                client.stop_event.set()
            assert time.monotonic() < deadline, "the rollout took over 15 minutes"
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        if client is not None:
            client.stop_event.set()
            client.join(timeout=60)
    output = "\n".join(lines)
    assert process.returncode == 0, output[-4000:]
    assert "gate: v2 passes" in output and ", 0 failed;" in output

    # The storefront's own view: nothing failed, the old model until the switch, the new one after it.
    assert client is not None and switched_at is not None, output[-3000:]
    assert not client.failures, client.failures[:5]
    assert client.answers[0] == TINY_CLIP and client.answers[-1] == new_model
    assert set(client.answers) == {TINY_CLIP, new_model} and len(client.answers) > switched_at

    # What changed during the backfill is in the new index at its latest version, whatever came last.
    # (Qdrant: the stand-in has stopped; its directory opens in the local mode.)
    index = QdrantIndex.open(QdrantTarget(collection="v2", path=str(out / "qdrant"))) if backend == "qdrant" else \
        ShardedIndex.open(out / "indexes" / "v2")
    live = {pid: version for pid, (version, _) in index.live_products().items()}
    base = 1_700_000_000_000
    assert len(live) == 23 and "prod-000004" not in live  # deleted during the backfill
    for n in range(4):
        assert live[f"prod-{n:06d}"] == base + n + 1_000  # re-embedded (0, 2) or patched (1, 3)
    assert all(live[f"prod-{n:06d}"] == base + n for n in range(5, 24))
    cheap = index.search(np.ones(DIM, np.float32) / np.sqrt(DIM), k=30,
                         filter=parse_filter({"price": {"lte": 1.0}}, index.filterable))
    assert sorted(hit.product_id for hit in cheap) == ["prod-000001", "prod-000003"]  # the patches' price
    titles = {hit.product_id: hit.title for hit in index.search(np.ones(DIM, np.float32), k=30)}
    assert titles["prod-000000"].endswith("(new season)") and titles["prod-000002"].endswith("(new season)")
    assert index.model == new_model
    index.close()
