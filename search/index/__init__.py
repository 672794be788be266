"""The index store, split where Lucene splits it: files on disk, the catalog (SQLite), the point-in-time
snapshot a search reads, the one writer and the readers. `search.store.IndexStore` puts them together."""
