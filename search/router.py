"""A router in front of search replicas that each serve some of an index's shards.

    python -m search.server --index_dir index/ --shards 0-1 --port 8081     # one replica per shard group
    python -m search.server --index_dir index/ --shards 2-3 --port 8082
    python -m search.router --backends http://127.0.0.1:8081,http://127.0.0.1:8082 --port 8080

It answers the search service's API and page. Each search goes to every backend at once, as it came
(the same k, ef_search and shop: each backend returns its shards' best k), and the hits are merged by
score, so the answer equals one service's over all the shards. A backend that fails, does not give
its whole answer within `--timeout_secs` (a deadline on the exchange, not per read: a trickling
backend is cut off) or answers in a shape the server never does (checked field by field) costs its
shards' hits, not the query: the answer says `partial: true`, which shards are missing and (`errors`)
why. `/healthz` shows each backend. Which shards a backend serves comes from its `/healthz`, asked at
start and every `--health_every_secs` after, each call with the same deadline; two backends may not
serve the same shard (their hits would be counted twice): a replica group's redundancy comes from
the load balancer in front of it, one URL per group. A search answer that covers a shard another
covers too (a backend restarted with other shards since its last check: the shards it names, or
else those its hits hash to) is left out at once and a check started. Backends that follow one
alias (`--alias`) serve two indexes for the moment of a switch; with the same shard count, each shard
is still served once, and the answer's `model` names both; a mix that lasts over `--max_switch_secs`
is refused as a misconfiguration. Product ids may hold any character (`/`, or be `.`): they are
routed as paths and sent to a backend as one percent-encoded segment. `/livez` answers while the
process runs (for autohealing, which must not recreate a router whose backends are still starting).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import time
from collections import defaultdict
from typing import Annotated

from urllib.parse import quote

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from argtypes import bounded
from search import merge
from search.hybrid import fusion_window
from search.http import app as http
from search.http.models import (MAX_EF_SEARCH, MAX_FACET_LIMIT, MAX_SIMILAR_K, SearchRequest,
                                SearchResponse, SimilarHit)
from search.http.routes import page
from search.query.searcher import Hit
from search.sharded import MAX_SHARDS, collapse_near_copies, shard_of

__all__ = ["Backends", "create_app", "main"]

_log = logging.getLogger("search.router")
HEALTH_EVERY_SECS = 5.0
# Backends that follow one alias serve two indexes only for the moments of a switch; a mix that lasts
# longer is two alias roots (or an index dir and an alias), and is refused as a misconfiguration.
MAX_SWITCH_SECS = 60.0
SIMILAR_K, SIMILAR_EF_SEARCH = (1, MAX_SIMILAR_K), (1, MAX_EF_SEARCH)  # as search.server's /v1/products/{id}/similar


# What a backend (search.server) answers, checked before anything is merged: a backend that answers
# another shape (or a score of true, NaN, a count as a string) counts as failing, never as a 500.
_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int or a finite float, never a bool
_Count = Annotated[int, Field(strict=True, ge=0)]
_Bucket = Annotated[list[_Number], Field(min_length=2, max_length=2)]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields a newer server adds pass through


class _Health(_Answer):
    status: StrictStr = "unknown"  # anything but ok counts as degraded
    model: StrictStr
    dim: Annotated[int, Field(strict=True, ge=1)]
    index: StrictStr = ""
    live_docs: _Count = 0
    num_shards: Annotated[int, Field(strict=True, ge=1, le=MAX_SHARDS)]
    shards: list[_Count]
    queries: list[StrictStr] = []
    filterable: list[StrictStr] = []
    features: list[StrictStr] = []

    @model_validator(mode="after")
    def shards_exist(self):
        if any(shard >= self.num_shards for shard in self.shards) or len(set(self.shards)) != len(self.shards):
            raise ValueError(f"shards {self.shards} are not distinct shards of {self.num_shards}")
        return self


class _Hit(_Answer):
    product_id: StrictStr
    shop_id: StrictStr
    score: _Number
    version: StrictInt
    title: StrictStr
    image_url: StrictStr
    attributes: dict = {}
    embedded_at: StrictStr = ""
    generation: StrictInt = 0


class _FacetCount(_Answer):
    value: StrictStr | StrictBool | StrictInt | _Number | _Bucket | None  # an int field's values stay ints
    count: _Count


class _SearchAnswer(_Answer):
    results: list[_Hit]
    facets: dict[str, list[_FacetCount]] = {}
    mode: StrictStr | None = None
    model: StrictStr = ""
    index: StrictStr = ""
    missing_shards: list[_Count] = []
    shards: list[_Count] | None = None  # the shards that answered, where the backend says


class _SimilarHit(_Hit):
    vector: Annotated[list[_Number], Field(min_length=1)]


class _SimilarAnswer(_SearchAnswer):
    results: list[_SimilarHit]


class _VectorAnswer(_Answer):
    product_id: StrictStr
    vector: Annotated[list[_Number], Field(min_length=1)]
    model: StrictStr = ""


EMBED = "embed"  # a backend's /healthz `features`: it embeds a query for the router and takes its vector


class _QueryVector(_Answer):
    vector: Annotated[list[_Number], Field(min_length=1)]
    model: StrictStr


def _validated(model: type[BaseModel], answer, what: str) -> tuple[dict | None, str]:
    """(the answer as `model` reads it, or None; why not)."""
    try:
        return model.model_validate(answer).model_dump(), ""
    except ValidationError as e:
        reasons = [f"{'.'.join(map(str, error['loc'])) or 'the answer'}: {error['msg']}" for error in e.errors()[:3]]
        more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
        return None, f"an unexpected answer to {what}: {'; '.join(reasons)}{more}"


def _error_text(answer) -> str | None:
    """The `error` of a backend's error answer, if it has one of the expected shape."""
    return answer["error"] if isinstance(answer, dict) and isinstance(answer.get("error"), str) else None


