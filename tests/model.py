"""A small model of the merge rules, written from docs/merge-rules.md and not from the
service's code: what the final state must be after a stream, whatever its arrival order.
The property test compares the service with it, so a rule that is wrong the same way in
every arrival order (say, "partially failed becomes failed") is still caught.

Covered: order status from its domains' outcomes, the mailboxes that exist, the value of
each edited field (the later edit by send time wins), and a subscription's lifecycle
status (the later period wins, then the further state).
"""

from typing import Any

from tests.streams import SENT_AT

STATE_ORDER = ["ACTIVE", "RENEWING", "PAST_DUE", "EXPIRED", "CANCELLED"]


def order_statuses(stream: list[dict[str, Any]]) -> dict[str, str]:
    """Each order's status: succeeded when every known domain succeeded, failed when every
    one failed, else partially_failed; a domain reported both ways counts as succeeded."""
    outcomes: dict[str, dict[str, bool]] = {}  # order -> domain -> succeeded
    for event in stream:
        data, name = event["data"], event["event"]
        reported: list[tuple[str, bool]] = []
        if name == "mailbox.order.success":
            reported = [(data["domainName"], True)]
        elif name == "mailbox.order.failed":
            reported = [(data["domain"], False)]
        elif name == "prewarmup.order.success":
            reported = [(d["domain"], True) for d in data["mailboxDetails"]]
        elif name == "prewarmup.order.failed":
            reported = [(d["domain"], False) for d in data["failedOrders"]]
        domains = outcomes.setdefault(data.get("orderId", ""), {}) if reported else {}
        for domain, succeeded in reported:
            domains[domain] = domains.get(domain, False) or succeeded
    statuses = {}
    for order, domains in outcomes.items():
        results = set(domains.values())
        statuses[order] = (
            "succeeded"
            if results == {True}
            else "failed"
            if results == {False}
            else "partially_failed"
        )
    return statuses


def mailbox_ids(stream: list[dict[str, Any]]) -> set[str]:
    ids = set()
    for event in stream:
        data = event["data"]
        if event["event"] == "mailbox.created":
            ids.add(data["mailboxDetails"]["mailboxId"])
        elif event["event"] == "prewarmup.order.success":
            ids |= {
                m["mailboxId"] for d in data["mailboxDetails"] for m in d["preWarmedUpMailboxes"]
            }
    return ids


def edited_fields(stream: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """(mailboxId, field) -> the value of the edit sent last (ties: the greater eventId)."""
    latest: dict[tuple[str, str], tuple[tuple[float, str], Any]] = {}
    for event in stream:
        if event["event"] != "mailbox.updated":
            continue
        when = (event[SENT_AT], event["eventId"])
        for field, value in event["data"]["updatedFields"].items():
            key = (event["data"]["mailboxId"], field)
            if key not in latest or when > latest[key][0]:
                latest[key] = (when, value)
    return {key: value for key, (_, value) in latest.items()}


def lifecycle_statuses(stream: list[dict[str, Any]]) -> dict[str, str]:
    """subscriptionId -> status: the event of the later period wins, then the further state."""
    best: dict[str, tuple[str, int]] = {}
    for event in stream:
        data = event["data"]
        if not event["event"].startswith("subscription.") or "subscriptionStatus" not in data:
            continue
        rank = (data.get("periodEnd", ""), STATE_ORDER.index(data["subscriptionStatus"]))
        sub = data["subscriptionId"]
        if sub not in best or rank > best[sub]:
            best[sub] = rank
    return {sub: STATE_ORDER[state] for sub, (_, state) in best.items()}


def check(stream: list[dict[str, Any]], state: dict[str, list[dict[str, Any]]]) -> None:
    """Assert the service's final state (tests.state.read_state) is the model's."""
    assert {o["orderId"]: o["status"] for o in state["orders"]} == order_statuses(stream)
    mailboxes = {m["mailboxId"]: m for m in state["mailboxes"]}
    assert set(mailboxes) == mailbox_ids(stream)
    for (box, field), value in edited_fields(stream).items():
        assert mailboxes[box][field] == value, (box, field)
    subscriptions = {s["subscriptionId"]: s for s in state["subscriptions"]}
    for sub, status in lifecycle_statuses(stream).items():
        assert subscriptions[sub]["subscriptionStatus"] == status, sub
