"""`POST /v1/search`: text, image or vector queries, keywords and fusion, filters, facets and pages;
`POST /v1/embed`: a text or an image as the index's query vector (search.router embeds a query once
this way and sends the vector to every backend)."""

from __future__ import annotations

import functools
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from schemas import non_finite_number
from search.filters import FilterError, parse_filter
from search.http.app import BadRequest, error
from search.http.models import EmbedRequest, ErrorResponse, QueryVectorAnswer, SearchRequest, SearchResponse
from search.http.service import ImageQueriesBusy, Service, served
from search.merge import facet_lists
from search.serving import Served

router = APIRouter()
ERRORS = {400: {"model": ErrorResponse, "description": "a bad request; `error` says why"},
          413: {"model": ErrorResponse, "description": "the body is too large"},
          503: {"model": ErrorResponse, "description": "image queries are all busy"}}


@router.post("/v1/search", response_model=SearchResponse, responses=ERRORS)
async def search(request: SearchRequest, http: Request, current: Annotated[Served, Depends(served)]):
    service: Service = http.app.state.service
    started = time.perf_counter()
    index, embedder = current.index, current.embedder
    filter = checked_scope(request.filter, request.facets, request.facet_buckets, index.filterable)
    # A vector of another model (search.router embedded the query with a backend that serves another
    # index, during an alias switch) is left for the text or image it came with.
    given = request.vector is not None and request.vector_model in (None, index.model)
    if request.vector is not None and not given and request.kind == "vector":
        raise BadRequest(f"a vector of {request.vector_model}: this index holds {index.model}")
    try:
        if given:
            vector = embedder.vector(request.vector)
        elif request.image_url is not None:
            vector = await service.image_vector(embedder, request.image_url)
        elif request.search_mode == "lexical":
            vector = None  # keywords only: no model needed
        elif request.search_mode == "hybrid":
            embedder.require_backend("text")
            vector = functools.partial(service.text_vector, embedder, request.text)  # embedded while the keywords match
        else:
            vector = await run_in_threadpool(service.text_vector, embedder, request.text)
    except ImageQueriesBusy as e:
        service.requests.labels("busy").inc()
        return error(503, str(e))

    def run():
        hits = index.search(vector, k=request.k, ef_search=request.ef_search, shop_id=request.shop_id, filter=filter,
                            text=request.text, mode=request.search_mode, lexical_weight=request.lexical_weight,
                            offset=request.offset, fusion_window=request.fusion_window)
        counts = index.facets(request.facets, request.shop_id, filter, request.facet_buckets) if request.facets else {}
        return hits, facet_lists(counts, request.facet_buckets, request.facet_limit)

    hits, facets = await run_in_threadpool(run)
    return {"results": hits, "facets": facets, "mode": request.search_mode, "model": index.model,
            "index": current.name, "took_ms": service.answered(request.kind, started), "shards": index.shard_ids}


@router.post("/v1/embed", response_model=QueryVectorAnswer, responses=ERRORS)
async def embed(request: EmbedRequest, http: Request, current: Annotated[Served, Depends(served)]):
    """A text or an image as the index's query vector (unit length)."""
    service: Service = http.app.state.service
    try:
        if request.image_url is not None:
            vector = await service.image_vector(current.embedder, request.image_url)
        else:
            vector = await run_in_threadpool(service.text_vector, current.embedder, request.text)
    except ImageQueriesBusy as e:
        service.requests.labels("busy").inc()
        return error(503, str(e))
    return {"vector": vector.tolist(), "model": current.index.model}


def checked_scope(filter_data, facets: list[str], buckets: dict[str, list[float]], fields):
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
