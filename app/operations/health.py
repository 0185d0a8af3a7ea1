"""Liveness, readiness and metrics: no token needed (but METRICS_TOKEN, when set, for
/metrics), nothing secret exposed."""

import asyncio
import logging
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.crypto import token_matches
from app.db import describe, pooler_hint
from app.errors import DATABASE_ERRORS, ApiError, json_response
from app.hashing import KEYS_DO_NOT_FIT
from app.operations.migrations import head_revision
from app.reading import renewals

log = logging.getLogger("coldmail.ops")
router = APIRouter(tags=["operations"])
READY_TIMEOUT_SECONDS = 3


@router.get("/healthz", summary="Liveness: 200 while the process runs")
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


async def schema_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()


@router.get(
    "/readyz",
    summary="Readiness: 200 while deliveries can be made durable (database or spool)",
    responses={503: {"description": "Neither the database nor the spool can take a delivery"}},
)
async def readyz(request: Request) -> Response:
    receiver = request.app.state.receiver
    database, revision, problem = await database_state(request.app.state.engine)
    depth, oldest, room = await receiver.spool.depth()
    observe_spool(depth, oldest)
    body: dict[str, object] = {
        "database": database,
        "revision": revision,
        "spool": {"depth": depth, "oldestSeconds": round(oldest or 0.0, 3), "room": room},
    }
    if problem:  # nothing spooled would ever be applied: not ready
        body["error"] = problem
        return json_response(503, body)
    # A service whose keys cannot read what is stored cannot apply a delivery: not ready.
    if database == "up" and not await receiver.check_keys():
        body["error"] = KEYS_DO_NOT_FIT
        return json_response(503, body)
    return json_response(200 if database == "up" or room else 503, body)


_last_logged: list[str] = ["up"]  # readiness is logged when it changes, not per probe


def log_change(state: str, line: str) -> None:
    if _last_logged[0] != state:
        _last_logged[0] = state
        log.warning("%s", line)


async def database_state(engine: AsyncEngine) -> tuple[str, str | None, str | None]:
    """ "up" when the database answers with the schema at head, else "down"; the schema
    revision it reported; and a setting to fix, when the failure says which."""
    try:
        revision = await asyncio.wait_for(schema_revision(engine), READY_TIMEOUT_SECONDS)
    except (*DATABASE_ERRORS, TimeoutError) as error:
        if hint := pooler_hint(error):
            log_change("misconfigured", hint)
            return "down", None, hint
        log_change("down", f"database not ready: {describe(error)}")
        return "down", None, None
    if revision != head_revision():
        log_change("old", f"database schema {revision} is not at head {head_revision()}")
        return "down", revision, None
    log_change("up", "database ready")
    return "up", revision, None


def observe_spool(depth: int, oldest: float | None) -> None:
    metrics.SPOOL_DEPTH.set(depth)
    metrics.SPOOL_OLDEST.set(oldest or 0.0)


@router.get(
    "/metrics",
    summary="Prometheus metrics (a bearer token when METRICS_TOKEN is set)",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        401: {"description": "METRICS_TOKEN is set and the bearer token is not it"},
    },
)
async def prometheus_metrics(request: Request) -> Response:
    expected = request.app.state.settings.metrics_token_value
    if expected is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not token_matches(given, [expected]):
            raise ApiError(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
    pool = request.app.state.engine.pool
    metrics.POOL_IN_USE.set(pool.checkedout())
    depth, oldest, _ = await request.app.state.receiver.spool.depth()
    observe_spool(depth, oldest)
    state = request.app.state
    if (
        time.monotonic() - getattr(state, "risks_counted_at", -RISKS_EVERY_SECONDS)
        >= RISKS_EVERY_SECONDS
    ):
        if await observe_renewal_risks(state.read_engine):
            state.risks_counted_at = time.monotonic()
    for observe in getattr(state, "scrape_observers", ()):  # read at scrape (app/outbound)
        await observe()
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


RISKS_EVERY_SECONDS = 60.0  # the count walks every subscription: at most once a minute


async def observe_renewal_risks(engine: AsyncEngine) -> bool:
    """Whether they were counted; while the database is away the last counts stay."""
    try:
        async with engine.connect() as conn:
            query = renewals.RISK_COUNTS.bindparams(days=renewals.DEFAULT_DAYS)
            rows = (await conn.execute(query)).all()
    except DATABASE_ERRORS as error:
        log.warning("renewal risks not counted: %s", type(error).__name__)
        return False
    for risk, n in renewals.risk_counts(rows).items():
        metrics.RENEWAL_RISKS.labels(risk).set(n)
    return True
