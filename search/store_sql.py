"""The index store's SQLite schema and the statements a commit is made of, in one place.

The store writes a commit with `write_commit`; a replica of an index on object storage replays the
same rows from the commit object with the same function (search.mirror), so the two can't drift.
The lexical index (SQLite FTS5, BM25) is written in the same transaction: keywords and vectors
commit together, crash together and replicate together.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable, Sequence

from search.fields import parse_filterable

__all__ = ["CHANGES_KEPT", "PRODUCT_COLUMNS", "SCHEMA", "changes_since", "generation", "lexical_text", "meta", "migrate",
           "write_commit"]

_CHANGES = "CREATE TABLE IF NOT EXISTS changes (generation INTEGER PRIMARY KEY, change TEXT NOT NULL)"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    doc_id INTEGER,
    shop_id TEXT NOT NULL,
    title TEXT NOT NULL,
    image_url TEXT NOT NULL,
    attributes TEXT NOT NULL DEFAULT '{{}}',
    embedded_at TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS products_doc ON products(doc_id) WHERE doc_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments (name TEXT PRIMARY KEY, kind TEXT NOT NULL, count INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS lexical USING fts5(title, description, attributes,
    tokenize = 'porter unicode61 remove_diacritics 2');
{_CHANGES};
"""
# Commits whose change a reader can still apply; one further behind loads the store anew. Readers
# refresh every fraction of a second, so a few commits are the usual gap.
CHANGES_KEPT = 64
# A commit's product row: the table's columns, then the description (kept by the lexical index only).
PRODUCT_COLUMNS = ("product_id", "version", "doc_id", "shop_id", "title", "image_url", "attributes", "embedded_at")
_DEFAULTS = ("{}", "", "")  # attributes, embedded_at, description of rows from before they existed

_UPSERT = (f"INSERT INTO products VALUES ({', '.join('?' * len(PRODUCT_COLUMNS))}) "
           "ON CONFLICT(product_id) DO UPDATE SET "
           "version=excluded.version, doc_id=excluded.doc_id, shop_id=excluded.shop_id, "
           "title=excluded.title, image_url=excluded.image_url, attributes=excluded.attributes, "
           "embedded_at=excluded.embedded_at")


def migrate(db: sqlite3.Connection) -> None:
    """Brings a store made before attributes and the lexical index to this schema (once, at open)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(products)")}
    added = [(name, default) for name, default in (("attributes", "{}"), ("embedded_at", "")) if name not in columns]
    for name, default in added:
        db.execute(f"ALTER TABLE products ADD COLUMN {name} TEXT NOT NULL DEFAULT '{default}'")
    if added:  # the lexical index of the products it already holds: their titles
        db.execute("INSERT INTO lexical(rowid, title, description, attributes) "
                   "SELECT doc_id, title, '', '' FROM products WHERE doc_id IS NOT NULL")


def lexical_text(attributes: str, text_fields: Sequence[str]) -> str:
    """The words of a product's declared keyword attributes, for the lexical index."""
    values = json.loads(attributes) if attributes else {}
    return " ".join(v for name in text_fields if isinstance(v := values.get(name), str))


def meta(db: sqlite3.Connection, key: str, default: str | None = None) -> str:
    """A meta value; `default` for a key a store made before it lacks (without one, a KeyError)."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None and default is None:
        raise KeyError(f"meta has no {key!r}")
    return row[0] if row else default


def generation(db: sqlite3.Connection) -> int:
    return int(meta(db, "generation"))


def write_commit(db: sqlite3.Connection, *, generation: int, products: Iterable[Sequence] = (),
                 added: Iterable[Sequence] = (), removed: Iterable[str] = (), next_doc_id: int | None = None) -> dict:
    """One commit's rows, inside the caller's transaction: products as PRODUCT_COLUMNS + (description,)
    (rows of commits from before attributes have fewer: the rest default), segments added as
    (name, kind, count) and removed by name. A product's old doc leaves the lexical index, its new one
    joins it.

    Returns the commit's change, also kept in the `changes` table for the last CHANGES_KEPT commits:
    what a view needs to move to this generation (docs that died, with their shops; docs added, with
    their shops and filterable values; segments added and removed), so a reader applies a commit in
    proportion to it instead of reading the whole shard again (IndexStore.refresh)."""
    rows = [tuple(row) + _DEFAULTS[len(row) - 6:] for row in products]
    added = [tuple(info) for info in added]
    removed = list(removed)
    change = {"next_doc": next_doc_id, "dead": [], "added": [], "segments_added": added, "segments_removed": removed}
    if rows:
        ids = [(row[0],) for row in rows]
        change["dead"] = db.execute(
            "SELECT doc_id, shop_id FROM products WHERE doc_id IS NOT NULL "
            "AND product_id IN (SELECT value FROM json_each(?))",
            (json.dumps([row[0] for row in rows], ensure_ascii=False),)).fetchall()
        db.executemany("DELETE FROM lexical WHERE rowid = (SELECT doc_id FROM products WHERE product_id = ?)", ids)
        db.executemany(_UPSERT, [row[:len(PRODUCT_COLUMNS)] for row in rows])
        fields = parse_filterable(json.loads(meta(db, "filterable", "[]")))
        text_fields = [f.name for f in fields if f.type == "keyword"]
        db.executemany("INSERT INTO lexical(rowid, title, description, attributes) VALUES (?, ?, ?, ?)",
                       [(row[2], row[4], row[8], lexical_text(row[6], text_fields)) for row in rows
                        if row[2] is not None])
        change["added"] = [(row[2], row[3], _filterable_values(row[6], fields)) for row in rows if row[2] is not None]
    db.executemany("DELETE FROM segments WHERE name = ?", [(name,) for name in removed])
    db.executemany("INSERT INTO segments VALUES (?, ?, ?)", added)
    if next_doc_id is not None:
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_doc_id'", (str(next_doc_id),))
    db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
    db.execute(_CHANGES)  # a replica restored from a snapshot made before the change log
    db.execute("INSERT OR REPLACE INTO changes VALUES (?, ?)",
               (generation, json.dumps(change, ensure_ascii=False)))
    db.execute("DELETE FROM changes WHERE generation <= ?", (generation - CHANGES_KEPT,))
    return change


def changes_since(db: sqlite3.Connection, generation: int, newest: int) -> list[dict] | None:
    """The changes of commits generation+1..newest in order, or None when the log no longer holds them
    all (the reader is too far behind, or the store was made before the log): load the store anew."""
    try:
        rows = db.execute("SELECT generation, change FROM changes WHERE generation > ? AND generation <= ? "
                          "ORDER BY generation", (generation, newest)).fetchall()
    except sqlite3.OperationalError:  # no changes table: a store made before it, opened read-only
        return None
    if [g for g, _ in rows] != list(range(generation + 1, newest + 1)):
        return None
    return [json.loads(change) for _, change in rows]


def _filterable_values(attributes: str, fields) -> dict:
    """The declared fields' raw values of a product's attributes (typed by the view: search.fields)."""
    if not fields:
        return {}
    values = json.loads(attributes) if attributes else {}
    return {f.name: values[f.name] for f in fields if f.name in values} if isinstance(values, dict) else {}
