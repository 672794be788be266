"""`/healthz` (for load balancing: the index's state), `/livez` (for autohealing: the process runs) and
`/metrics` (Prometheus). GET and HEAD alike, as probes send either."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from search.http.models import Health
from search.http.service import Service, served
from search.serving import Served

router = APIRouter()


@router.get("/healthz", response_model=Health)
def healthz(http: Request, current: Annotated[Served, Depends(served)]):
    service: Service = http.app.state.service
    index = current.index
    stats = index.stats()
    errors = {str(shard): why for shard, why in sorted(index.reload_errors.items())}
    if service.source.error:
        errors["alias"] = service.source.error
    available = getattr(index, "available", True)  # an engine that does not answer (Qdrant) cannot serve
    body = {"status": "degraded" if errors else "ok", "model": index.model, "dim": index.dim,
            "index": current.name, "live_docs": stats["live_docs"], "generation": stats["generation"],
            "num_shards": index.num_shards, "shards": index.shard_ids, "queries": list(current.embedder.kinds),
            "errors": errors, "filterable": [str(field) for field in index.filterable]}
    if not available:
        return JSONResponse({**body, "status": "unavailable"}, status_code=503)
    return body


@router.get("/livez")
def livez():
    """Answers while the process runs, whatever the index's state: for autohealing (a replica still
    restoring its shards is not broken), where /healthz is for load balancing."""
    return {"status": "alive"}


@router.get("/metrics", response_class=Response,
                  responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(http: Request, _current: Annotated[Served, Depends(served)]):
    return Response(generate_latest(http.app.state.service.registry), media_type=CONTENT_TYPE_LATEST)
