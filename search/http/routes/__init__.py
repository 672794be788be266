"""The search service's routes, one module per resource (FastAPI's APIRouter): search, products,
health and metrics, the page."""
