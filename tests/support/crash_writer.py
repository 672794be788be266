"""Child process of the crash test: applies a seeded stream of batches, compacting now and then.

    python -m tests.support.crash_writer INDEX_DIR SEED KIND
"""

from __future__ import annotations

import dataclasses
import random
import sys

from search.fields import parse_filterable
from search.merge_policy import MergePolicy
from search.segment import SegmentParams
from search.store import IndexStore, StoreSettings
from tests.support.index_helpers import MODEL, record

DIM = 32
WORDS = ("linen", "wool", "denim", "silk")
BRANDS = ("acme", "zeta")


def batches(seed: int, count: int = 30, size: int = 60) -> list[list]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append([
            dataclasses.replace(
                record(f"p{rng.randrange(150)}", rng.randrange(40), "delete" if rng.random() < 0.2 else "upsert",
                       dim=DIM, shop_id=f"shop-{rng.randrange(3)}", seed=rng.randrange(2**31)),
                title=rng.choice(WORDS), attributes={"brand": rng.choice(BRANDS)})
            for _ in range(size)
        ])
    return out


def open_store(directory: str, kind: str) -> IndexStore:
    return IndexStore(directory, model=MODEL, dim=DIM,
                      settings=StoreSettings(segment=SegmentParams(kind, m=8, ef_construction=64, ivf_min=2),
                                             merge=MergePolicy(delta_limit=400, max_delta_segments=6), exact_below=0, graph_step_cost=0,
                                             filterable=parse_filterable("brand")))


def main() -> None:
    directory, seed, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = open_store(directory, kind)
    print("ready", flush=True)
    for n, batch in enumerate(batches(seed)):
        store.apply(batch)
        print(f"committed {n}", flush=True)
        if n % 4 == 3:
            store.compact(force=n % 8 == 7)
    print("done", flush=True)


if __name__ == "__main__":
    main()
