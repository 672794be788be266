"""A router in front of search replicas that each serve some of an index's shards.

    python -m search.server --index_dir index/ --shards 0-1 --port 8081     # one replica per shard group
    python -m search.server --index_dir index/ --shards 2-3 --port 8082
    python -m search.router --backends http://127.0.0.1:8081,http://127.0.0.1:8082 --port 8080

It answers the search service's API and page. Each search goes to every backend at once, as it came
(the same k, ef_search and shop: each backend returns its shards' best k), and the hits are merged by
score, so the answer equals one service's over all the shards. A backend that fails or does not
answer within `--timeout_secs` costs its shards' hits, not the query: the answer says
`partial: true` and which shards are missing. `/healthz` shows each backend. Which shards a backend
serves comes from its `/healthz`, asked at start and every few seconds after; two backends may not
serve the same shard (their hits would be counted twice): a replica group's redundancy comes from
the load balancer in front of it, one URL per group. Backends that follow one alias (`--alias`) serve
two indexes for the moment of a switch; with the same shard count, each shard is still served once,
and the answer's `model` names both. `/livez` answers while the process runs (for
autohealing, which must not recreate a router whose backends are still starting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time

from urllib.parse import quote

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from search.hybrid import FUSION_WINDOW
from search.filters import FilterError
from search.server import MAX_BODY_BYTES, MAX_DEPTH, PAGE, _json_param, _JsonBody, _error, _listen, _port, serve
from search.sharded import collapse_near_copies

__all__ = ["Backends", "create_app", "main"]

_log = logging.getLogger("search.router")
HEALTH_EVERY_SECS = 5.0


class Backends:
    """The backends, the shards each serves (from its /healthz), and the index they share."""

    def __init__(self, urls: list[str], timeout_secs: float):
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout = timeout_secs
        self.health: dict[str, dict | None] = {url: None for url in self.urls}
        self.errors: dict[str, str] = {}
        self.misconfigured = ""  # why the backends cannot be merged (searches are refused meanwhile)
        self.checked = 0.0
        self._checking: asyncio.Task | None = None
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
            if status == 200:
                self.health[url] = body
                self.errors.pop(url, None)
            else:
                self.errors[url] = error or f"HTTP {status}"
        self.checked = time.monotonic()
        known = {url: h for url, h in self.health.items() if h}
        models = {(h["model"], h["dim"], h["num_shards"]) for h in known.values()}
        self.misconfigured = ""
        if len(models) > 1 and not self._moving(known):
            self.misconfigured = f"the backends serve different indexes: {sorted(models)}"
        seen: dict[int, str] = {}
        for url, h in known.items():
            for shard in h.get("shards", ()):
                if shard in seen and not self.misconfigured:
                    self.misconfigured = f"shard {shard} is served by both {seen[shard]} and {url}"
                seen[shard] = url
        if self.misconfigured:
            raise ValueError(self.misconfigured)

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
        must not add its timeout to a search's."""
        if time.monotonic() - self.checked >= HEALTH_EVERY_SECS and (self._checking is None or self._checking.done()):
            self._checking = asyncio.get_running_loop().create_task(self._check_logged())

    async def _check_logged(self) -> None:
        try:
            await self.check()
        except ValueError as e:
            _log.error("%s; searches are refused until it is fixed", e)

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
        try:
            response = await self.client.get(url)
            return response.status_code, response.json(), None
        except (httpx.HTTPError, ValueError) as e:
            return 0, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

    async def post(self, url: str, body: bytes, path: str = "/v1/search"):
        try:
            response = await self.client.post(url + path, content=body, headers={"Content-Type": "application/json"})
            return response.status_code, response.json(), None
        except (httpx.HTTPError, ValueError) as e:
            return 0, None, f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} after {self.timeout:g} s"


def _models(answered: list[dict]) -> str:
    """The model id the answers came from; during an alias switch, each one's, comma-separated."""
    return ",".join(sorted({a.get("model", "") for a in answered} - {""}))


