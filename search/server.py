"""The query service: `POST /v1/search`, `GET /v1/products/{id}/similar`, `GET /healthz`, `GET /metrics`,
and a search page at `/`.

    python -m search.server --index_dir index/ --port 8080 [--model SPEC]
    python -m search.server --index_dir indexes/ --alias live    # follows the alias (search.aliases)
    python -m search.server --backend qdrant --collection products (--qdrant_url URL | --qdrant_path DIR)

Built on FastAPI (validation, the OpenAPI document at /openapi.json, /docs and /redoc served without a
network) served by uvicorn, with prometheus_client for metrics. It embeds text and image queries with
the index's own model, asks every shard for k results and merges (search.merge), and picks up new
commits without a restart (it refreshes its view of the index at most every `refresh_secs`). Text
queries are matched by keywords too (BM25 over title, description and the declared keyword
attributes) and fused with the vector results by rank (search.hybrid); attribute filters and facets
use the index's declared fields. The request body is JSON whatever its Content-Type says (`curl -d`
sends a form type); every error is `{"error": "..."}`. It never imports Beam.

This module is the command line and the app factory; the HTTP pieces are in search.http: the app and
its error handling (`app`), the models (`models`), what handlers share (`service`) and the routes
(`routes/`: search, products, health and metrics, the page), which search.router reuses.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
from pathlib import Path

from fastapi import FastAPI

import storage
from argtypes import bounded, matching
from model_handlers.config import ModelConfig, model_id, split_model_id
from search import malloc
from search.aliases import index_path
from search.http import app as http
from search.http.models import DEFAULT_EF_SEARCH
from search.http.routes import health, page, products, search
from search.http.service import Service
from search.query.embedder import QueryEmbedder, QueryError, runs_here
from search.qdrant import cli as qdrant_cli
from search.qdrant.collection import COLLECTION_PATTERN, QdrantTarget
from search.serving import AliasFollower, Fixed, Served
from search.sharded import HEAD_FILE, ShardedIndex
from media.download import FetchConfig

__all__ = ["DEFAULT_EF_SEARCH", "build_parser", "create_app", "main", "open_service"]

_log = logging.getLogger("search.server")
IMAGE_QUERY_SLOTS = 8  # image queries fetching at once; the rest wait without holding a thread


def create_app(index: ShardedIndex | None, embedder: QueryEmbedder | None, refresh_secs: float = 0.2,
               image_timeout_secs: float | None = None, image_slots: int = IMAGE_QUERY_SLOTS,
               follower: AliasFollower | None = None) -> FastAPI:
    """Serves `index` with `embedder`, or (`follower`) the index an alias names, as it moves.
    `image_timeout_secs`: the most an image query may take, waiting for a slot included (default:
    the embedder's download deadline)."""
    service = Service(follower or Fixed(Served(index, embedder)), refresh_secs, image_timeout_secs, image_slots)
    app = http.new_app("product search", on_bad_request=service.requests.labels("bad_request").inc,
                       refused=(QueryError,), on_unavailable=service.requests.labels("unavailable").inc)
    app.state.service = service
    for routes in (search.router, products.router, health.router, page.router):
        app.include_router(routes)
    return app


def open_service(index_dir: str | None, model: str | None = None, projection: str = "", device: str = "auto",
                 fetch: FetchConfig = FetchConfig(), cache_dir: str | None = None,
                 shards: str | None = None, qdrant: QdrantTarget | None = None) -> tuple[ShardedIndex, QueryEmbedder]:
    """The index (or the `shards` of it; or the Qdrant collection `qdrant`) and a query embedder that
    makes vectors of its space; ValueError when they can't match."""
    if qdrant is not None:
        from search.qdrant.index import QdrantIndex

        index = QdrantIndex.open(qdrant)
        kept = index.projection  # the head pipelines.index --projection recorded with the collection
    else:
        index = ShardedIndex.open(index_dir, cache_dir=Path(cache_dir) if cache_dir else None, shards=shards)
        kept = f"{str(index_dir).rstrip('/')}/{HEAD_FILE}"
    index_spec, index_head = split_model_id(index.model)
    spec = model or index_spec
    if index_head and not projection and kept and storage.exists(kept):
        projection = kept  # the head the index's vectors went through, kept with it (pipelines.index --projection)
    query_model = ModelConfig(spec=spec, projection=projection).model_id if runs_here(spec) else model_id(spec)
    if query_model != index.model:
        hint = f" (its vectors were tuned by head {index_head}: pass that --projection)" if index_head else ""
        raise ValueError(f"queries would be embedded as {query_model}, the index holds {index.model}: "
                         f"vectors would not be comparable{hint}")
    return index, QueryEmbedder(spec, index.dim, device, fetch, projection=projection)


def build_parser() -> argparse.ArgumentParser:
    # A one-line usage, as the pipelines': a refused value is that line and the one naming the flag.
    parser = argparse.ArgumentParser(prog="python -m search.server",
                                     usage="%(prog)s (--index_dir DIR | --backend qdrant --collection NAME "
                                           "(--qdrant_url URL | --qdrant_path DIR)) [options]",
                                     description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss",
                        help="faiss: the embedded index pipelines.index writes (--index_dir); qdrant: a Qdrant "
                             "collection pipelines.index --sink qdrant writes (--collection and --qdrant_url or "
                             "--qdrant_path).")
    parser.add_argument("--index_dir", help="A local path, or gs://... (replicated locally); with --alias, the root "
                                            "of named indexes (--backend faiss).")
    parser.add_argument("--alias", help="Serve the index this alias names, and follow it: when it moves, the new index "
                                        "and its model are opened and warmed, then swapped in; requests in flight "
                                        "finish on the old one. faiss: an alias of INDEX_DIR/aliases.json; qdrant: a "
                                        "collection alias (search.aliases).")
    parser.add_argument("--collection", type=matching(COLLECTION_PATTERN, "a collection name"),
                        help="--backend qdrant: the collection (with --alias, none: the alias names it).")
    qdrant_cli.add_flags(parser, "Qdrant (--backend qdrant; --qdrant_path: a pipeline cannot write the directory "
                                 "while this serves it)")
    parser.add_argument("--cache_dir", help="Where a remote index is replicated (none: a new temporary dir).")
    parser.add_argument("--shards", help="Serve only these of the index's shards, e.g. 0-3 or 0,2 (a replica behind "
                                         "python -m search.router; none: all of them).")
    parser.add_argument("--port", type=http.port, default=8080, help="Port to serve on (0: any free port).")
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
                        default=http.HEADER_TIMEOUT_SECS, help="A connection whose request headers take longer is closed.")
    return parser


