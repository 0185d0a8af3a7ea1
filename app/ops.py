"""Liveness, readiness and metrics: no token needed, nothing secret exposed."""

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.errors import DATABASE_ERRORS, json_response
from app.migrations import head_revision

log = logging.getLogger("coldmail.ops")
router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: 200 while the process runs")
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


async def schema_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()


@router.get("/readyz", summary="Readiness: the database answers and the schema is at head")
async def readyz(request: Request) -> Response:
    try:
        revision = await schema_revision(request.app.state.engine)
    except DATABASE_ERRORS as error:
        log.warning("not ready: %s", type(error).__name__)
        return json_response(503, {"status": "unavailable", "database": "unreachable"})
    if revision != head_revision():
        return json_response(503, {"status": "unavailable", "database": "schema not at head"})
    return json_response(200, {"status": "ok", "revision": revision})


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus_metrics(request: Request) -> Response:
    pool = request.app.state.engine.pool
    metrics.POOL_IN_USE.set(pool.checkedout())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
