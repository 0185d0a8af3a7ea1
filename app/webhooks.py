"""POST /webhooks/cmr: authenticate, validate, record and apply, then answer.

A 2xx is sent only after the transaction holding the delivery has committed. Anything
that stops the commit (the database away, a pool exhausted) answers 503 so the sender
retries; nothing it sent is echoed back or logged.
"""

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from app import metrics
from app.config import Settings
from app.crypto import token_matches
from app.errors import DATABASE_ERRORS, ApiError, Unavailable, json_response
from app.ingest import Delivery
from app.processing import process_delivery, store_rejected
from app.schemas import HANDLED_EVENTS, parse_handled
from app.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureCheck, verify

log = logging.getLogger("coldmail.webhooks")
router = APIRouter(tags=["webhooks"])
T = TypeVar("T")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, {"error": "payload_too_large"})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, {"error": "payload_too_large"})
    return bytes(body)


def authenticate(request: Request, raw: bytes, settings: Settings) -> SignatureCheck:
    """Every configured mechanism must pass; in report mode a bad signature is only noted."""
    if settings.webhook_token_list:
        given = request.query_params.get("token") or request.headers.get("x-webhook-token")
        if not token_matches(given, settings.webhook_token_list):
            raise ApiError(401, {"error": "unauthorized"})
    if settings.signing_key is None:
        return SignatureCheck("unchecked")
    check = verify(
        settings.signing_key,
        raw,
        signature=request.headers.get(SIGNATURE_HEADER),
        timestamp=request.headers.get(TIMESTAMP_HEADER),
        tolerance=settings.cmr_signature_tolerance_seconds,
    )
    metrics.SIGNATURES.labels(check.result).inc()
    if not check.ok and settings.cmr_signature_mode == "enforce":
        raise ApiError(401, {"error": "unauthorized"})
    return check


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def parse_envelope(raw: bytes) -> dict[str, Any]:
    """The envelope every event shares; raises a message safe to send back."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON (UTF-8)") from None
    if not isinstance(value, dict):
        raise ValueError("body must be a JSON object")
    for field in ("event", "eventId"):
        item = value.get(field)
        if not isinstance(item, str) or not item.strip() or len(item) > 256:
            raise ValueError(f"'{field}' must be a non-empty string of at most 256 characters")
    if _has_nul(value):
        raise ValueError("strings must not contain NUL characters")
    return value


def validation_details(error: ValidationError) -> list[dict[str, Any]]:
    """loc/msg/type only: pydantic's `input` and `ctx` would echo what was sent."""
    return [
        {"loc": list(item["loc"][1:]), "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_url=False, include_context=False, include_input=False)
    ]


@router.post(
    "/webhooks/cmr",
    summary="Receive a Cold Mail Reseller webhook",
    responses={
        200: {"description": "Committed: processed, duplicate or ignored"},
        400: {"description": "Not a JSON object with string `event` and `eventId`"},
        401: {"description": "Token or signature check failed; nothing stored"},
        413: {"description": "Body larger than MAX_BODY_BYTES"},
        422: {"description": "A handled event whose data breaks its schema; kept as rejected"},
        503: {"description": "Database unavailable; retry later"},
    },
)
async def receive_webhook(request: Request) -> Response:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes)
    signature = authenticate(request, raw, settings)
    try:
        envelope = parse_envelope(raw)
    except ValueError as error:
        await _reject(request, raw, signature, reason="invalid_json", errors=[], envelope=None)
        raise ApiError(400, {"error": "invalid_json", "message": str(error)}) from None
    model = None
    if envelope["event"] in HANDLED_EVENTS:
        try:
            model = parse_handled(envelope)
        except ValidationError as error:
            details = validation_details(error)
            await _reject(
                request, raw, signature, reason="invalid_payload", errors=details, envelope=envelope
            )
            raise ApiError(422, {"error": "invalid_payload", "detail": details}) from None
    delivery = Delivery(envelope=envelope, raw=raw, signature=signature)
    outcome = await _guard(
        process_delivery(request.app.state.engine, request.app.state.vault, delivery, model)
    )
    _observe(delivery, outcome.status, outcome.conflict, started)
    body: dict[str, Any] = {
        "status": outcome.status,
        "eventId": delivery.event_id,
        "event": delivery.event,
    }
    if outcome.conflict:
        body["conflict"] = True
    return json_response(200, body)


async def _reject(
    request: Request,
    raw: bytes,
    signature: SignatureCheck,
    *,
    reason: str,
    errors: list[dict[str, Any]],
    envelope: dict[str, Any] | None,
) -> None:
    metrics.REJECTIONS.labels(reason).inc()
    event = envelope["event"] if envelope else None
    metrics.DELIVERIES.labels(metrics.event_label(event), reason).inc()
    await _guard(
        store_rejected(
            request.app.state.engine,
            request.app.state.vault,
            raw,
            signature,
            reason=reason,
            errors=errors,
            envelope=envelope,
        )
    )
    log.info(
        "delivery rejected",
        extra={
            "outcome": reason,
            "event": envelope and envelope["event"],
            "eventId": envelope and envelope["eventId"],
        },
    )


async def _guard(work: Awaitable[T]) -> T:
    """Await database work, turning any failure to reach or use the database into 503."""
    try:
        return await work
    except DATABASE_ERRORS as error:
        log.warning("database unavailable: %s", type(error).__name__)
        raise Unavailable() from None


def _observe(delivery: Delivery, outcome: str, conflict: bool, started: float) -> None:
    elapsed = time.perf_counter() - started
    metrics.DELIVERIES.labels(metrics.event_label(delivery.event), outcome).inc()
    metrics.LATENCY.labels(outcome).observe(elapsed)
    if conflict:
        metrics.CONFLICTS.inc()
    log.info(
        "delivery",
        extra={
            "eventId": delivery.event_id,
            "event": delivery.event,
            "outcome": outcome,
            "conflict": conflict,
            "latency_ms": round(elapsed * 1000, 2),
        },
    )
