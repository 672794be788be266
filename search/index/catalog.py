"""The store's catalog: its SQLite schema, migrations, connections and every statement, in one place.

The store writes a commit with `write_commit`; a replica of an index on object storage replays the
same rows from the commit object with the same function (search.mirror), so the two can't drift.
The lexical index (SQLite FTS5, BM25) is written in the same transaction: keywords and vectors
commit together, crash together and replicate together.
"""

from __future__ import annotations

import array
import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from schemas import EmbeddingRecord, non_finite_number
from search.fields import Codes, Field, numbers, parse_filterable, typed
from search.index.files import STATE

__all__ = ["CHANGES_KEPT", "PRODUCT_COLUMNS", "SCHEMA", "Catalog", "ProductRow", "attributes", "attributes_json",
           "changes_since", "current_states", "doc_of", "field_values", "generation", "lexical_matches",
           "lexical_text", "live_docs", "live_products", "meta", "migrate", "products_by_doc", "segment_rows",
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


class ProductRow(NamedTuple):
    """A product as a commit writes it (PRODUCT_COLUMNS, then the description); doc_id None: deleted."""

    product_id: str
    version: int
    doc_id: int | None
    shop_id: str
    title: str
    image_url: str
    attributes: str  # JSON
    embedded_at: str
    description: str
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
    proportion to it instead of reading the whole shard again (search.index.reader)."""
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


class Catalog:
    """The store's SQLite database: a connection per thread (WAL: readers never wait for the writer),
    transactions, and closing them all together."""

    def __init__(self, directory: Path, read_only: bool):
        self.path = directory / STATE
        self.read_only = read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every thread's connection, with its thread: closed together by close(), and each one whose thread
        # has ended when the next is opened (a server's worker threads come and go).
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []

    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect("?mode=ro" if self.read_only else "")
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
            try:
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.OperationalError:
                if not self.read_only:
                    raise
                # Read-only media (a copy on a read-only mount, without its -wal and -shm files): a
                # reader cannot make the -shm file WAL mode needs, so it reads the file as immutable.
                db.close()
                db = self._connect("?immutable=1")
                db.execute("PRAGMA synchronous=FULL")
            with self._lock:
                ended = [pair for pair in self._connections if not pair[0].is_alive()]
                self._connections = [pair for pair in self._connections if pair[0].is_alive()]
                self._connections.append((threading.current_thread(), db))
            for _thread, connection in ended:
                connection.close()
            self._local.db = db
        return db

    def _connect(self, query: str) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}{query}", uri=True, isolation_level=None, timeout=60,
                               check_same_thread=False)

    class _Tx:
        def __init__(self, db, immediate):
            self.db, self.immediate = db, immediate

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            return self.db

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self, immediate: bool | None = None):
        """A transaction on this thread's connection; a writer's takes the write lock at once."""
        return self._Tx(self.db(), not self.read_only if immediate is None else immediate)

    def create(self) -> None:
        """The schema, and the migration of a store made by an earlier version (writers only)."""
        self.db().executescript(SCHEMA)  # its own transaction: executescript commits
        with self.transaction() as db:
            migrate(db)

    def checkpoint(self) -> None:
        """Copies the commit from the WAL into the database file, so it never lives in the WAL alone."""
        self.db().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for _thread, db in connections:
            db.close()
        self._local = threading.local()


def segment_rows(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(name, kind, count) of the manifest's segments, by name."""
    return db.execute("SELECT name, kind, count FROM segments ORDER BY name").fetchall()


def live_docs(db: sqlite3.Connection, shops: Codes) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, shop codes) of every live product, streamed: millions of rows never sit in a list."""
    docs, codes = array.array("q"), array.array("d")
    for doc, shop in db.execute("SELECT doc_id, shop_id FROM products WHERE doc_id IS NOT NULL"):
        docs.append(doc)
        codes.append(shops.code(shop))
    return np.frombuffer(docs, np.int64), np.frombuffer(codes, np.float64)


def field_values(db: sqlite3.Connection, field: Field, codes: Codes | None) -> tuple[np.ndarray, np.ndarray]:
    """(docs, numbers) of the live products holding a value of the field (SQLite's JSON functions pick
    the value; the rare row SQLite cannot read, an old one holding `Infinity`, is read by Python)."""
    path = '$."' + field.name + '"'
    docs, values = [], []
    for doc, kind, value in db.execute(
            "SELECT doc_id, json_type(attributes, ?), json_extract(attributes, ?) FROM products "
            "WHERE doc_id IS NOT NULL AND json_valid(attributes) "
            "AND json_type(attributes, ?) IN ('true', 'false', 'integer', 'real', 'text')",
            (path, path, path)):
        value = typed(field, kind == "true" if kind in ("true", "false") else value)
        if value is not None:
            docs.append(doc)
            values.append(value)
    for doc, text in db.execute("SELECT doc_id, attributes FROM products "
                                "WHERE doc_id IS NOT NULL AND NOT json_valid(attributes)"):
        try:
            value = typed(field, json.loads(text).get(field.name))
        except (ValueError, AttributeError):
            continue  # not an object at all: the product has no value for the field
        if value is not None:
            docs.append(doc)
            values.append(value)
    return np.array(docs, np.int64), numbers(field, codes, values)


def current_states(db: sqlite3.Connection, product_ids: set[str]) -> dict[str, ProductRow]:
    """The products' rows as a commit holds them (the description from the keyword index, which alone
    keeps it)."""
    states = {}
    ids = list(product_ids)
    for start in range(0, len(ids), 500):
        chunk = json.dumps(ids[start:start + 500], ensure_ascii=False)  # one statement shape (products_by_doc)
        for row in db.execute("SELECT p.product_id, p.version, p.doc_id, p.shop_id, p.title, p.image_url, "
                              "p.attributes, p.embedded_at, coalesce(l.description, '') FROM products p "
                              "LEFT JOIN lexical l ON l.rowid = p.doc_id "
                              "WHERE p.product_id IN (SELECT value FROM json_each(?))", (chunk,)):
            states[row[0]] = ProductRow(*row)
    return states


def products_by_doc(db: sqlite3.Connection, docs: Sequence[int]) -> dict[int, ProductRow]:
    """The rows of those docs that are live. One statement whatever the number: sqlite3 keeps each
    distinct statement prepared (128 per connection, a connection per thread), so `IN (?, ?, ...)` of
    every length grew memory with the page size."""
    return {row[2]: ProductRow(*row, "") for row in db.execute(
        f"SELECT {', '.join(PRODUCT_COLUMNS)} FROM products WHERE doc_id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(docs)),))}


def doc_of(db: sqlite3.Connection, product_id: str) -> int | None:
    """The product's live doc, or None."""
    row = db.execute("SELECT doc_id FROM products WHERE product_id = ?", (product_id,)).fetchone()
    return None if row is None else row[0]


