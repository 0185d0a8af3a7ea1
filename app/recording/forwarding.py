"""Forwarding a stored CMR event to the outbound destinations (CONTRACT section 9): its
type as it came, its eventId and event time, and its fields in our names (the payload
models' fields, camelCase as the read API). Only declared fields go out, never one the
sender added that we did not model, and never a credential (SentCredentials' fields, and
anything named like one: app/outbound/messages.without_credentials)."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from app.crypto import REDACTED, redact
from app.destinations import Destination
from app.outbound.messages import enqueue_arguments, wanted
from app.receiving import payloads

CREDENTIAL_FIELDS = frozenset(payloads.SentCredentials.model_fields)


@dataclass(frozen=True)
class Forwarded:
    """A stored event's messages, written by the statement that records the event
    (`enqueue_sql` gated on it being new)."""

    names: list[str]  # the destinations that want it
    type: str
    data: dict[str, Any]
    user_id: str | None
    occurred_at: datetime

    def arguments(self) -> list[Any]:
        return enqueue_arguments(self.names, self.type, self.data, self.user_id, self.occurred_at)


def forwarded(
    destinations: Sequence[Destination],
    *,
    event: str,
    event_id: str | None,
    event_time: datetime,
    envelope: dict[str, Any],
    model: payloads.HandledEvent | None,
) -> Forwarded | None:
    """The event's message, or None when no destination wants it."""
    data = envelope.get("data")
    user_id = getattr(model.data, "userId", None) if model is not None else None
    if user_id is None and isinstance(data, dict) and isinstance(data.get("userId"), str):
        user_id = data["userId"]
    names = wanted(destinations, event, user_id)
    if not names:
        return None
    fields = declared(model.data) if model is not None else unmodelled(data)
    body = {"eventId": event_id, "eventTime": to_jsonable_python(event_time)} | fields
    return Forwarded(names, event, body, user_id, event_time)


def declared(model: BaseModel) -> dict[str, Any]:
    """A payload model's declared fields that have a value, in their (our) names."""
    fields: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name not in CREDENTIAL_FIELDS and value is not None:
            fields[name] = json_value(value)
    return fields


def json_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return declared(value)
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    return to_jsonable_python(value)


def unmodelled(data: Any) -> dict[str, Any]:
    """An event type we do not model: only what the stored copy shows (app/crypto.redact's
    allow-list), without the redacted fields."""
    return drop_redacted(redact(data)) if isinstance(data, dict) else {}


def drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [drop_redacted(item) for item in value if item != REDACTED]
    return value
