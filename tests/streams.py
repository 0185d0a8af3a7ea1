"""Realistic event streams: orders with their mailboxes and edits, prewarmup orders with
partial failures, second orders on a subscription, subscription lifecycles and domain events.

Every event carries the time it was sent (`SENT_AT`, signed as cmr-x-timestamp when
delivered), so edits keep their order whatever order the stream arrives in.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from app.simulation import traffic

SENT_AT = "_sentAt"  # taken off the payload by the sender and signed as its timestamp
# Streams span hours of send times: the apps they are sent to accept timestamps this old.
TOLERANCE = 86_400


def sent(payload: dict[str, Any], at: float) -> dict[str, Any]:
    """Stamp a payload with the Unix time it was sent."""
    payload[SENT_AT] = int(at)
    return payload


def period(k: int) -> dict[str, str]:
    start = datetime(2026, 1, 8, 10, 15, 30, tzinfo=UTC) + timedelta(days=30 * k)
    return {
        "periodStart": start.isoformat().replace("+00:00", "Z"),
        "periodEnd": (start + timedelta(days=30)).isoformat().replace("+00:00", "Z"),
    }


def subscription_event(event: str, subscription_id: str, **data: Any) -> dict[str, Any]:
    body = {"subscriptionId": subscription_id, "userId": "USR94KD7S2LQ8X5M1Z0"} | data
    return traffic.envelope(event, body)


def standard_order(
    n_boxes: int, with_failure: bool, edits: list[tuple[int, str, str]], *, start: float
) -> list[dict[str, Any]]:
    """An order, its mailboxes, a failure report for the same domain, and edits in time order."""
    user = traffic.provider_id()
    success = traffic.mailbox_order_success(userId=user, quantity=n_boxes)
    data = success["data"]
    events = [sent(success, start)]
    boxes = []
    for i in range(n_boxes):
        created = traffic.mailbox_created(
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain=data["domainName"],
            userId=user,
        )
        boxes.append(created["data"]["mailboxDetails"])
        events.append(sent(created, start + 1 + i))
    if with_failure:
        failed = traffic.mailbox_order_failed(
            orderId=data["orderId"],
            subscriptionId=data["subscriptionId"],
            domain=data["domainName"],
            userId=user,
        )
        events.append(sent(failed, start + 1))
    for k, (index, field, value) in enumerate(edits):
        box = boxes[index % n_boxes]
        update = traffic.mailbox_updated(
            box["mailboxId"], {field: value}, domain=data["domainName"], email=box["email"]
        )
        events.append(sent(update, start + 10 + k))
    return events


def second_order(first: dict[str, Any], n_boxes: int, *, start: float) -> list[dict[str, Any]]:
    """ "Add mailboxes to a subscription": another order on the first one's subscription."""
    data = first["data"]
    success = traffic.mailbox_order_success(
        subscriptionId=data["subscriptionId"],
        domainName=data["domainName"],
        domainId=data["domainId"],
        userId=data["userId"],
        quantity=n_boxes,
        price=9,
    )
    events = [sent(success, start)]
    for i in range(n_boxes):
        created = traffic.mailbox_created(
            subscriptionId=data["subscriptionId"],
            orderId=success["data"]["orderId"],
            domain=data["domainName"],
            userId=data["userId"],
        )
        events.append(sent(created, start + 1 + i))
    return events


def prewarmup_order(ok: int, failed: int, both_ways: bool, *, start: float) -> list[dict[str, Any]]:
    order_id = traffic.provider_id()
    names = [f"d{i}-{traffic.provider_id()[:6].lower()}.com" for i in range(ok + failed)]
    events = []
    if ok:
        success = traffic.prewarmup_success(
            order_id=order_id, domain_names=names[:ok], per_domain=2
        )
        events.append(sent(success, start))
    failures = {n: "Insufficient wallet balance" for n in names[ok:]}
    if both_ways and ok:
        failures[names[0]] = "Pre-warmed mailboxes not available"
    if failures:
        report = traffic.prewarmup_failed(order_id=order_id, failures=failures)
        if events:  # one order, one customer
            report["data"]["userId"] = events[0]["data"]["userId"]
        events.append(sent(report, start))
    return events


LIFECYCLE_STEPS = [
    # (event, period index, status) in the order the sender would send them
    ("subscription.renewing", 0, "RENEWING"),
    ("subscription.renewal.success", 1, "ACTIVE"),
    ("subscription.renewing", 1, "RENEWING"),
    ("subscription.renewal.failed", 1, "PAST_DUE"),
    ("subscription.expired", 1, "EXPIRED"),
]


def lifecycle(order: dict[str, Any], steps: int, *, start: float) -> list[dict[str, Any]]:
    """The first `steps` lifecycle events of an order's subscription, and its domain's."""
    data = order["data"]
    events = []
    for k, (event, p, status) in enumerate(LIFECYCLE_STEPS[:steps]):
        payload = subscription_event(
            event,
            data["subscriptionId"],
            domain=data["domainName"],
            subscriptionStatus=status,
            autoRenew=k % 2 == 0,
            quantity=data["quantity"],
            **period(p),
        )
        events.append(sent(payload, start + k))
    grace = traffic.envelope(
        "domain.grace_period",
        {"domainId": data["domainId"], "domainName": data["domainName"], **expiry(0)},
    )
    events.append(sent(grace, start + steps))
    return events


def expiry(k: int) -> dict[str, str]:
    return {"expiryDate": period(k)["periodEnd"]}
