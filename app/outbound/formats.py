"""What a message looks like on the wire, per destination format (CONTRACT section 9).

`standard-webhooks`: body `{"type", "timestamp", "data"}`, headers `webhook-id` (the
message's, the same on every attempt), `webhook-timestamp` (this attempt's) and
`webhook-signature`, signed by the reference `standardwebhooks` package.
`slack`: a Slack incoming webhook's `{"text": ...}`, one short line that links to the
dashboard page of what it names when PUBLIC_URL is set. `SLACK_TEXT` holds the wording of
the types that need more than the generic line (derived events add theirs there).
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from standardwebhooks.webhooks import Webhook

from app.destinations import Destination
from app.outbound import summaries


@dataclass(frozen=True)
class Message:
    """A claimed message, as the dispatcher sends it."""

    id: int
    destination: str
    type: str
    webhook_id: str
    data: dict[str, Any]
    occurred_at: datetime
    attempts: int


def request(
    destination: Destination, message: Message, *, public_url: str | None, sent_at: datetime
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt."""
    if destination.format == "slack":
        text = slack_text(message.type, message.data, public_url)
        return orjson.dumps({"text": text}), {"content-type": "application/json"}
    return signed(destination, message, sent_at)


def signed(
    destination: Destination, message: Message, sent_at: datetime
) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(
        {
            "type": message.type,
            "timestamp": message.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "data": message.data,
        }
    )
    assert destination.secret is not None, "a standard-webhooks destination has its secret"
    signature = Webhook(destination.secret.get_secret_value()).sign(
        message.webhook_id, sent_at, body.decode()
    )
    headers = {
        "content-type": "application/json",
        "webhook-id": message.webhook_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
    }
    return body, headers


# The dashboard page of what a message names: the first of these IDs it carries.
PAGES = (
    ("orderId", "orders"),
    ("subscriptionId", "subscriptions"),
    ("mailboxId", "mailboxes"),
)
SlackText = Callable[[dict[str, Any]], str]
SLACK_TEXT: dict[str, SlackText] = {}


def page(data: dict[str, Any], public_url: str | None) -> str | None:
    if not public_url:
        return None
    for key, section in PAGES:
        if isinstance(value := data.get(key), str) and value:
            return f"{public_url.rstrip('/')}/ui/{section}/{quote(value, safe='')}"
    return None


def slack_text(type: str, data: dict[str, Any], public_url: str | None) -> str:
    """`type: what it is about`, linked to its page (Slack's `<url|label>`)."""
    if (derived := summaries.slack_text(type, data, public_url)) is not None:
        return derived
    line = SLACK_TEXT[type](data) if type in SLACK_TEXT else generic(type, data)
    link = page(data, public_url)
    return f"{escape(line)} <{link}|open>" if link else escape(line)


def generic(type: str, data: dict[str, Any]) -> str:
    about = [
        f"{key} {data[key]}"
        for key in ("domainName", "domain", "orderId", "subscriptionId", "mailboxId", "email")
        if isinstance(data.get(key), str)
    ]
    return f"{type}: " + ", ".join(about[:3]) if about else type


def escape(text: str) -> str:
    """Slack's three control characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
