"""A local stand-in for a Qdrant server: qdrant-client's local mode behind the REST paths this product
calls, on 127.0.0.1, so that several processes (a streaming index job, a search service, the alias and
gate commands) share one collection as they share a real server; as bqemulator stands in for BigQuery.

    python -m localstack.qdrant_server --path DIR [--port 6333] [--api_key_env QDRANT_API_KEY]

What it answers is what the local mode does (exact search; payload indexes, quantisation, shards and
replication accepted and not used), through the same REST shapes as a server: `{"result", "status",
"time"}`, and errors as `{"status": {"error"}}` with 404 for a missing collection and 400 for a request
the engine refuses. Requests are served one at a time (the local engine is not thread-safe). With
`--api_key_env NAME`, a request without the `api-key` header that variable holds is refused (401), as a
server with an API key refuses it. Only the endpoints search.qdrant and transforms.qdrant_sink use are
here; anything else is a 404.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["QdrantStandIn", "build_app", "main"]

_log = logging.getLogger("localstack.qdrant_server")


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def build_app(path: str, api_key: str | None = None) -> FastAPI:
    from qdrant_client import QdrantClient
    from qdrant_client.http import models as m

    client = QdrantClient(path=path)
    lock = threading.Lock()
    app = FastAPI(title="Qdrant stand-in", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.client = client

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.headers.get("api-key") != api_key:
            return JSONResponse({"status": {"error": "Must provide an API key or an Authorization bearer token"}},
                                status_code=401)
        return await call_next(request)

    def answer(call: Callable[[], Any]) -> JSONResponse:
        started = time.perf_counter()
        try:
            with lock:
                result = call()
        except ValueError as e:  # the local engine's refusals: a missing collection, a bad request
            status = 404 if "not found" in str(e) or "does not exist" in str(e) else 400
            return JSONResponse({"status": {"error": str(e)}, "time": time.perf_counter() - started},
                                status_code=status)
        return JSONResponse({"result": _dump(result), "status": "ok", "time": time.perf_counter() - started})

    async def body(request: Request, model):
        return model.model_validate(await request.json())

    @app.get("/collections")
    def collections():
        return answer(client.get_collections)

    @app.get("/collections/{name}/exists")
    def exists(name: str):
        return answer(lambda: m.CollectionExistence(exists=client.collection_exists(name)))

    @app.get("/collections/{name}")
    def collection(name: str):
        return answer(lambda: client.get_collection(name))

    @app.put("/collections/{name}")
    async def create(name: str, request: Request):
        spec = await body(request, m.CreateCollection)
        return answer(lambda: client.create_collection(
            name, vectors_config=spec.vectors, sparse_vectors_config=spec.sparse_vectors, metadata=spec.metadata,
            shard_number=spec.shard_number, replication_factor=spec.replication_factor))

    @app.delete("/collections/{name}")
    def delete(name: str):
        return answer(lambda: client.delete_collection(name))

    @app.put("/collections/{name}/index")
    async def index(name: str, request: Request):
        spec = await body(request, m.CreateFieldIndex)
        return answer(lambda: client.create_payload_index(name, spec.field_name, field_schema=spec.field_schema))

    @app.post("/collections/{name}/points/batch")
    async def batch(name: str, request: Request):
        spec = await body(request, m.UpdateOperations)
        return answer(lambda: client.batch_update_points(name, spec.operations))

    @app.post("/collections/{name}/points")
    async def retrieve(name: str, request: Request):
        spec = await body(request, m.PointRequest)
        return answer(lambda: client.retrieve(name, spec.ids, with_payload=spec.with_payload,
                                              with_vectors=spec.with_vector))

    @app.post("/collections/{name}/points/scroll")
    async def scroll(name: str, request: Request):
        spec = await body(request, m.ScrollRequest)

        def run():
            points, offset = client.scroll(name, scroll_filter=spec.filter, limit=spec.limit or 10,
                                           offset=spec.offset, with_payload=spec.with_payload,
                                           with_vectors=spec.with_vector or False, order_by=spec.order_by)
            return m.ScrollResult(points=points, next_page_offset=offset)
        return answer(run)

    @app.post("/collections/{name}/points/count")
    async def count(name: str, request: Request):
        spec = await body(request, m.CountRequest)
        return answer(lambda: client.count(name, count_filter=spec.filter, exact=spec.exact))

    @app.post("/collections/{name}/facet")
    async def facet(name: str, request: Request):
        spec = await body(request, m.FacetRequest)
        return answer(lambda: client.facet(name, spec.key, facet_filter=spec.filter, limit=spec.limit or 10,
                                           exact=bool(spec.exact)))

    @app.post("/collections/{name}/points/query")
    async def query(name: str, request: Request):
        spec = await body(request, m.QueryRequest)
        return answer(lambda: client.query_points(
            name, query=spec.query, using=spec.using, prefetch=spec.prefetch, query_filter=spec.filter,
            search_params=None, limit=spec.limit or 10, offset=spec.offset, with_payload=spec.with_payload,
            with_vectors=spec.with_vector or False, score_threshold=spec.score_threshold))

    @app.get("/aliases")
    def aliases():
        return answer(client.get_aliases)

    @app.get("/collections/{name}/aliases")
    def collection_aliases(name: str):
        return answer(lambda: client.get_collection_aliases(name))

    @app.post("/collections/aliases")
    async def change_aliases(request: Request):
        spec = await body(request, m.ChangeAliasesOperation)
        return answer(lambda: client.update_collection_aliases(spec.actions))

    return app


def main(argv: list[str] | None = None) -> None:
    from search.http.app import listen, port

    parser = argparse.ArgumentParser(prog="python -m localstack.qdrant_server", description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--path", required=True, help="The local-mode directory that holds the collections.")
    parser.add_argument("--port", type=port, default=6333, help="Port on 127.0.0.1 (0: any free port).")
    parser.add_argument("--api_key_env", help="Refuse requests without the API key this environment variable holds.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.exit(2, f"localstack.qdrant_server: ${args.api_key_env} is not set, or empty\n")
    try:
        sock = listen("127.0.0.1", args.port)
    except OSError as e:
        parser.exit(1, f"localstack.qdrant_server: {e}\n")
    import uvicorn

    host, bound = sock.getsockname()[:2]
    app = build_app(args.path, api_key)
    config = uvicorn.Config(app, log_level="warning")
    server = uvicorn.Server(config)
    _log.info("qdrant stand-in: http://%s:%d (local mode in %s)", host, bound, args.path)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()


class QdrantStandIn:
    """The stand-in as a child process on a free loopback port, for tests and the local rollout:
    `with QdrantStandIn(path, log) as qdrant: ... qdrant.url`. `api_key`: required of every request."""

    def __init__(self, path: Path, log_path: Path, api_key: str | None = None, port: int | None = None):
        import sys

        from localstack.emulator import EmulatorProcess, free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "localstack.qdrant_server", "--path", str(path), "--port", str(self.port)]
        env = {}
        if api_key:
            command += ["--api_key_env", "QDRANT_STAND_IN_KEY"]
            env["QDRANT_STAND_IN_KEY"] = api_key
        self._process = EmulatorProcess("qdrant stand-in", command, self._ready, log_path, env=env)

    def _ready(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{self.url}/collections", timeout=1)
        except urllib.error.HTTPError:
            return True  # it answers (401 without the key)
        except OSError:
            return False
        return True

    def __enter__(self) -> "QdrantStandIn":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._process.stop()
