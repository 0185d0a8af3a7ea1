"""Generated data a dashboard must show: a partially failed prewarmup order, a subscription
expiring in five days, mailboxes carrying canary credentials, a rejected delivery."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.simulation import traffic
from tests.conftest import deliver
from tests.streams import subscription_event


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def fill(client: httpx.AsyncClient) -> dict[str, Any]:
    partial = traffic.prewarmup_success(domains=3, per_domain=2)
    groups = partial["data"]["mailboxDetails"]
    failed_domain = groups[2]["domain"]
    failure = traffic.prewarmup_failed(
        order_id=partial["data"]["orderId"], failures={failed_domain: "DNS not verified"}
    )
    partial["data"]["mailboxDetails"] = groups[:2]
    created = [
        traffic.mailbox_created(domain=f"{traffic.provider_id().lower()[:10]}.com", provider=p)
        for p in ("GOOGLE", "MICROSOFT", "GOOGLE", "MICROSOFT", "GOOGLE")
    ]
    expiring_id = created[0]["data"]["subscriptionId"]
    now = datetime.now(UTC)
    renewal = subscription_event(
        "subscription.renewal.success",
        expiring_id,
        subscriptionStatus="ACTIVE",
        periodStart=iso(now - timedelta(days=25)),
        periodEnd=iso(now + timedelta(days=5)),
    )
    for payload in (partial, failure, *created, renewal):
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text
    bad = await deliver(client, b'{"event": "mailbox.created", "eventId": "broken", "data": 7}')
    assert bad.status_code == 422
    return {
        "order_id": partial["data"]["orderId"],
        "failed_domain": failed_domain,
        "expiring": expiring_id,
        "email": created[1]["data"]["mailboxDetails"]["email"],
        "domain": created[1]["data"]["domain"],
        "payloads": [partial, *created],
    }