def live_products(db: sqlite3.Connection) -> dict[str, tuple[int, str]]:
    """product_id → (version, shop_id) of every product with a live vector."""
    return {pid: (version, shop) for pid, version, shop in
            db.execute("SELECT product_id, version, shop_id FROM products WHERE doc_id IS NOT NULL")}


def lexical_matches(db: sqlite3.Connection, match: str, rank: str, limit: int,
                    within: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(doc, BM25 rank) of the best `limit` keyword matches, among `within` docs if given; ties (equal
    BM25) in doc order, so a deeper page's list begins with a shallower one's."""
    sql = f"SELECT rowid, {rank} FROM lexical WHERE lexical MATCH ?"
    if within is None:
        return db.execute(f"{sql} ORDER BY {rank}, rowid LIMIT ?", (match, limit)).fetchall()
    return db.execute(f"{sql} AND rowid IN (SELECT value FROM json_each(?)) ORDER BY {rank}, rowid LIMIT ?",
                      (match, json.dumps(within.tolist()), limit)).fetchall()


def attributes_json(record: EmbeddingRecord) -> str:
    # allow_nan=False: records refuse non-finite numbers (schemas), and SQLite's JSON could not read them.
    return json.dumps(dict(record.attributes), ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def attributes(text: str) -> dict:
    """A product row's attributes. Rows written before non-finite numbers were refused may hold
    `Infinity` or `NaN`: read as null, so a hit can always be sent as JSON."""
    values = json.loads(text) if text else {}
    return values if non_finite_number(values) is None else _finite(values)


def _finite(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
