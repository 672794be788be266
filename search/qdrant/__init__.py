"""The Qdrant backend: the collection the index pipeline writes (`collection`) and the queries the
search service runs on it (`index`)."""
