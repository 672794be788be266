"""Answering a query over an index store: the query's vector (embedder), its scope (a shop and a filter
as a doc set), the plan per segment, and the searcher that runs it."""