def backend_refusal(args: argparse.Namespace) -> str | None:
    """Why the flags do not name one index of one backend, or None."""
    qdrant_flags = [f"--{name}" for name in ("collection", "qdrant_url", "qdrant_path", "qdrant_api_key_secret")
                    if getattr(args, name)]
    if args.backend == "faiss":
        if qdrant_flags:
            return f"{', '.join(qdrant_flags)} {'needs' if len(qdrant_flags) == 1 else 'need'} --backend qdrant"
        return None if args.index_dir else "give --index_dir (or --backend qdrant with --collection)"
    if args.index_dir or args.cache_dir or args.shards:
        return "--index_dir, --cache_dir and --shards are for --backend faiss (Qdrant routes its own shards)"
    refused = qdrant_cli.refusal(args)
    if refused:
        return f"--backend qdrant: {refused}"
    if bool(args.collection) == bool(args.alias):
        return "--backend qdrant needs exactly one of --collection and --alias (a collection alias)"
    return None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    malloc.fix_mmap_threshold()  # before the index is loaded: memory stays flat under updates
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sock = http.listen(args.host, args.port)
    except OSError as e:
        parser.exit(1, f"search.server: {e}\n")
    if args.alias and (args.model or args.projection):
        sock.close()
        parser.exit(2, "search.server: --alias follows each index's own model and head (pipelines.index "
                       "--projection keeps the head with the index): drop --model and --projection\n")
    refused = backend_refusal(args)
    if refused:
        sock.close()
        parser.exit(2, f"search.server: {refused}\n")
    qdrant = qdrant_cli.targets(args) if args.backend == "qdrant" else None
    fetch = FetchConfig(allow_private_hosts=args.allow_private_hosts, total_timeout_s=args.image_timeout_secs,
                        read_timeout_s=args.image_timeout_secs, connect_timeout_s=min(5.0, args.image_timeout_secs))

    def opener(name: str) -> Served:
        if qdrant is not None:
            return Served(*open_service(None, None, "", args.device, fetch, qdrant=qdrant(collection=name)), name=name)
        cache = f"{args.cache_dir.rstrip('/')}/{name}" if args.cache_dir else None
        return Served(*open_service(index_path(args.index_dir, name), None, "", args.device, fetch, cache,
                                    args.shards), name=name)

    follower = None
    try:
        if args.alias:
            resolve = None
            if qdrant is not None:
                from search.qdrant import aliases as collection_aliases

                resolve = functools.partial(collection_aliases.resolve, qdrant)
            follower = AliasFollower(args.index_dir or "", args.alias, opener, resolve=resolve)
            index, embedder = follower.current().index, follower.current().embedder
        else:
            index, embedder = open_service(args.index_dir, args.model, args.projection or "", args.device, fetch,
                                           args.cache_dir, args.shards,
                                           qdrant=qdrant(collection=args.collection) if qdrant else None)
    except Exception as e:  # a missing index or collection, an engine that does not answer: one line, exit 1
        sock.close()
        if qdrant is None and not isinstance(e, (ValueError, FileNotFoundError)):
            raise
        if qdrant is not None and not isinstance(e, (ValueError, FileNotFoundError)):
            from search.qdrant.collection import describe_failure

            name = args.collection or (args.alias if re.match(COLLECTION_PATTERN, args.alias) else "aliases")
            e = describe_failure(e, qdrant(collection=name))
        parser.exit(1, f"search.server: {e}\n")
    # A remote index is polled for new commits (an object listing per shard) less often; Qdrant serves
    # its own newest writes, and the service reads its count at most every second.
    refresh_secs = 1.0 if qdrant is not None or storage.is_remote(args.index_dir) else 0.2
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    stats = index.stats()
    queries = "" if embedder.backend is not None else "; vector queries only: this service cannot run the model"
    if qdrant is not None:
        served = f"Qdrant collection {follower.current().name if follower else args.collection}"
    elif len(index.shard_ids) == index.num_shards:
        served = f"{index.num_shards} shards"
    else:
        served = f"shards {','.join(map(str, index.shard_ids))} of {index.num_shards}"
    alias = f"alias {args.alias} -> {follower.current().name}, " if follower else ""
    ready = (f"search page: http://{host}:{port}/ ({alias}{stats['live_docs']} products, {served}, "
             f"model {index.model}{queries})")
    app = create_app(index, embedder, refresh_secs, args.image_timeout_secs, args.image_query_slots, follower)
    protocol = type("Protocol", (http.HeaderTimeoutProtocol,), {"header_timeout": args.header_timeout_secs})
    http.serve(app, sock, ready, _log, http=protocol)


if __name__ == "__main__":
    main()
