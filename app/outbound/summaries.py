"""What a Slack message says of a derived event: one short line naming what happened, and
the dashboard page of what it names (a path under the dashboard's address)."""

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

Summary = tuple[str, str]  # the text (Slack mrkdwn, escaped) and the page's path


def escape(value: object) -> str:
    """Slack's three control characters (its mrkdwn would read a sender's `<` as a link)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def page(kind: str, key: str) -> str:
    return f"/ui/{kind}/{quote(key, safe='')}"


def whose(data: dict[str, Any]) -> str:
    who = data.get("userEmail") or data.get("userId")
    return f" for {escape(who)}" if who else ""


def order(data: dict[str, Any]) -> Summary:
    failed = "; ".join(
        f"{escape(d['domain'])}: {escape(d['reason'] or 'no reason given')}"
        for d in data["failedDomains"]
    )
    if data["status"] == "partially_failed":
        what = f"partially failed ({len(data['succeededDomains'])} succeeded). Failed: {failed}"
    else:
        what = f"failed: {failed or escape(data.get('reason') or 'no reason given')}"
    text = f"Order {escape(data['orderId'])}{whose(data)} {what}"
    return text, page("orders", data["orderId"])


def mailboxes_ready(data: dict[str, Any]) -> Summary:
    domains = ", ".join(escape(d["domain"]) for d in data["domains"])
    text = f"{data['mailboxCount']} mailboxes ready{whose(data)} on {domains}"
    if data.get("orderId"):
        return f"{text} (order {escape(data['orderId'])})", page("orders", data["orderId"])
    return text, page("subscriptions", data["subscriptionId"])


def at_risk(data: dict[str, Any]) -> Summary:
    risks = ", ".join(risk.replace("_", " ") for risk in data["newRisks"])
    name = escape(data["domain"] or data["subscriptionId"])
    text = f"Subscription {name}{whose(data)} at risk: {risks}"
    return text, page("subscriptions", data["subscriptionId"])


def rejected(data: dict[str, Any]) -> Summary:
    text = f"Deliveries rejected ({escape(data['reason'])}) since {data['windowStart']}"
    return text, "/ui/rejected"


def spool_started(data: dict[str, Any]) -> Summary:
    replica = escape(data["replica"])
    text = f"The database was away: {replica} spooled deliveries since {data['since']}"
    return text, "/ui"


def spool_drained(data: dict[str, Any]) -> Summary:
    text = f"Spool of {escape(data['replica'])} drained: {data['applied']} deliveries applied"
    return text, "/ui"


def drift(data: dict[str, Any]) -> Summary:
    text = (
        f"Reconciliation drift: {data['unknown']} unknown subscriptions,"
        f" {data['missingMailboxes']} with missing mailboxes, {data['differences']} differences"
    )
    return text, "/ui"


SUMMARIES: dict[str, Callable[[dict[str, Any]], Summary]] = {
    "order.failed": order,
    "order.partially_failed": order,
    "mailboxes.ready": mailboxes_ready,
    "subscription.at_risk": at_risk,
    "deliveries.rejected": rejected,
    "spool.started": spool_started,
    "spool.drained": spool_drained,
    "reconcile.drift": drift,
}
DERIVED_TYPES = tuple(SUMMARIES)


def slack_text(event_type: str, data: dict[str, Any], dashboard: str | None) -> str | None:
    """The Slack line of a derived event, with a link to its page at `dashboard` (the
    dashboard's public address, PUBLIC_URL) when known; None for a type not derived."""
    summarise = SUMMARIES.get(event_type)
    if summarise is None:
        return None
    text, path = summarise(data)
    return f"{text} <{dashboard.rstrip('/')}{path}|open>" if dashboard else text
