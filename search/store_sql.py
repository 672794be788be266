"""The index store's SQLite schema and the statements a commit is made of, in one place.

The store writes a commit with `write_commit`; a replica of an index on object storage replays the
same rows from the commit object with the same function (search.mirror), so the two can't drift.
"""

from __future__ import annotations

import sqlite3
from typing import Iterable, Sequence

__all__ = ["SCHEMA", "generation", "meta", "write_commit"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    doc_id INTEGER,
    shop_id TEXT NOT NULL,
    title TEXT NOT NULL,
    image_url TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS products_doc ON products(doc_id) WHERE doc_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments (name TEXT PRIMARY KEY, kind TEXT NOT NULL, count INTEGER NOT NULL);
"""

_UPSERT = ("INSERT INTO products VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(product_id) DO UPDATE SET "
           "version=excluded.version, doc_id=excluded.doc_id, shop_id=excluded.shop_id, "
           "title=excluded.title, image_url=excluded.image_url")


def meta(db: sqlite3.Connection, key: str) -> str:
    return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def generation(db: sqlite3.Connection) -> int:
    return int(meta(db, "generation"))


def write_commit(db: sqlite3.Connection, *, generation: int, products: Iterable[Sequence] = (),
                 added: Iterable[Sequence] = (), removed: Iterable[str] = (), next_doc_id: int | None = None) -> None:
    """One commit's rows, inside the caller's transaction: products as (product_id, version, doc_id,
    shop_id, title, image_url), segments added as (name, kind, count) and removed by name."""
    db.executemany(_UPSERT, [tuple(row) for row in products])
    db.executemany("DELETE FROM segments WHERE name = ?", [(name,) for name in removed])
    db.executemany("INSERT INTO segments VALUES (?, ?, ?)", [tuple(info) for info in added])
    if next_doc_id is not None:
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_doc_id'", (str(next_doc_id),))
    db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
