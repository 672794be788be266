"""Products: `GET /v1/products/{id}/similar` (products like this one), `GET /v1/products/{id}/vector`
(its stored vector) and `POST /v1/similar` (candidates like a vector, with their vectors: the router's
half of similar products). `:path`: a product id may hold `/` (Shopify's gid://shopify/Product/1), raw
or as %2F."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from search.http.app import error, json_param
from search.http.models import (DEFAULT_EF_SEARCH, MAX_EF_SEARCH, MAX_SIMILAR_K, ErrorResponse, ProductVector,
                                SearchResponse, SimilarCandidates, SimilarHit, SimilarRequest, WholeNumber)
from search.http.routes.search import checked_scope
from search.http.service import Service, served
from search.serving import Served

router = APIRouter()
NOT_HERE = {404: {"model": ErrorResponse, "description": "no live product of that id here"}}


@router.get("/v1/products/{product_id:path}/similar", response_model=SearchResponse,
            responses={400: {"model": ErrorResponse, "description": "a bad filter or parameter"}, **NOT_HERE})
def similar(product_id: str, http: Request, current: Annotated[Served, Depends(served)],
            k: Annotated[WholeNumber, Query(ge=1, le=MAX_SIMILAR_K)] = 10,
            shop_id: str | None = Query(None, max_length=256),
            filter: str | None = Query(None, max_length=10_000, description="a filter, as JSON"),
            ef_search: Annotated[WholeNumber, Query(ge=1, le=MAX_EF_SEARCH)] = DEFAULT_EF_SEARCH):
    """Products like this one, by its stored vector: the product itself left out and near-duplicates
    (cosine ≥ search.sharded.DUPLICATE_COSINE with one already listed) collapsed."""
    service: Service = http.app.state.service
    started = time.perf_counter()
    index = current.index
    parsed = checked_scope(json_param("filter", filter), [], {}, index.filterable)
    vector = index.product_vector(product_id)
    if vector is None:
        return error(404, f"no live product {product_id!r} in the shards this service serves")
    hits = index.similar(vector, k, ef_search, shop_id, parsed, exclude=product_id)
    return {"results": hits, "mode": "vector", "model": index.model, "index": current.name,
            "took_ms": service.answered("similar", started)}


@router.get("/v1/products/{product_id:path}/vector", response_model=ProductVector, responses=NOT_HERE)
def product_vector(product_id: str, current: Annotated[Served, Depends(served)]):
    """A product's stored vector (from the replica that serves its shard: search.router asks them all)."""
    vector = current.index.product_vector(product_id)
    if vector is None:
        return error(404, f"no live product {product_id!r} in the shards this service serves")
    return {"product_id": product_id, "vector": vector.tolist(), "model": current.index.model}


@router.post("/v1/similar", response_model=SimilarCandidates,
             responses={400: {"model": ErrorResponse, "description": "a bad request; `error` says why"}})
def similar_to(request: SimilarRequest, http: Request, current: Annotated[Served, Depends(served)]):
    """Products like a given vector, over the shards this replica serves, with each result's vector:
    search.router's half of `GET /v1/products/{id}/similar` (it collapses across replicas)."""
    service: Service = http.app.state.service
    started = time.perf_counter()
    index = current.index
    parsed = checked_scope(request.filter, [], {}, index.filterable)
    vector = current.embedder.vector(request.vector)
    pairs = index.similar(vector, request.k, request.ef_search, request.shop_id, parsed, exclude=request.exclude,
                          with_vectors=True)
    return {"results": [SimilarHit(**dataclasses.asdict(hit), vector=v.tolist()) for hit, v in pairs],
            "mode": "vector", "model": index.model, "took_ms": service.answered("similar", started),
            "shards": index.shard_ids}
