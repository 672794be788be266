"""The search page at `/` (search/static/index.html), served by the service and the router alike."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from search.http.app import PAGE

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    return PAGE
