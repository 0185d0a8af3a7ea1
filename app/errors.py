"""Error answers shared by the webhook and the read API: always JSON, never an echo."""

import asyncio
import logging
from typing import Any

import asyncpg
import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import is_transient

log = logging.getLogger("coldmail.errors")

RETRY_AFTER_SECONDS = 5
# A read the database could not answer now (unreachable, shutting down, timed out): 503 with
# Retry-After. One it refused for a reason of its own (an error in the statement): 500 and
# a log line, as a retry would fail the same way. Never a traceback in the answer.
# Deliveries do not get here: app/receiving/receiver.py spools them or keeps them as rejected.
DATABASE_ERRORS = (
    SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)


class ApiError(Exception):
    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(body.get("error"))
        self.status = status
        self.body = body
        self.headers = headers


class Unavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(503, {"error": "unavailable"}, {"Retry-After": str(RETRY_AFTER_SECONDS)})


class NotFound(ApiError):
    def __init__(self) -> None:
        super().__init__(404, {"error": "not_found"})


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response(exc.status, exc.body, exc.headers)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown path, wrong method) in the same JSON shape as ours."""
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_response(exc.status_code, {"error": code}, dict(exc.headers or {}))


async def handle_database_error(request: Request, exc: Exception) -> Response:
    if is_transient(exc):
        return await handle_api_error(request, Unavailable())
    log.error("%s failed: %s", request.url.path, type(exc).__name__, exc_info=exc)
    return json_response(500, {"error": "internal_error"})


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
        for item in exc.errors()
    ]
    return json_response(422, {"error": "invalid_request", "detail": detail})