def create_app(backends: Backends) -> FastAPI:
    app = FastAPI(title="product search (router)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_JsonBody, limit=MAX_BODY_BYTES)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError):
        return _error(400, "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors()))

    @app.post("/v1/search")
    async def search(request: Request):
        started = time.perf_counter()
        backends.refresh_in_background()
        if backends.misconfigured:
            return _error(503, f"the router's backends cannot be merged: {backends.misconfigured}")
        body, (k, offset) = _deepened(await request.body())
        answers = await asyncio.gather(*(backends.post(url, body) for url in backends.urls))
        answered, coverage, bad = _sorted_out(backends, answers)
        if bad is not None:
            return bad
        if len(coverage.get("errors", ())) == len(backends.urls):
            return JSONResponse({"error": f"no backend answered: {coverage['errors']}"}, status_code=503)
        hits = sorted((hit for answer in answered for hit in answer["results"]),
                      key=lambda hit: (-hit["score"], hit["product_id"]))
        unique = {}
        for hit in hits:  # a shard that moved between backends mid-query must not count twice
            unique.setdefault(hit["product_id"], hit)
        hits = list(unique.values())
        took = round((time.perf_counter() - started) * 1000, 3)
        return {"results": hits[offset:offset + k], "facets": _summed([a.get("facets", {}) for a in answered]),
                "mode": next((a["mode"] for a in answered if a.get("mode")), None), "model": _models(answered),
                "took_ms": took, **coverage}

    async def vector_of(product_id: str):
        """(the product's stored vector from whichever replica serves its shard, or None; each replica's
        (status, answer, error))."""
        path = f"/v1/products/{quote(product_id, safe='')}/vector"
        found = await asyncio.gather(*(backends.get(url + path) for url in backends.urls))
        return next((answer for status, answer, _ in found if status == 200), None), found

    @app.get("/v1/products/{product_id}/vector")
    async def product_vector(product_id: str):
        answer, _ = await vector_of(product_id)
        return answer if answer is not None else _error(404, f"no live product {product_id!r} in the index")

    @app.get("/v1/products/{product_id}/similar")
    async def similar(product_id: str, k: int = 10, shop_id: str | None = None, filter: str | None = None,
                      ef_search: int | None = None):
        """The product's vector from the replica that serves its shard, then every replica's candidates
        like it (POST /v1/similar), merged and collapsed across replicas as one server collapses them."""
        started = time.perf_counter()
        backends.refresh_in_background()
        if backends.misconfigured:
            return _error(503, f"the router's backends cannot be merged: {backends.misconfigured}")
        answer, found = await vector_of(product_id)
        if answer is None:
            down = [url for url, (status, _, _) in zip(backends.urls, found) if status not in (200, 404)]
            if down:
                return _error(503, f"no live product {product_id!r} among the backends that answered "
                                   f"({len(down)} did not)")
            return _error(404, f"no live product {product_id!r} in the index")
        try:
            scope = _json_param("filter", filter)
        except FilterError as e:
            return _error(400, str(e))
        body = json.dumps({"vector": answer["vector"], "exclude": product_id, "k": k, "shop_id": shop_id,
                           "filter": scope, **({"ef_search": ef_search} if ef_search is not None else {})}).encode()
        answers = await asyncio.gather(*(backends.post(url, body, "/v1/similar") for url in backends.urls))
        answered, coverage, bad = _sorted_out(backends, answers)
        if bad is not None:
            return bad
        candidates = sorted((hit for answer in answered for hit in answer["results"]),
                            key=lambda hit: (-hit["score"], hit["product_id"]))
        # Each replica collapsed its own candidates; copies across replicas go here.
        kept = collapse_near_copies(((hit, np.asarray(hit.pop("vector"), np.float32)) for hit in candidates),
                                    answer["vector"], k)
        took = round((time.perf_counter() - started) * 1000, 3)
        return {"results": [hit for hit, _ in kept], "mode": "vector", "model": _models(answered), "took_ms": took,
                **coverage}

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

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def _sorted_out(backends: Backends, answers) -> tuple[list[dict], dict, JSONResponse | None]:
    """The backends' (status, answer, error) sorted out: the answers of those that answered, the
    coverage a response carries (partial, missing_shards, errors: why each other failed), and, when a
    backend found the request itself bad (400, 413: every backend would say so), that answer to pass on."""
    answered, missing, errors = [], set(backends.missing()), {}
    for url, (status, answer, error) in zip(backends.urls, answers):
        if status == 200:
            answered.append(answer)
            missing.update(answer.get("missing_shards", ()))
        elif status in (400, 413):
            return [], {}, JSONResponse(answer, status_code=status)
        else:
            errors[url] = error or (answer or {}).get("error") or f"HTTP {status}"
            missing.update(backends.shards_of(url))
    coverage = {"partial": bool(missing or errors), "missing_shards": sorted(missing),
                **({"errors": errors} if errors else {})}
    return answered, coverage, None


def _deepened(body: bytes) -> tuple[bytes, tuple[int, int]]:
    """The request as each backend gets it, and the page (k, offset) the router cuts from the merge:
    a backend is asked for its top offset + k from offset 0, so a deep page is exact across backends.
    A body that is not a valid request goes as it came (the backends answer it 400)."""
    try:
        data = json.loads(body)
        k, offset = data.get("k", 10), data.get("offset", 0)
    except (ValueError, AttributeError, RecursionError):
        return body, (10, 0)
    if not (_count(k) and _count(offset) and k > 0 and offset > 0 and offset + k <= MAX_DEPTH):
        return body, (k if _count(k) and k > 0 else 10, 0)
    # Hybrid lists are fused to the depth the page size sets, not the deepened k (search.sharded).
    window = data.get("fusion_window") or max(FUSION_WINDOW, k)
    return json.dumps({**data, "k": offset + k, "offset": 0, "fusion_window": window}).encode(), (k, offset)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _summed(facets: list[dict]) -> dict:
    """The backends' facet counts added up, value by value (bucket by bucket), most frequent first."""
    totals: dict[str, dict] = {}
    for part in facets:
        for name, counts in part.items():
            merged = totals.setdefault(name, {})
            for item in counts:
                key = json.dumps(item["value"])
                merged[key] = merged.get(key, 0) + item["count"]
    out = {}
    for name, merged in totals.items():
        items = [{"value": json.loads(key), "count": count} for key, count in merged.items()]
        buckets = all(isinstance(item["value"], list) for item in items)
        out[name] = sorted(items, key=(lambda i: i["value"][0]) if buckets else (lambda i: (-i["count"], str(i["value"]))))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.router", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backends", required=True,
                        help="Comma-separated URLs of search.server replicas, each serving some shards (--shards).")
    parser.add_argument("--port", type=_port, default=8080, help="Port to serve on (0: any free port).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--timeout_secs", type=float, default=2.0,
                        help="A backend that has not answered a search within this is left out (partial: true).")
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
    if not (math.isfinite(args.timeout_secs) and args.timeout_secs > 0):
        parser.error("--timeout_secs must be a positive number")
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        parser.exit(1, f"search.router: {e}\n")
    backends = Backends(urls, args.timeout_secs)
    try:
        asyncio.run(backends.check())
    except ValueError as e:
        sock.close()
        parser.exit(1, f"search.router: {e}\n")
    host, port = sock.getsockname()[:2]
    down = f"; not answering: {', '.join(backends.errors)}" if backends.errors else ""
    ready = (f"search page: http://{host}:{port}/ (router over {len(urls)} backends, "
             f"{backends.num_shards or '?'} shards{down})")
    serve(create_app(backends), sock, ready, _log)


if __name__ == "__main__":
    main()
