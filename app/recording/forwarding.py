"""Forwarding a stored CMR event to the outbound destinations (CONTRACT section 9): its
type as it came, its eventId and event time, and its fields in our names (the payload
models' declared fields, camelCase as the read API). Never a field the sender added that
we did not model, and never a credential (SentCredentials' fields, and anything named like
one, at any depth: app/outbound/messages.without_credentials).

A forwarded event's messages copy none of its data: each names the stored event (its
events row), and the dispatcher builds the data when it sends (`data_of`), from the
event's stored, redacted copy (app/crypto.redact shows every declared field but the
credentials, so the copy validates to the fields the delivery's own model had). An
erasure of that copy (app/operations/privacy.py) so reaches what is still to be sent, and
a delivery pays no dump of its data."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from app.crypto import REDACTED
from app.destinations import Destination
from app.outbound.messages import credential_named, wanted, without_credentials
from app.receiving import payloads

CREDENTIAL_FIELDS = frozenset(payloads.SentCredentials.model_fields)


@dataclass(frozen=True)
class Forwarded:
    """A stored event's messages, written by the statement that records the event
    (app/outbound/messages.forward_sql, gated on it being new), or with its group's."""

    names: list[str]  # the destinations that want it
    type: str
    user_id: str | None
    occurred_at: datetime

    def arguments(self) -> list[Any]:
        """forward_sql's parameters."""
        return [self.names, self.type, self.user_id, self.occurred_at]


def forwarded(
    destinations: Sequence[Destination],
    *,
    event: str,
    event_time: datetime,
    envelope: dict[str, Any],
    model: payloads.HandledEvent | None,
) -> Forwarded | None:
    """The event's messages, or None when no destination wants it."""
    data = envelope.get("data")
    user_id = getattr(model.data, "userId", None) if model is not None else None
    if user_id is None and isinstance(data, dict) and isinstance(data.get("userId"), str):
        user_id = data["userId"]
    names = wanted(destinations, event, user_id)
    return Forwarded(names, event, user_id, event_time) if names else None


def data_of(stored: dict[str, Any], event_id: str, event_time: datetime) -> dict[str, Any]:
    """A forwarded event's `data`, from its stored (redacted) copy: the eventId and event
    time, then the declared fields of the model the copy validates to; an event type we do
    not model (or a copy that no longer validates), only what the copy shows. Never a field
    named like a credential; keys in jsonb's order (`jsonb_keys`), at any depth."""
    head = {"eventId": event_id, "eventTime": to_jsonable_python(event_time)}
    try:
        model = payloads.parse_handled(stored, [])
    except ValidationError:
        model = None
    if model is None:
        return dict(jsonb_order(without_credentials(head | unmodelled(stored.get("data")))))
    # `declared` gave each nested object its keys in jsonb's order already (sent_fields):
    # only the top level, where the head joins, is ordered here, not walked again
    data = head | declared(model.data)
    return {key: data[key] for key in jsonb_keys(data)}


def jsonb_keys(keys: Iterable[str]) -> list[str]:
    """`keys` in the order PostgreSQL's jsonb keeps an object's keys in (shorter first,
    then bytewise): the order a message's copied data came back in, so a receiver gets the
    bytes it got before messages named their event (migration 0029)."""
    return sorted(keys, key=lambda key: (len(key.encode()), key.encode()))


def jsonb_order(value: Any) -> Any:
    """A JSON value with every object's keys in jsonb's order, at any depth."""
    if isinstance(value, dict):
        return {key: jsonb_order(value[key]) for key in jsonb_keys(value)}
    if isinstance(value, list):
        return [jsonb_order(item) for item in value]
    return value


@cache
def sent_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """A model's declared fields but those named like a credential (each of
    SentCredentials' fields is, tests/test_outbound_messages.py), in jsonb's order."""
    return tuple(jsonb_keys(f for f in model.model_fields if not credential_named(f)))


def declared(value: Any) -> Any:
    """A model's declared fields that have a value, in their (our) names, as JSON, at any
    depth, without the credentials (shown as REDACTED in the copy): what the sender added
    besides them is left out."""
    if isinstance(value, BaseModel):
        fields = ((name, getattr(value, name)) for name in sent_fields(type(value)))
        return {name: declared(item) for name, item in fields if item is not None}
    if isinstance(value, list):
        return [declared(item) for item in value]
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return value
    return to_jsonable_python(value)  # a time, a decimal


def unmodelled(data: Any) -> dict[str, Any]:
    """An event type we do not model: only what the stored copy shows (app/crypto.redact's
    allow-list), without the redacted fields."""
    return drop_redacted(data) if isinstance(data, dict) else {}


def drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [drop_redacted(item) for item in value if item != REDACTED]
    return value
