"""The query service: `POST /v1/search`, `GET /v1/products/{id}/similar`, `GET /healthz`, `GET /metrics`,
and a search page at `/`.

    python -m search.server --index_dir index/ --port 8080 [--model SPEC]
    python -m search.server --index_dir indexes/ --alias live    # follows the alias (search.aliases)

Built on FastAPI (validation, the OpenAPI document at /docs) served by uvicorn, with
prometheus_client for metrics. It embeds text and image queries with the index's own model, asks
every shard for k results and merges, and picks up new commits without a restart (it refreshes
its view of the index at most every `refresh_secs`). Text queries are matched by keywords too
(BM25 over title, description and the declared keyword attributes) and fused with the vector
results by rank (search.hybrid); attribute filters and facets use the index's declared fields. The request body is JSON whatever its
Content-Type says (`curl -d` sends a form type); every error is `{"error": "..."}`. It never
imports Beam.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import storage
from argtypes import bounded
from schemas import non_finite_number
from model_handlers.config import ModelConfig, model_id, split_model_id
from search.aliases import index_path
from search.filters import FilterError, parse_filter
from search.query import QueryEmbedder, QueryError, runs_here
from search.serving import AliasFollower, Fixed, Served
from search.sharded import HEAD_FILE, ShardedIndex
from search.store import IndexMismatch
from media.download import FetchConfig

__all__ = ["DEFAULT_EF_SEARCH", "SearchRequest", "SearchResponse", "build_parser", "create_app", "main",
           "open_service", "serve"]

_log = logging.getLogger("search.server")
DEFAULT_EF_SEARCH = 256
MAX_BODY_BYTES = 1024 * 1024  # a 20,000-d vector as JSON is ~0.5 MB; anything larger is refused unread
IMAGE_QUERY_SLOTS = 8  # image queries fetching at once; the rest wait without holding a thread
HEADER_TIMEOUT_SECS = 10.0
MAX_EF_SEARCH = 20_000  # search breadth a request may ask for
MAX_SIMILAR_K = 100  # similar products a request may ask for
MAX_DEPTH = 1000  # offset + k: deeper pages than a shopper reads cost every shard that many results
MAX_FACET_VALUES = 100  # values per facet returned, the most frequent
PAGE = (Path(__file__).resolve().parent / "static" / "index.html").read_text(encoding="utf-8")


def _digits(value: Any) -> Any:
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number, like 10")
    return value


# A whole number in a query string: `k=2.0` or `k=true` is as wrong there as `"k": 2.0` in a body.
WholeNumber = Annotated[int, BeforeValidator(_digits)]
# A query vector: numbers only (a string or a boolean is a mistake, not a number), all finite.
QueryVector = list[Annotated[float, Strict()]]


class SearchRequest(BaseModel):
    # NaN, Infinity and 1e400 (read as inf) are refused wherever a number goes: a bucket edge of inf
    # made null edges and a NaN one negative counts.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(None, max_length=10_000, description="a text query (needs the index's model)")
    vector: QueryVector | None = Field(None, description="a query vector of the index's dimension")
    image_url: str | None = Field(None, max_length=4096, description="an image to search by (needs the model)")
    k: int = Field(10, ge=1, le=1000, strict=True, description="results wanted (the page size)")
    ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=MAX_EF_SEARCH, strict=True,
                           description="search breadth, independent of k: HNSW's efSearch; for the "
                                       "compressed kinds also the candidates re-scored exactly")
    shop_id: str | None = Field(None, max_length=256, description="only this shop's products")
    offset: int = Field(0, ge=0, strict=True, description="results to skip (a page is offset..offset+k; "
                                                          "offset + k at most 1000)")
    filter: dict | None = Field(None, description="attribute conditions the results meet (search.filters): "
                                                  '{"brand": "acme", "price": {"gte": 10, "lt": 50}, '
                                                  '"or": [...]}, on the index\'s filterable fields')
    facets: list[str] = Field([], max_length=16, description="fields to count the filtered matches by")
    facet_buckets: dict[str, list[float]] = Field({}, description="numeric facets: bucket edges per field, "
                                                                   "e.g. {\"price\": [0, 25, 50, 100]}")
    mode: Literal["vector", "lexical", "hybrid"] | None = Field(
        None, description="vector: by embedding; lexical: by keywords (BM25); hybrid: both, fused by "
                          "reciprocal rank (default for text queries; vector for the others)")
    lexical_weight: float = Field(1.0, ge=0, le=10, description="hybrid: the keyword list's weight in the "
                                                               "fusion (the vector list's is 1)")
    fusion_window: int | None = Field(None, ge=1, le=MAX_DEPTH, strict=True,
                                      description="hybrid: how deep each list goes into the fusion (default "
                                                  "max(100, k)); pages of one page size run through one fused "
                                                  "list, so they never repeat or skip a product")

    @model_validator(mode="after")
    def one_query(self):
        given = [name for name in ("text", "vector", "image_url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, vector, image_url (got {', '.join(given) or 'none'})")
        if self.mode in ("lexical", "hybrid") and self.text is None:
            raise ValueError(f"mode {self.mode} needs a text query")
        if self.offset + self.k > MAX_DEPTH:
            raise ValueError(f"offset + k is {self.offset + self.k}, over {MAX_DEPTH}")
        return self

    @property
    def search_mode(self) -> str:
        return self.mode or ("hybrid" if self.text is not None else "vector")


class SearchHit(BaseModel):
    product_id: str
    shop_id: str
    score: float = Field(description="vector mode: cosine similarity to the query; lexical: BM25; hybrid: the "
                                     "reciprocal-rank-fusion score")
    version: int
    title: str
    image_url: str
    attributes: dict = Field({}, description="the product's attributes, as its event sent them")
    embedded_at: str = Field("", description="when the model embedded this version (RFC 3339)")
    generation: int = Field(0, description="the commit generation of the shard that served it")


class SimilarHit(SearchHit):
    vector: list[float] = Field(description="the product's stored vector")


class SimilarCandidates(BaseModel):
    results: list[SimilarHit]
    mode: str = "vector"
    model: str = ""
    took_ms: float
    shards: list[int] = Field([], description="the index's shards that answered (search.router checks that no "
                                               "shard is counted twice)")


class SimilarRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    vector: QueryVector = Field(description="the product's stored vector (GET /v1/products/{id}/vector)")
    exclude: str = Field("", max_length=256, description="the product itself, left out")
    k: int = Field(10, ge=1, le=MAX_SIMILAR_K, strict=True)
    ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=MAX_EF_SEARCH, strict=True)
    shop_id: str | None = Field(None, max_length=256)
    filter: dict | None = None


class ProductVector(BaseModel):
    product_id: str
    vector: list[float]
    model: str = Field("", description="the model id of the vector's index")


class FacetCount(BaseModel):
    value: Any = Field(description="a field value, or for a numeric facet the bucket [from, to)")
    count: int


class SearchResponse(BaseModel):
    results: list[SearchHit]
    facets: dict[str, list[FacetCount]] = Field({}, description="per facet field, exact counts of the matches "
                                                                "(values by count; buckets in order)")
    mode: str = Field("vector", description="how the results were ranked")
    model: str = Field("", description="the model id of the index that answered (search.aliases: it changes "
                                       "when the alias moves to an index of another model)")
    index: str = Field("", description="the name of the index that answered, when the service follows an alias")
    took_ms: float
    partial: bool = Field(False, description="true when some shards did not answer (search.router): the "
                                             "results are the best of the others")
    missing_shards: list[int] = Field([], description="the shards whose results are missing")
    shards: list[int] = Field([], description="the index's shards that answered: a service's own, or through "
                                               "search.router every backend's (it checks that none is counted twice)")


class ErrorResponse(BaseModel):
    error: str


class Health(BaseModel):
    status: str = Field(description="ok, or degraded: a shard's newest generation failed to load")
    model: str
    dim: int
    index: str = Field("", description="the index served, when the service follows an alias (--alias)")
    live_docs: int
    generation: int = Field(description="the generation served (summed over shards)")
    num_shards: int
    shards: list[int] = Field(description="the index's shards this service serves")
    queries: list[str] = Field(description="the query kinds this service answers")
    filterable: list[str] = Field([], description="the index's filterable fields (name or name:type)")
    errors: dict[str, str] = Field({}, description="shard → why its newest generation is not served")


class _JsonBody:
    """ASGI middleware: a POST body is JSON, whatever Content-Type the client sent (or none), and
    at most `limit` bytes: a larger one is answered 413 before it is read or parsed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _error(413, f"the body is over {self.limit} bytes")(scope, receive, send)
            return
        body, more = b"", True
        while more:  # a chunked body is counted as it comes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _error(413, f"the body is over {self.limit} bytes")(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, replay, send)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose first request's headers have not all
    arrived within `header_timeout` seconds (uvicorn itself waits for ever: idle sockets pile up)."""

    header_timeout = HEADER_TIMEOUT_SECS

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self):
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self):
        self._header_timer.cancel()
        super().on_headers_complete()

    def connection_lost(self, exc):
        self._header_timer.cancel()
        super().connection_lost(exc)


class ImageQueriesBusy(RuntimeError):
    """An image query could not get a fetch slot and finish within its deadline: a 503."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index: ShardedIndex | None, embedder: QueryEmbedder | None, refresh_secs: float = 0.2,
               image_timeout_secs: float | None = None, image_slots: int = IMAGE_QUERY_SLOTS,
               follower: AliasFollower | None = None) -> FastAPI:
    """Serves `index` with `embedder`, or (`follower`) the index an alias names, as it moves.
    `image_timeout_secs`: the most an image query may take, waiting for a slot included (default:
    the embedder's download deadline)."""
    source = follower or Fixed(Served(index, embedder))
    app = FastAPI(title="product search", docs_url="/docs")
    app.add_middleware(_JsonBody)
    image_limiter = anyio.CapacityLimiter(image_slots)
    image_timeout = image_timeout_secs or source.current().embedder.fetch_timeout_s
    registry = CollectorRegistry()
    requests_total = Counter("search_requests_total", "Search requests by outcome", ["outcome"], registry=registry)
    latency = Histogram("search_latency_seconds", "Search request latency, query embedding included",
                        ["kind"], registry=registry)
    live_docs = Gauge("index_live_docs", "Live documents in the index", registry=registry)
    generation = Gauge("index_generation", "Sum of the shards' commit generations", registry=registry)
    failed_reloads = Counter("index_reload_failures_total", "New generations that failed to load (the last "
                             "good one kept serving)", registry=registry)
    state = {"refreshed": 0.0, "failed": 0}
    lock = threading.Lock()

    def refresh(index: ShardedIndex) -> None:
        source.check()
        with lock:
            if time.monotonic() - state["refreshed"] >= refresh_secs:
                index.refresh()
                state["refreshed"] = time.monotonic()
                if state.get("index") is not index:  # an alias moved: the new index counts from 0
                    state["index"], state["failed"] = index, 0
                failed_reloads.inc(index.failed_reloads - state["failed"])
                state["failed"] = index.failed_reloads
                stats = index.stats()
                live_docs.set(stats["live_docs"])
                generation.set(stats["generation"])

    def answered(kind: str, started: float) -> float:
        """Counts a request that succeeded, observes its latency; its milliseconds, for `took_ms`."""
        took = time.perf_counter() - started
        latency.labels(kind).observe(took)
        requests_total.labels("ok").inc()
        return round(took * 1000, 3)

    def vector_of(embedder: QueryEmbedder, request: SearchRequest):
        if request.vector is not None:
            return embedder.vector(request.vector)
        if request.search_mode == "lexical":
            return None  # keywords only: no model needed
        return embedder.text(request.text)

    async def image_vector(embedder: QueryEmbedder, url: str):
        """Fetches in a thread of the image pool, within the query's deadline (its wait included):
        slow image hosts hold image slots, never the threads text and vector queries run on."""
        deadline = time.monotonic() + image_timeout
        try:
            with anyio.fail_after(image_timeout):
                return await anyio.to_thread.run_sync(embedder.image_url, url, deadline, limiter=image_limiter)
        except TimeoutError:
            raise ImageQueriesBusy(f"image query did not finish within {image_timeout:g} s: "
                                   f"{image_slots} image queries were already fetching") from None

    def search_index(index: ShardedIndex, vector, request: SearchRequest, filter):
        refresh(index)
        hits = index.search(vector, k=request.k, ef_search=request.ef_search, shop_id=request.shop_id, filter=filter,
                            text=request.text, mode=request.search_mode, lexical_weight=request.lexical_weight,
                            offset=request.offset, fusion_window=request.fusion_window)
        counts = index.facets(request.facets, request.shop_id, filter, request.facet_buckets) if request.facets else {}
        return hits, _facet_lists(counts, request.facet_buckets)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError):
        requests_total.labels("bad_request").inc()
        messages = ["the body is not valid JSON" if e["type"] == "json_invalid" else
                    f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        return _error(400, "; ".join(messages))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.post("/v1/search", response_model=SearchResponse,
              responses={400: {"model": ErrorResponse, "description": "a bad request; `error` says why"},
                         413: {"model": ErrorResponse, "description": "the body is too large"},
                         503: {"model": ErrorResponse, "description": "image queries are all busy"}})
    async def search(request: SearchRequest):
        started = time.perf_counter()
        kind = "text" if request.text is not None else "vector" if request.vector is not None else "image"
        with source.use() as served:  # a request finishes on the index and model it started with
            index, embedder = served.index, served.embedder
            try:
                filter = _checked_scope(request.filter, request.facets, request.facet_buckets, index.filterable)
                if kind == "image":
                    vector = await image_vector(embedder, request.image_url)
                elif kind == "text" and request.search_mode == "hybrid":
                    vector = functools.partial(embedder.text, request.text)  # embedded while the keywords match
                else:
                    vector = await run_in_threadpool(vector_of, embedder, request)
                hits, facets = await run_in_threadpool(search_index, index, vector, request, filter)
            except ImageQueriesBusy as e:
                requests_total.labels("busy").inc()
                return _error(503, str(e))
            except (QueryError, IndexMismatch, FilterError) as e:
                requests_total.labels("bad_request").inc()
                return _error(400, str(e))
            return {"results": [hit.__dict__ for hit in hits], "facets": facets, "mode": request.search_mode,
                    "model": index.model, "index": served.name, "took_ms": answered(kind, started),
                    "shards": index.shard_ids}

    # `:path`: a product id may hold `/` (Shopify's gid://shopify/Product/1), raw or as %2F.
    @app.get("/v1/products/{product_id:path}/similar", response_model=SearchResponse,
             responses={400: {"model": ErrorResponse, "description": "a bad filter or parameter"},
                        404: {"model": ErrorResponse, "description": "no live product of that id here"}})
    def similar(product_id: str, k: Annotated[WholeNumber, Query(ge=1, le=MAX_SIMILAR_K)] = 10,
                shop_id: str | None = Query(None, max_length=256),
                filter: str | None = Query(None, max_length=10_000, description="a filter, as JSON"),
                ef_search: Annotated[WholeNumber, Query(ge=1, le=MAX_EF_SEARCH)] = DEFAULT_EF_SEARCH):
        """Products like this one, by its stored vector: the product itself left out and near-duplicates
        (cosine ≥ search.sharded.DUPLICATE_COSINE with one already listed) collapsed."""
        started = time.perf_counter()
        with source.use() as served:
            index = served.index
            try:
                parsed = _checked_scope(_json_param("filter", filter), [], {}, index.filterable)
            except FilterError as e:
                requests_total.labels("bad_request").inc()
                return _error(400, str(e))
            refresh(index)
            vector = index.product_vector(product_id)
            if vector is None:
                return _error(404, f"no live product {product_id!r} in the shards this service serves")
            hits = index.similar(vector, k, ef_search, shop_id, parsed, exclude=product_id)
            return {"results": [hit.__dict__ for hit in hits], "mode": "vector", "model": index.model,
                    "index": served.name, "took_ms": answered("similar", started)}

    @app.get("/v1/products/{product_id:path}/vector", response_model=ProductVector,
             responses={404: {"model": ErrorResponse, "description": "no live product of that id here"}})
    def product_vector(product_id: str):
        """A product's stored vector (from the replica that serves its shard: search.router asks them all)."""
        with source.use() as served:
            refresh(served.index)
            vector = served.index.product_vector(product_id)
            if vector is None:
                return _error(404, f"no live product {product_id!r} in the shards this service serves")
            return {"product_id": product_id, "vector": vector.tolist(), "model": served.index.model}

    @app.post("/v1/similar", response_model=SimilarCandidates,
              responses={400: {"model": ErrorResponse, "description": "a bad request; `error` says why"}})
    def similar_to(request: SimilarRequest):
        """Products like a given vector, over the shards this replica serves, with each result's vector:
        search.router's half of `GET /v1/products/{id}/similar` (it collapses across replicas)."""
        started = time.perf_counter()
        with source.use() as served:
            index = served.index
            try:
                parsed = _checked_scope(request.filter, [], {}, index.filterable)
                vector = served.embedder.vector(request.vector)
            except (FilterError, QueryError) as e:
                requests_total.labels("bad_request").inc()
                return _error(400, str(e))
            refresh(index)
            pairs = index.similar(vector, request.k, request.ef_search, request.shop_id, parsed,
                                  exclude=request.exclude, with_vectors=True)
            return {"results": [{**hit.__dict__, "vector": v.tolist()} for hit, v in pairs], "mode": "vector",
                    "model": index.model, "took_ms": answered("similar", started), "shards": index.shard_ids}

    @app.get("/healthz", response_model=Health)
    def healthz():
        with source.use() as served:
            index = served.index
            refresh(index)
            stats = index.stats()
            errors = {str(shard): error for shard, error in sorted(index.reload_errors.items())}
            if source.error:
                errors["alias"] = source.error
            return {"status": "degraded" if errors else "ok", "model": index.model, "dim": index.dim,
                    "index": served.name, "live_docs": stats["live_docs"], "generation": stats["generation"],
                    "num_shards": index.num_shards, "shards": index.shard_ids, "queries": list(served.embedder.kinds),
                    "errors": errors, "filterable": [str(field) for field in index.filterable]}

    @app.get("/livez")
    def livez():
        """Answers while the process runs, whatever the index's state: for autohealing (a replica still
        restoring its shards is not broken), where /healthz is for load balancing."""
        return {"status": "alive"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics():
        with source.use() as served:
            refresh(served.index)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    _document_errors_as_sent(app)
    return app


def _json_param(name: str, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise FilterError(f"{name}: not valid JSON ({e})") from None
    except RecursionError:
        raise FilterError(f"{name}: nested too deep to read") from None


def _checked_scope(filter_data: Any, facets: list[str], buckets: dict[str, list[float]], fields) -> Any:
    """The parsed filter (None without one); FilterError naming what does not fit the index's fields."""
    where = non_finite_number(filter_data, "filter")
    if where is not None:
        raise FilterError(f"{where} is not a finite number")
    by_name = {f.name: f for f in fields}
    for name in facets:
        if name not in by_name:
            raise FilterError(f"facets: {name!r} is not a filterable field of this index (filterable: "
                              f"{', '.join(sorted(by_name)) or 'none: the index declares no --filterable'})")
        if by_name[name].type == "float" and name not in buckets:
            raise FilterError(f"facets: {name} is a float field: give its bucket edges in facet_buckets")
    for name, edges in buckets.items():
        if name not in facets or not by_name[name].numeric:
            raise FilterError(f"facet_buckets.{name}: buckets are for numeric fields listed in facets")
        if not 2 <= len(edges) <= 51 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise FilterError(f"facet_buckets.{name}: give 2 to 51 increasing edges")
    return None if filter_data is None else parse_filter(filter_data, tuple(fields))


def _facet_lists(counts: dict[str, dict], buckets: dict[str, list[float]]) -> dict[str, list[dict]]:
    """Store counts → the response's lists: values by count (the MAX_FACET_VALUES most), buckets in order."""
    out = {}
    for name, part in counts.items():
        if "buckets" in part:
            edges = buckets[name]
            out[name] = [{"value": [a, b], "count": c} for a, b, c in zip(edges, edges[1:], part["buckets"])]
        else:
            ranked = sorted(part["values"].items(), key=lambda item: (-item[1], str(item[0])))
            out[name] = [{"value": value, "count": count} for value, count in ranked[:MAX_FACET_VALUES]]
    return out


def _document_errors_as_sent(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own error shape; this service answers 400 `{"error"}` instead."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def open_service(index_dir: str, model: str | None = None, projection: str = "", device: str = "auto",
                 fetch: FetchConfig = FetchConfig(), cache_dir: str | None = None,
                 shards: str | None = None) -> tuple[ShardedIndex, QueryEmbedder]:
    """The index (or the `shards` of it) and a query embedder that makes vectors of its space;
    ValueError when they can't match."""
    index = ShardedIndex.open(index_dir, cache_dir=Path(cache_dir) if cache_dir else None, shards=shards)
    index_spec, index_head = split_model_id(index.model)
    spec = model or index_spec
    kept = f"{str(index_dir).rstrip('/')}/{HEAD_FILE}"
    if index_head and not projection and storage.exists(kept):
        projection = kept  # the head the index's vectors went through, kept with it (pipelines.index --projection)
    query_model = ModelConfig(spec=spec, projection=projection).model_id if runs_here(spec) else model_id(spec)
    if query_model != index.model:
        hint = f" (its vectors were tuned by head {index_head}: pass that --projection)" if index_head else ""
        raise ValueError(f"queries would be embedded as {query_model}, the index holds {index.model}: "
                         f"vectors would not be comparable{hint}")
    return index, QueryEmbedder(spec, index.dim, device, fetch, projection=projection)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    # A one-line usage, as the pipelines': a refused value is that line and the one naming the flag.
    parser = argparse.ArgumentParser(prog="python -m search.server", usage="%(prog)s --index_dir DIR [options]",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index_dir", required=True, help="A local path, or gs://... (replicated locally); with "
                                                          "--alias, the root of named indexes.")
    parser.add_argument("--alias", help="Serve the index this alias of INDEX_DIR/aliases.json names, and follow it: "
                                        "when it moves, the new index and its model are opened and warmed, then "
                                        "swapped in; requests in flight finish on the old one (search.aliases).")
    parser.add_argument("--cache_dir", help="Where a remote index is replicated (none: a new temporary dir).")
    parser.add_argument("--shards", help="Serve only these of the index's shards, e.g. 0-3 or 0,2 (a replica behind "
                                         "python -m search.router; none: all of them).")
    parser.add_argument("--port", type=_port, default=8080, help="Port to serve on (0: any free port).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--model", help="Query model spec; must be the index's (none: the index's model).")
    parser.add_argument("--projection",
                        help="The top-tuned head the index's vectors went through; required when the index "
                             "holds tuned vectors (its model id says which head).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Where the query model runs.")
    parser.add_argument("--allow_private_hosts", action="store_true",
                        help="Allow image-URL queries on loopback (local runs and tests).")

    # An image query longer than 5 minutes has lost its shopper; each slot holds one image download
    # (up to 20 MB) in memory. A header timeout is the slow-client guard: 0 or less closed every
    # connection, and minutes let a slow client hold a connection as long as it likes.
    parser.add_argument("--image_timeout_secs", type=bounded(float, 0.1, 300, "seconds"), default=10.0,
                        help="The most an image-URL query may take, its wait for a fetch slot included.")
    parser.add_argument("--image_query_slots", type=bounded(int, 1, 1024), default=IMAGE_QUERY_SLOTS,
                        help="Image-URL queries fetching at once; more wait, holding no thread.")
    parser.add_argument("--header_timeout_secs", type=bounded(float, 0.5, 300, "seconds"),
                        default=HEADER_TIMEOUT_SECS, help="A connection whose request headers take longer is closed.")
    return parser


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails in a moment, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    return sock


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        parser.exit(1, f"search.server: {e}\n")
    if args.alias and (args.model or args.projection):
        sock.close()
        parser.exit(2, "search.server: --alias follows each index's own model and head (pipelines.index "
                       "--projection keeps the head with the index): drop --model and --projection\n")
    fetch = FetchConfig(allow_private_hosts=args.allow_private_hosts, total_timeout_s=args.image_timeout_secs,
                        read_timeout_s=args.image_timeout_secs, connect_timeout_s=min(5.0, args.image_timeout_secs))

    def opener(name: str) -> Served:
        cache = f"{args.cache_dir.rstrip('/')}/{name}" if args.cache_dir else None
        return Served(*open_service(index_path(args.index_dir, name), None, "", args.device, fetch, cache,
                                    args.shards), name=name)

    follower = None
    try:
        if args.alias:
            follower = AliasFollower(args.index_dir, args.alias, opener)
            index, embedder = follower.current().index, follower.current().embedder
        else:
            index, embedder = open_service(args.index_dir, args.model, args.projection or "", args.device, fetch,
                                           args.cache_dir, args.shards)
    except (ValueError, FileNotFoundError) as e:
        sock.close()
        parser.exit(1, f"search.server: {e}\n")
    # A remote index is polled for new commits (an object listing per shard) less often.
    refresh_secs = 1.0 if storage.is_remote(args.index_dir) else 0.2
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    stats = index.stats()
    queries = "" if embedder.backend is not None else "; vector queries only: this service cannot run the model"
    served = f"{index.num_shards} shards" if len(index.shard_ids) == index.num_shards else \
        f"shards {','.join(map(str, index.shard_ids))} of {index.num_shards}"
    alias = f"alias {args.alias} -> {follower.current().name}, " if follower else ""
    ready = (f"search page: http://{host}:{port}/ ({alias}{stats['live_docs']} products, {served}, "
             f"model {index.model}{queries})")
    app = create_app(index, embedder, refresh_secs, args.image_timeout_secs, args.image_query_slots, follower)
    protocol = type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout": args.header_timeout_secs})
    serve(app, sock, ready, _log, http=protocol)


def serve(app, sock: socket.socket, ready: str, log: logging.Logger, **config) -> None:
    """Runs `app` with uvicorn on the bound `sock`, logging `ready` once it accepts connections
    (what a user, a test or a deployment waits for); search.router serves the same way."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                log.info(ready)

    Server(uvicorn.Config(app, log_level="warning", **config)).run(sockets=[sock])


if __name__ == "__main__":
    main()