class Backends:
    """The backends, the shards each serves (from its /healthz), and the index they share."""

    def __init__(self, urls: list[str], timeout_secs: float, health_every_secs: float = HEALTH_EVERY_SECS,
                 max_switch_secs: float = MAX_SWITCH_SECS):
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout = timeout_secs
        self.health_every = health_every_secs
        self.max_switch = max_switch_secs
        self.health: dict[str, dict | None] = {url: None for url in self.urls}
        self.errors: dict[str, str] = {}
        self.misconfigured = ""  # why the backends cannot be merged (searches are refused meanwhile)
        self.mixed_since: float | None = None  # since when the backends have served different indexes
        self.mixed = ""  # which, while they do
        self.checked = 0.0
        self._checking: asyncio.Task | None = None
        self._checking_since = 0.0
        self._client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (the start-up check runs in its own loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            self._client = (loop, httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=256)))
        return self._client[1]

    async def check(self) -> None:
        """Asks every backend's /healthz; refuses backends of different indexes or overlapping shards."""
        answers = await asyncio.gather(*(self.get(url + "/healthz") for url in self.urls))
        for url, (status, body, error) in zip(self.urls, answers):
            health, why = _validated(_Health, body, "GET /healthz") if status == 200 else (None, "")
            if health is not None:
                self.health[url] = health
                self.errors.pop(url, None)
            else:  # its last good answer stays known (its shards are then reported missing)
                self.errors[url] = why or error or _error_text(body) or f"HTTP {status}"
        self.checked = time.monotonic()
        known = {url: h for url, h in self.health.items() if h}
        models = {(h["model"], h["dim"], h["num_shards"]) for h in known.values()}
        self.misconfigured = ""
        if len(models) > 1:
            self.mixed = str(sorted({(h["index"], h["model"], h["dim"], h["num_shards"]) for h in known.values()}))
            self.mixed_since = self.mixed_since or time.monotonic()
            if not self._moving(known):
                self.misconfigured = f"the backends serve different indexes: {sorted(models)}"
        else:
            self.mixed_since, self.mixed = None, ""
        seen: dict[int, str] = {}
        for url, h in known.items():
            for shard in h.get("shards", ()):
                if shard in seen and not self.misconfigured:
                    self.misconfigured = f"shard {shard} is served by both {seen[shard]} and {url}"
                seen[shard] = url
        if self.problem:
            raise ValueError(self.problem)

    @property
    def problem(self) -> str:
        """Why the backends cannot be merged ('' when they can): a misconfiguration the last check found,
        or backends that have served different indexes for longer than an alias switch takes."""
        if self.misconfigured:
            return self.misconfigured
        if self.mixed_since is not None and time.monotonic() - self.mixed_since > self.max_switch:
            return (f"the backends have served different indexes for over {self.max_switch:g} s "
                    f"(--max_switch_secs; do they follow different alias roots?): {self.mixed}")
        return ""

    async def first_check(self) -> None:
        """The start-up check, in a loop of its own: its connections are closed with it."""
        try:
            await self.check()
        finally:
            await self.client.aclose()
            self._client = None

    @staticmethod
    def _moving(known: dict[str, dict]) -> bool:
        """Backends that follow one alias (search.server --alias) move to a new index a moment apart: while
        they do, each shard is still served once (the shard count and product hash are the same), so
        results are merged, each backend's ranked by its own model; another mix is a misconfiguration."""
        indexed = [h.get("index") for h in known.values()]
        if all(indexed) and len({h["num_shards"] for h in known.values()}) == 1:
            _log.info("backends are moving between indexes (an alias switch): %s",
                      sorted({(h["index"], h["model"]) for h in known.values()}))
            return True
        return False

    def refresh_in_background(self) -> None:
        """Starts a health check when one is due, without waiting for it: a hung backend's /healthz
        must not add its timeout to a search's. Each call in a check has a deadline; a check still running
        past its own is cancelled, so one hung check never blocks the later ones."""
        now = time.monotonic()
        if self._checking is not None and not self._checking.done():
            if now - self._checking_since <= self.timeout + 1:
                return
            self._checking.cancel()
        if now - self.checked >= self.health_every:
            self._checking_since = now
            self._checking = asyncio.get_running_loop().create_task(self._check_logged())

    def recheck_soon(self) -> None:
        """A search answer showed a backend's shards or index changed: the next request checks again."""
        self.checked = 0.0
        self.refresh_in_background()

    async def _check_logged(self) -> None:
        try:
            async with asyncio.timeout(self.timeout + 1):
                await self.check()
        except ValueError as e:
            _log.error("%s; searches are refused until it is fixed", e)
        except TimeoutError:
            _log.error("a health check took over %g s", self.timeout + 1)
        except Exception:  # a check's failure must not be lost as "task exception was never retrieved"
            _log.exception("a health check failed")

    def shards_of(self, url: str) -> list[int]:
        return list((self.health.get(url) or {}).get("shards", ()))

    @property
    def num_shards(self) -> int | None:
        return next((h["num_shards"] for h in self.health.values() if h), None)

    def missing(self) -> list[int]:
        """Shards no backend has said it serves (a backend never reached)."""
        total = self.num_shards
        served = {s for url in self.urls for s in self.shards_of(url)}
        return sorted(set(range(total)) - served) if total is not None else []

    async def get(self, url: str):
        return await self._call("GET", url)

    async def post(self, url: str, body: bytes, path: str = "/v1/search"):
        return await self._call("POST", url + path, content=body, headers={"Content-Type": "application/json"})

    async def _call(self, method: str, url: str, **request) -> tuple[int, object, str | None]:
        """(status, the answer's JSON, why there is none): the whole exchange, the body's last byte
        included, within the timeout (httpx's own is per read: a backend trickling bytes never hits it)."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.client.request(method, url, **request)
            return response.status_code, response.json(), None
        except TimeoutError:
            return 0, None, f"no whole answer within {self.timeout:g} s"
        except (httpx.HTTPError, ValueError, RecursionError) as e:
            return 0, None, f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} after {self.timeout:g} s"


def _models(answered: list[dict]) -> str:
    """The model id the answers came from; during an alias switch, each one's, comma-separated."""
    return ",".join(sorted({a.get("model", "") for a in answered} - {""}))


