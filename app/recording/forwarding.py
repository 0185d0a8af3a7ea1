"""Forwarding a stored CMR event to the outbound destinations (CONTRACT section 9): its
type as it came, its eventId and event time, and its fields in our names (the payload
models' fields, camelCase as the read API). Only declared fields go out, never one the
sender added that we did not model, and never a credential (SentCredentials' fields, and
anything named like one, at any depth: app/outbound/messages.without_credentials)."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from app.crypto import REDACTED, redact
from app.destinations import Destination
from app.outbound.messages import wanted, without_credentials
from app.receiving import payloads

CREDENTIAL_FIELDS = frozenset(payloads.SentCredentials.model_fields)


@dataclass(frozen=True)
class Forwarded:
    """A stored event's messages, written by the statement that records the event
    (`enqueue_sql` gated on it being new)."""

    names: list[str]  # the destinations that want it
    type: str
    data: dict[str, Any]  # without credentials already (`forwarded`)
    user_id: str | None
    occurred_at: datetime

    def arguments(self) -> list[Any]:
        """app/outbound/messages.enqueue_arguments' list: the body's data as it is."""
        body = orjson.dumps(self.data).decode()
        return [self.names, self.type, body, self.user_id, self.occurred_at]


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
    return Forwarded(names, event, without_credentials(body), user_id, event_time)


def declared(model: BaseModel) -> dict[str, Any]:
    """A payload model's declared fields that have a value, in their (our) names, as JSON
    (pydantic's own dump: a third of the time of walking the fields here). It still holds
    the credentials: `forwarded` drops every field named like one, at any depth, which
    each of SentCredentials' fields is (tests/test_outbound_messages.py)."""
    return model.model_dump(mode="json", exclude_none=True)


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
