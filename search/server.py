"""The query service: `POST /v1/search`, `GET /healthz`, `GET /metrics`, and a search page at `/`.

    python -m search.server --index_dir index/ --port 8080 [--model SPEC]

Built on FastAPI (validation, error responses) served by uvicorn, with prometheus_client for
metrics. It embeds text and image queries with the index's own model, asks every shard for k
results and merges, and picks up new commits without a restart (it refreshes its view of the
index at most every `refresh_secs`). It never imports Beam.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_handlers.projection import model_id, split_model_id
from search.mirror import is_remote
from search.query import QueryEmbedder, QueryError
from search.sharded import ShardedIndex
from search.store import IndexMismatch
from transforms.download import FetchConfig

__all__ = ["DEFAULT_EF_SEARCH", "SearchRequest", "create_app", "main", "open_service"]

DEFAULT_EF_SEARCH = 256
PAGE = (Path(__file__).resolve().parent / "static" / "index.html").read_text(encoding="utf-8")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=10_000)
    vector: list[float] | None = None
    image_url: str | None = Field(None, max_length=4096)
    k: int = Field(10, ge=1, le=1000, description="results wanted (the page size)")
    ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=20_000, description="HNSW search breadth, independent of k")
    shop_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def one_query(self):
        given = [name for name in ("text", "vector", "image_url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, vector, image_url (got {', '.join(given) or 'none'})")
        return self


def create_app(index: ShardedIndex, embedder: QueryEmbedder, refresh_secs: float = 0.2) -> FastAPI:
    app = FastAPI(title="product search", docs_url="/docs")
    registry = CollectorRegistry()
    requests_total = Counter("search_requests_total", "Search requests by outcome", ["outcome"], registry=registry)
    latency = Histogram("search_latency_seconds", "Search request latency, query embedding included",
                        ["kind"], registry=registry)
    live_docs = Gauge("index_live_docs", "Live documents in the index", registry=registry)
    generation = Gauge("index_generation", "Sum of the shards' commit generations", registry=registry)
    state = {"refreshed": 0.0}
    lock = threading.Lock()

    def refresh() -> None:
        with lock:
            if time.monotonic() - state["refreshed"] >= refresh_secs:
                index.refresh()
                state["refreshed"] = time.monotonic()
                stats = index.stats()
                live_docs.set(stats["live_docs"])
                generation.set(stats["generation"])

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError):
        requests_total.labels("bad_request").inc()
        messages = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"error": "; ".join(messages)}, status_code=400)

    @app.post("/v1/search")
    def search(request: SearchRequest):
        started = time.perf_counter()
        kind = "text" if request.text is not None else "vector" if request.vector is not None else "image"
        try:
            if kind == "vector":
                vector = embedder.vector(request.vector)
            elif kind == "text":
                vector = embedder.text(request.text)
            else:
                vector = embedder.image_url(request.image_url)
            refresh()
            hits = index.search(vector, k=request.k, ef_search=request.ef_search, shop_id=request.shop_id)
        except (QueryError, IndexMismatch) as e:
            requests_total.labels("bad_request").inc()
            return JSONResponse({"error": str(e)}, status_code=400)
        took = time.perf_counter() - started
        latency.labels(kind).observe(took)
        requests_total.labels("ok").inc()
        return {"results": [hit.__dict__ for hit in hits], "took_ms": round(took * 1000, 3)}

    @app.get("/healthz")
    def healthz():
        refresh()
        stats = index.stats()
        return {"status": "ok", "model": index.model, "dim": index.dim, "live_docs": stats["live_docs"],
                "generation": stats["generation"], "num_shards": index.num_shards}

    @app.get("/metrics")
    def metrics():
        refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def open_service(index_dir: str, model: str | None = None, projection: str = "", device: str = "auto",
                 fetch: FetchConfig = FetchConfig(), cache_dir: str | None = None) -> tuple[ShardedIndex, QueryEmbedder]:
    """The index and a query embedder that makes vectors of its space; ValueError when they can't match."""
    index = ShardedIndex.open(index_dir, cache_dir=Path(cache_dir) if cache_dir else None)
    index_spec, index_head = split_model_id(index.model)
    spec = model or index_spec
    query_model = model_id(spec, projection)
    if query_model != index.model:
        hint = f" (its vectors were tuned by head {index_head}: pass that --projection)" if index_head else ""
        raise ValueError(f"queries would be embedded as {query_model}, the index holds {index.model}: "
                         f"vectors would not be comparable{hint}")
    return index, QueryEmbedder(spec, index.dim, device, fetch, projection=projection)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve product search over an index directory.")
    parser.add_argument("--index_dir", required=True, help="A local path, or gs://... (replicated locally).")
    parser.add_argument("--cache_dir", help="Where a remote index is replicated (default: a new temporary dir).")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", help="Query model spec; must be the index's (default: the index's model).")
    parser.add_argument("--projection", default="",
                        help="The top-tuned head the index's vectors went through; required when the index "
                             "holds tuned vectors (its model id says which head).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--allow_private_hosts", action="store_true",
                        help="Allow image-URL queries on loopback (local runs and tests).")
    args = parser.parse_args(argv)
    try:
        index, embedder = open_service(args.index_dir, args.model, args.projection, args.device,
                                       FetchConfig(allow_private_hosts=args.allow_private_hosts), args.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    # A remote index is polled for new commits (an object listing per shard) less often.
    refresh_secs = 1.0 if is_remote(args.index_dir) else 0.2
    uvicorn.run(create_app(index, embedder, refresh_secs), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