def create_app(backends: Backends) -> FastAPI:
    registry = CollectorRegistry()
    requests_total = Counter("router_requests_total", "Requests by route and outcome", ["route", "outcome"],
                             registry=registry)
    latency = Histogram("router_latency_seconds", "Request latency, backends included", ["route"], registry=registry)
    left_out = Counter("router_backend_failures_total", "Backend answers left out of a merge (failed, late, "
                       "malformed or overlapping)", ["backend"], registry=registry)
    app = http.new_app("product search (router)", on_bad_request=requests_total.labels("any", "bad_request").inc)
    app.include_router(page.router)

    def observed(route: str, started: float, coverage: dict) -> float:
        took = time.perf_counter() - started
        latency.labels(route).observe(took)
        requests_total.labels(route, "partial" if coverage.get("partial") else "ok").inc()
        for url in coverage.get("errors", {}):
            left_out.labels(url).inc()
        return round(took * 1000, 3)

    @app.post("/v1/search", response_model=SearchResponse)
    async def search(request: Request):
        """As search.server's POST /v1/search, over every backend: a text or image query is embedded once
        (POST /v1/embed on one backend) and its vector sent to all; the hits are merged by score and the
        facet counts added up exactly (search.merge)."""
        started = time.perf_counter()
        backends.refresh_in_background()
        if backends.problem:
            return http.error(503, f"the router's backends cannot be merged: {backends.problem}")
        data = _request_of(await request.body())
        if data is not None:
            refused = await _embedded(backends, data)
            if refused is not None:
                return refused
        body, (k, offset) = _deepened(data, await request.body())
        answers = await asyncio.gather(*(backends.post(url, body) for url in backends.urls))
        answers_ok, coverage, bad = _sorted_out(backends, answers, _SearchAnswer, "POST /v1/search")
        if bad is not None:
            return bad
        if len(coverage.get("errors", ())) == len(backends.urls):
            return JSONResponse({"error": f"no backend answered: {coverage['errors']}"}, status_code=503)
        hits = merge.merge_hits(([_hit(Hit, hit) for hit in answer["results"]] for answer in answers_ok), offset, k)
        buckets = (data or {}).get("facet_buckets", {})
        counts = merge.sum_facets(merge.counts_of(a.get("facets", {}), buckets) for a in answers_ok)
        facets = merge.facet_lists(counts, buckets, (data or {}).get("facet_limit", merge.MAX_FACET_VALUES))
        return {"results": hits, "facets": facets, "mode": next((a["mode"] for a in answers_ok if a.get("mode")), "vector"),
                "model": _models(answers_ok), "took_ms": observed("search", started, coverage), **coverage}

    async def vector_of(product_id: str):
        """(the product's stored vector from whichever replica serves its shard, or None; why each replica
        that neither gave it nor said 404 failed)."""
        path = f"/v1/products/{_segment(product_id)}/vector"
        found = await asyncio.gather(*(backends.get(url + path) for url in backends.urls))
        vector, down = None, {}
        for url, (status, answer, error) in zip(backends.urls, found):
            if status == 404:
                continue
            checked, why = _validated(_VectorAnswer, answer, "GET /v1/products/ID/vector") if status == 200 \
                else (None, error or _error_text(answer) or f"HTTP {status}")
            if checked is not None and checked["product_id"] != product_id:
                checked, why = None, f"answered for product {checked['product_id']!r}, not {product_id!r}"
            if checked is None:
                down[url] = why
            elif vector is None:
                vector = checked
        return vector, down

    def no_vector(product_id: str, down: dict[str, str]) -> JSONResponse:
        if down:
            return http.error(503, f"no live product {product_id!r} among the backends that answered "
                               f"({len(down)} did not: {down})")
        return http.error(404, f"no live product {product_id!r} in the index")

    # `:path`: a product id may hold slashes (Shopify's gid://shopify/Product/1), raw or as %2F.
    @app.get("/v1/products/{product_id:path}/vector")
    async def product_vector(product_id: str):
        answer, down = await vector_of(product_id)
        return answer if answer is not None else no_vector(product_id, down)

    @app.get("/v1/products/{product_id:path}/similar", response_model=SearchResponse)
    async def similar(product_id: str, k: str | None = None, shop_id: str | None = None, filter: str | None = None,
                      ef_search: str | None = None):
        """The product's vector from the replica that serves its shard, then every replica's candidates
        like it (POST /v1/similar), merged and collapsed across replicas as one server collapses them."""
        started = time.perf_counter()
        try:  # whole numbers only, as the body's k is (2.0 is not a k), in search.server's ranges
            k = _query_int("k", k, 10, *SIMILAR_K)
            ef_search = _query_int("ef_search", ef_search, None, *SIMILAR_EF_SEARCH)
        except ValueError as e:
            return http.error(400, str(e))
        backends.refresh_in_background()
        if backends.problem:
            return http.error(503, f"the router's backends cannot be merged: {backends.problem}")
        answer, down = await vector_of(product_id)
        if answer is None:
            return no_vector(product_id, down)
        scope = http.json_param("filter", filter)
        body = json.dumps({"vector": answer["vector"], "exclude": product_id, "k": k, "shop_id": shop_id,
                           "filter": scope, **({"ef_search": ef_search} if ef_search is not None else {})}).encode()
        answers = await asyncio.gather(*(backends.post(url, body, "/v1/similar") for url in backends.urls))
        dim = len(answer["vector"])

        def same_dim(candidates: dict) -> str:
            sizes = {len(hit["vector"]) for hit in candidates["results"]} - {dim}
            return f"candidate vectors of {sorted(sizes)} dimensions, the product's has {dim}" if sizes else ""

        answered, coverage, bad = _sorted_out(backends, answers, _SimilarAnswer, "POST /v1/similar", same_dim)
        if bad is not None:
            return bad
        candidates = merge.merge_hits([_hit(SimilarHit, hit) for hit in answer["results"]] for answer in answered)
        # Each replica collapsed its own candidates; copies across replicas go here.
        kept = collapse_near_copies(((_hit(Hit, dataclasses.asdict(hit)), np.asarray(hit.vector, np.float32))
                                     for hit in candidates), answer["vector"], k)
        return {"results": [hit for hit, _ in kept], "mode": "vector", "model": _models(answered),
                "took_ms": observed("similar", started, coverage), **coverage}

    @app.get("/healthz")
    async def healthz():
        try:
            await backends.check()
        except ValueError as e:
            return JSONResponse({"status": "misconfigured", "error": str(e)}, status_code=503)
        each = {url: {"status": (backends.health[url] or {}).get("status", "unknown") if url not in backends.errors
                      else "down", "shards": backends.shards_of(url),
                      **({"error": backends.errors[url]} if url in backends.errors else {})}
                for url in backends.urls}
        missing = backends.missing() + [s for url in backends.errors for s in backends.shards_of(url)]
        up = [h for url, h in backends.health.items() if h and url not in backends.errors]
        status = "ok" if not missing and all(h["status"] == "ok" for h in up) else "degraded"
        first = up[0] if up else {}
        return JSONResponse({"status": status if up else "down", "model": first.get("model"), "dim": first.get("dim"),
                             "num_shards": backends.num_shards, "missing_shards": sorted(set(missing)),
                             "live_docs": sum(h.get("live_docs", 0) for h in up),
                             "queries": first.get("queries", []), "filterable": first.get("filterable", []),
                             "backends": each},
                            status_code=200 if up else 503)

    @app.get("/livez")
    def livez():
        return {"status": "alive"}

    @app.get("/metrics", response_class=Response,
                   responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _hit(kind: type, answer: dict):
    """A backend's hit (checked by _Hit) as the store's own `Hit` (or `SimilarHit`): the fields it knows."""
    names = {field.name for field in dataclasses.fields(kind)}
    return kind(**{name: value for name, value in answer.items() if name in names})


def _request_of(body: bytes) -> dict | None:
    """The search request as JSON, when it is one the service accepts (search.http.models); None for a
    body the backends will refuse (it goes to them as it came, and their 400 is passed on)."""
    try:
        data = json.loads(body)
        SearchRequest.model_validate(data)
    except (ValueError, RecursionError):  # pydantic's ValidationError is a ValueError
        return None
    return data


async def _embedded(backends: Backends, data: dict) -> JSONResponse | None:
    """Embeds a text or image query once, by the first backend that can, and puts its vector (and the
    model it comes from, which every backend checks against its index) into `data`; a 400 to answer
    when the query itself cannot be embedded (an image that cannot be fetched). When no backend can
    embed it, `data` is left as it is: each backend embeds it itself."""
    if data.get("vector") is not None or (data.get("text") is None and data.get("image_url") is None):
        return None
    if data.get("image_url") is None and data.get("mode") == "lexical":
        return None  # keywords only: no vector needed
    healthy = [url for url in backends.urls if url not in backends.errors]
    if not healthy or not all(EMBED in (backends.health.get(url) or {}).get("features", ()) for url in backends.urls):
        return None  # a backend of an earlier version (mid-upgrade) would refuse the vector: each embeds it
    query = {"image_url": data["image_url"]} if data.get("image_url") is not None else {"text": data["text"]}
    # One attempt: another backend would wait on the same slow image host, or load the same model.
    status, answer, _why = await backends.post(healthy[0], json.dumps(query).encode(), "/v1/embed")
    checked, _ = _validated(_QueryVector, answer, "POST /v1/embed") if status == 200 else (None, "")
    if checked is not None:  # the text or image goes too: a backend of another index embeds it itself
        data.update(vector=checked["vector"], vector_model=checked["model"])
    elif status == 400 and _error_text(answer) is not None and backends.mixed_since is None:
        return JSONResponse({"error": answer["error"]}, status_code=400)  # every backend would say so
    return None


def _sorted_out(backends: Backends, answers, model: type[BaseModel], what: str,
                extra=None) -> tuple[list[dict], dict, JSONResponse | None]:
    """The backends' (status, answer, error) sorted out: the answers of those that answered as `model`
    reads them (and `extra(answer)` finds nothing wrong), the coverage a response carries (partial,
    missing_shards, errors: why each other failed), and, when a backend found the request itself bad
    (400, 413: every backend would say so), that answer to pass on. While the backends move between
    indexes (an alias switch), a request one index refuses (a vector of the other's dimension) is
    answered by the others, partially."""
    if backends.problem:  # a health check found it while the backends were asked
        return [], {}, http.error(503, f"the router's backends cannot be merged: {backends.problem}")
    answered, missing, errors, refused = {}, set(backends.missing()), {}, {}
    for url, (status, answer, error) in zip(backends.urls, answers):
        checked, why = _validated(model, answer, what) if status == 200 else (None, "")
        why = why or (extra(checked) if checked is not None and extra else "")
        if checked is not None and not why:
            answered[url] = checked
        elif status in (400, 413) and _error_text(answer) is not None:
            refused[url] = (status, {"error": answer["error"]})
        else:
            errors[url] = why or error or _error_text(answer) or f"HTTP {status}"
    if refused and (not answered or backends.mixed_since is None):
        status, answer = next(iter(refused.values()))
        return [], {}, JSONResponse(answer, status_code=status)
    errors.update({url: f"HTTP {status}: {answer['error']}" for url, (status, answer) in refused.items()})
    for url, why in _overlapping(backends, answered).items():
        del answered[url]
        errors[url] = why
    if len({answer["model"] for answer in answered.values()}) > 1 and backends.mixed_since is None:
        backends.recheck_soon()  # an index moved since the last check
    for url in errors:
        missing.update(backends.shards_of(url))
    for answer in answered.values():
        missing.update(answer.get("missing_shards", ()))
    served = {shard for url, answer in answered.items()
              for shard in (answer.get("shards") if answer.get("shards") is not None else backends.shards_of(url))}
    coverage = {"partial": bool(missing or errors), "missing_shards": sorted(missing), "shards": sorted(served),
                **({"errors": errors} if errors else {})}
    return list(answered.values()), coverage, None


def _overlapping(backends: Backends, answered: dict[str, dict]) -> dict[str, str]:
    """The answers to leave out, and why: those of backends whose answer covers a shard another answer
    covers too (a backend restarted with other shards since the last health check: its hits and facet
    counts would count twice). An answer covers the shards it names (`shards`) or else the shards its
    backend last said it serves plus those its hits hash to. Whichever backend changed is left out."""
    total = backends.num_shards
    known = {url: set(backends.shards_of(url)) for url in answered}
    covered = {}
    for url, answer in answered.items():
        if answer.get("shards") is not None:
            covered[url] = set(answer["shards"])
        else:
            covered[url] = known[url] | ({shard_of(hit["product_id"], total) for hit in answer["results"]}
                                         if total else set())
    if any(covered[url] != known[url] for url in answered):
        backends.recheck_soon()
    owners = defaultdict(list)
    for url, shards in covered.items():
        for shard in shards:
            owners[shard].append(url)
    dropped = {}
    for shard, urls in sorted(owners.items()):
        if len(urls) > 1:
            changed = [url for url in urls if covered[url] != known[url]] or urls
            for url in changed:
                others = ", ".join(other for other in urls if other != url)
                dropped.setdefault(url, f"its answer covers shard {shard}, which {others} serves too (its "
                                        f"last /healthz said shards {sorted(known[url])}): left out, re-checking")
    return dropped


def _deepened(data: dict | None, body: bytes) -> tuple[bytes, tuple[int, int]]:
    """The request as each backend gets it, and the page (k, offset) the router cuts from the merge:
    a backend is asked for its top offset + k from offset 0, so a deep page is exact across backends,
    and for every value of each facet, so counts add up exactly. A body that is not a valid request
    (`data` None) goes as it came (the backends answer it 400)."""
    if data is None:
        return body, (10, 0)
    k, offset = data.get("k", 10), data.get("offset", 0)
    data = {**data, "k": offset + k, "offset": 0}
    if offset:
        # Hybrid lists are fused to the depth the page size sets, not the deepened k (search.sharded).
        data["fusion_window"] = fusion_window(k, data.get("fusion_window"))
    if data.get("facets"):
        data["facet_limit"] = MAX_FACET_LIMIT
    return json.dumps(data).encode(), (k, offset)


def _segment(product_id: str) -> str:
    """A product id as one path segment of a backend URL: every byte but the unreserved ones
    percent-encoded (a / as %2F), and the ids . and .. as %2E and %2E%2E, which httpx and the server's
    router leave as they are (a literal . or .. would be resolved away, naming another path)."""
    encoded = quote(product_id, safe="")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


def _query_int(name: str, value: str | None, default, low: int, high: int):
    """A query parameter that must be a whole number in [low, high]: '2.0' and 'true' are not."""
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", value) or not low <= int(value) <= high:
        raise ValueError(f"{name}: must be a whole number from {low} to {high} (got {value!r})")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.router", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backends", required=True,
                        help="Comma-separated URLs of search.server replicas, each serving some shards (--shards).")
    parser.add_argument("--port", type=http.port, default=8080, help="Port to serve on (0: any free port).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--timeout_secs", type=bounded(float, 0, 600, "seconds", low_open=True), default=2.0,
                        help="A backend that has not answered a search (its whole answer) within this is left "
                             "out (partial: true); each health check's call has the same deadline (0-600).")
    parser.add_argument("--health_every_secs", type=bounded(float, 0.1, 3600, "seconds"), default=HEALTH_EVERY_SECS,
                        help="How often the backends' /healthz are asked, while requests come (0.1-3600).")
    parser.add_argument("--max_switch_secs", type=bounded(float, 1, 86400, "seconds"), default=MAX_SWITCH_SECS,
                        help="The most backends may serve different indexes of one alias (an alias switch, "
                             "a moment apart) before the mix is refused as a misconfiguration (1-86400).")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per backend request otherwise
    parser = build_parser()
    args = parser.parse_args(argv)
    urls = [url.strip().rstrip("/") for url in args.backends.split(",") if url.strip()]
    if not urls or not all(url.startswith(("http://", "https://")) for url in urls):
        parser.error("--backends: give one or more http(s):// URLs, comma-separated")
    if len(set(urls)) != len(urls):
        parser.error("--backends: a URL is listed twice (its shards would be counted twice)")
    try:
        sock = http.listen(args.host, args.port)
    except OSError as e:
        parser.exit(1, f"search.router: {e}\n")
    backends = Backends(urls, args.timeout_secs, args.health_every_secs, args.max_switch_secs)
    try:
        asyncio.run(backends.first_check())
    except ValueError as e:
        sock.close()
        parser.exit(1, f"search.router: {e}\n")
    host, port = sock.getsockname()[:2]
    down = f"; not answering: {', '.join(backends.errors)}" if backends.errors else ""
    ready = (f"search page: http://{host}:{port}/ (router over {len(urls)} backends, "
             f"{backends.num_shards or '?'} shards{down})")
    http.serve(create_app(backends), sock, ready, _log)


if __name__ == "__main__":
    main()
