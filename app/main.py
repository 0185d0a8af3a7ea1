"""The application factory: settings in, a FastAPI app out; engine made in the lifespan."""

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import metrics
from app.config import Settings, get_settings
from app.crypto import Vault
from app.db import make_engine
from app.destinations import Destination
from app.destinations import load as load_destinations
from app.errors import (
    DATABASE_ERRORS,
    ApiError,
    handle_api_error,
    handle_database_error,
    handle_http_error,
    handle_validation_error,
)
from app.hashing import HashingKey
from app.logs import AccessLogMiddleware, configure_logging
from app.operations import health
from app.operations.privacy import retention_forever
from app.operations.reconcile import SenderApi, run_periodically
from app.operations.search_index import index_forever
from app.outbound import api as outbound_api
from app.outbound import dispatch
from app.outbound import pages as outbound_pages
from app.outbound import queries as outbound_queries
from app.outbound.outbox import DestinationsOutbox
from app.reading import api, reader, sessions, ui
from app.reading.cancel import CancelOnDisconnect
from app.reading.docs import add_docs
from app.reading.renewals import KeptValues
from app.receiving import route
from app.receiving.edge import BodyLimit, HstsMiddleware
from app.receiving.pinning import SignatureForms
from app.receiving.receiver import Receiver
from app.receiving.spool import Spool
from app.recording.batches import GroupCommit, Telling
from app.recording.record import store_rejected

READ_POOL_SIZE = 5
READ_STATEMENT_TIMEOUT_MS = 10_000


def start_reconciler(
    engine: AsyncEngine, settings: Settings, outbox: DestinationsOutbox
) -> asyncio.Task[None] | None:
    """Reconcile every RECONCILE_INTERVAL_SECONDS when CMR_API_KEY is set."""
    key, interval = settings.api_key, settings.reconcile_interval_seconds
    if not (key and interval):
        return None
    make_api = partial(SenderApi, settings.cmr_api_url, key)
    return asyncio.create_task(run_periodically(engine, make_api, interval, outbox))


def start_dispatcher(settings: Settings, destinations: list[Destination]) -> dispatch.Running:
    """Send outbound messages from this process, unless none is declared or
    OUTBOUND_DISPATCH=false leaves it to `coldmail-webhooks outbound dispatch`."""
    if not (destinations and settings.outbound_dispatch):
        return dispatch.Running()
    return dispatch.start(settings.database_url or "", destinations, public_url=settings.public_url)


async def database_unavailable(request: Request, error: Exception) -> Response:
    """The API answers in JSON (503, or 500 for a statement's own error); a dashboard page
    says what it cannot show, as a page."""
    if request.url.path.startswith("/ui"):
        return await ui.database_away(request, error)
    return await handle_database_error(request, error)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.check_complete()
    destinations = load_destinations(settings.destinations_file)
    configure_logging(level=settings.log_level, fmt=settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(settings.database_url or "", pool_size=settings.db_pool_size)
        # The read API's own pool: slow or many reads never take a delivery's connection.
        app.state.read_engine = make_engine(
            settings.database_url or "",
            pool_size=READ_POOL_SIZE,
            statement_timeout_ms=READ_STATEMENT_TIMEOUT_MS,
            custom_plans=True,
        )
        app.state.signature_forms = SignatureForms(app.state.engine, settings.signature_forms)
        spool = Spool(settings.spool_path, max_bytes=settings.spool_max_bytes)
        app.state.hashing = HashingKey(app.state.engine, app.state.vault)
        outbox = DestinationsOutbox(app.state.engine, destinations)
        window = settings.group_commit_window_ms / 1000
        # each new event's outbound messages are written as it is recorded, and the derived
        # events it causes (the outbox) in the same transaction
        telling = Telling(destinations, outbox)
        committer = GroupCommit(app.state.engine, app.state.vault, window, telling)
        app.state.receiver = receiver = Receiver(
            app.state.engine,
            app.state.vault,
            spool,
            app.state.hashing,
            settings.rejected_max_bytes,
            record=committer.record,
            record_many=committer.record_many,
            store=partial(store_rejected, outbox=outbox),
            spool_events=outbox,
        )
        names = [d.name for d in destinations]
        outbound_queries.declare_series(names)
        observe = partial(outbound_queries.observe, app.state.read_engine, names)
        app.state.scrape_observers = [observe]
        dispatching = start_dispatcher(settings, destinations)
        drainer = asyncio.create_task(receiver.drain_forever())
        reconciler = start_reconciler(app.state.engine, settings, outbox)
        indexer = (
            asyncio.create_task(
                index_forever(app.state.engine, settings.search_index_interval_seconds)
            )
            if settings.search_index_interval_seconds
            else None
        )
        retention = (
            asyncio.create_task(retention_forever(app.state.engine, settings.body_retention_days))
            if settings.body_retention_days
            else None
        )
        # Everything built so far lives as long as the process: out of the collector's
        # sight, its full collections no longer walk it (they stalled deliveries for tens
        # of milliseconds: p99 96 ms at 1,100 deliveries/s before, 36 ms after).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            receiver.stop()
            await drainer
            await dispatching.stop()
            for task in (reconciler, retention, indexer):
                if task:
                    task.cancel()
            spool.close()
            for kept in (app.state.renewal_totals, app.state.kept_counts):
                await kept.settled()  # sums under way end before their pool closes
            await app.state.engine.dispose()
            await app.state.read_engine.dispose()
            metrics.worker_exited()

    app = FastAPI(
        title="coldmail-webhooks",
        summary="Receives Cold Mail Reseller webhooks and serves what they said to ops.",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        # FastAPI's native OpenTelemetry is unused here (our own logs and Prometheus metrics
        # say what it would), yet its check for a configured provider ran on every request
        # (about 2 % of a delivery's CPU); off, FastAPI skips it.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    # the webhook first of all routes, plainly routed (see route.plain_route)
    app.router.routes.insert(0, route.plain_route())
    add_docs(app)
    app.state.settings = settings
    app.state.destinations = destinations  # DESTINATIONS_FILE's, secrets resolved
    app.state.vault = Vault(settings.fernet_key_list)
    app.state.renewal_totals = KeptValues()
    app.state.kept_counts = KeptValues("incomplete orders")  # ui.kept_incomplete
    app.state.sign_in_throttle = sessions.SignInThrottle()
    app.state.searches = reader.SearchSlots()
    app.include_router(route.router)
    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(ui.router)
    app.include_router(ui.pages)
    app.include_router(outbound_api.router)
    app.include_router(outbound_pages.pages)
    app.add_api_route(
        "/", lambda: RedirectResponse("/ui", status_code=307), include_in_schema=False
    )
    app.mount("/ui/static", StaticFiles(directory=Path(ui.__file__).parent / "static"), "static")
    app.add_exception_handler(sessions.SignInRequired, ui.to_sign_in)
    app.add_exception_handler(ui.PageError, ui.show_error)
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, database_unavailable)
    app.add_middleware(BodyLimit, limits={route.PATH: settings.max_body_bytes})
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(HstsMiddleware)
    app.add_middleware(AccessLogMiddleware)
    return app
