"""Derived outbound events: each written in the transaction of its cause, once per change
of state; not again on a duplicate delivery or an older event arriving late. Read from
the outbound_messages rows the service wrote, through the real HTTP app."""

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from app.outbound import summaries
from app.outbound.derived import AT_RISK
from app.simulation import traffic
from tests import streams
from tests.conftest import app_client, asyncpg_dsn, deliver, make_settings
from tests.state import OPS

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
NOW = time.time()
EARLIER, LATER = NOW - 3 * 3600, NOW - 3600
DERIVED = list(summaries.DERIVED_TYPES)


def destinations_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`crm` takes every derived event; `everything` every type (the CMR events too)."""
    monkeypatch.setenv("CRM_SECRET", SECRET)
    path = tmp_path / "destinations.yaml"
    crm: dict[str, Any] = {"name": "crm", "url": "https://crm.example.com/hooks"}
    crm |= {"format": "standard-webhooks", "events": DERIVED, "secretEnv": "CRM_SECRET"}
    slack: dict[str, Any] = {"name": "slack", "url": "https://hooks.slack.com/services/T0/B0/x"}
    slack |= {"format": "slack", "events": ["order.*", "subscription.at_risk"]}
    path.write_text(orjson.dumps({"destinations": [crm, slack]}).decode())
    return path


@pytest.fixture
async def client(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        database_url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        cmr_signature_tolerance_seconds=streams.TOLERANCE,
        outbound_dispatch=False,  # what is written is read here; nothing is sent
    )
    async with app_client(settings) as http:
        yield http


async def told(db: asyncpg.Connection, type: str, destination: str = "crm") -> list[Any]:
    """The data of each message of `type` written for the destination, oldest first."""
    rows = await db.fetch(
        "SELECT payload FROM outbound_messages WHERE destination = $1 AND type = $2 ORDER BY id",
        destination,
        type,
    )
    return [orjson.loads(row["payload"]) for row in rows]


async def send(client: httpx.AsyncClient, *payloads: dict[str, Any]) -> None:
    for payload in payloads:
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text


# --- orders ---------------------------------------------------------------------------


def partial_order() -> tuple[str, list[dict[str, Any]]]:
    """A prewarmup order: one domain succeeded, two failed with their reasons."""
    order_id = traffic.provider_id()
    success = traffic.prewarmup_success(order_id=order_id, domain_names=["good.com"])
    failed = traffic.prewarmup_failed(
        order_id=order_id,
        failures={"bad.com": "Domain not verified", "worse.com": "DNS <records> missing"},
    )
    return order_id, [streams.sent(success, EARLIER), streams.sent(failed, LATER)]


async def test_a_partially_failed_order_is_told_once_with_each_failed_domain(client, db):
    order_id, (success, failed) = partial_order()
    await send(client, success)
    assert await told(db, "order.partially_failed") == []
    await send(client, failed)
    [message] = await told(db, "order.partially_failed")
    assert message["orderId"] == order_id
    assert message["failedDomains"] == [
        {"domain": "bad.com", "reason": "Domain not verified"},
        {"domain": "worse.com", "reason": "DNS <records> missing"},
    ]
    assert message["succeededDomains"] == ["good.com"]
    # the same delivery again, and the same failure sent again under a new eventId: no change
    await send(client, failed, failed | {"eventId": traffic.provider_id()})
    assert len(await told(db, "order.partially_failed")) == 1
    assert await told(db, "order.failed") == []


async def test_an_older_success_arriving_late_turns_a_failed_order_partial_once(client, db):
    order_id, (success, failed) = partial_order()
    await send(client, failed)  # the later event first: every domain known so far failed
    [first] = await told(db, "order.failed")
    assert [d["domain"] for d in first["failedDomains"]] == ["bad.com", "worse.com"]
    await send(client, success)  # the older success, late: a new state, told once
    assert len(await told(db, "order.partially_failed")) == 1
    await send(client, success)
    assert len(await told(db, "order.failed")) == 1
    assert len(await told(db, "order.partially_failed")) == 1


async def test_a_failure_arriving_after_the_success_of_its_domain_tells_nothing(client, db):
    success = traffic.mailbox_order_success()
    data = success["data"]
    late_failure = traffic.mailbox_order_failed(
        orderId=data["orderId"], subscriptionId=data["subscriptionId"], domain=data["domainName"]
    )
    await send(client, streams.sent(success, LATER), streams.sent(late_failure, EARLIER))
    # success wins: the order stays succeeded, so nothing failed is told
    assert await told(db, "order.failed") == []
    assert await told(db, "order.partially_failed") == []


async def test_the_slack_message_of_a_partially_failed_order_names_each_domain_and_reason(
    client, db
):
    order_id, stream = partial_order()
    await send(client, *stream)
    [data] = await told(db, "order.partially_failed", destination="slack")
    # the body the dispatcher sends to the Slack destination
    text = slack_body("order.partially_failed", data, "https://ops.example.com")
    assert "bad.com: Domain not verified" in text
    assert "worse.com: DNS &lt;records&gt; missing" in text  # Slack's mrkdwn, escaped
    assert "good.com" not in text.split("Failed:")[1]
    assert f"<https://ops.example.com/ui/orders/{order_id}|open>" in text


def slack_body(type: str, data: dict[str, Any], public_url: str) -> str:
    from app.destinations import Destination
    from app.outbound.formats import Message, request

    slack = Destination.model_validate(
        {"name": "slack", "url": "https://hooks.slack.com/services/T0/B0/x", "format": "slack"}
        | {"events": ["*"]}
    )
    message = Message(1, "slack", type, "msg_1", data, datetime.now(UTC), 0)
    body, _ = request(slack, message, public_url=public_url, sent_at=datetime.now(UTC))
    text: str = orjson.loads(body)["text"]
    assert "\n" not in text and len(text) < 300  # one short line
    return text


# --- mailboxes ready ------------------------------------------------------------------


async def test_mailboxes_ready_is_told_when_the_last_mailbox_of_an_order_is_stored(client, db):
    events = streams.standard_order(3, False, [], start=EARLIER)
    order_id = events[0]["data"]["orderId"]
    await send(client, *events[:3])  # the order and two of its three mailboxes
    assert await told(db, "mailboxes.ready") == []
    await send(client, events[3])
    [ready] = await told(db, "mailboxes.ready")
    assert (ready["orderId"], ready["mailboxCount"]) == (order_id, 3)
    await send(client, events[3], events[0])  # duplicates
    # the last mailbox sent again under a new eventId: stored already, nothing new is ready
    await send(client, events[3] | {"eventId": traffic.provider_id()})
    assert len(await told(db, "mailboxes.ready")) == 1


async def test_mailboxes_ready_waits_for_the_order_when_the_mailboxes_come_first(client, db):
    events = streams.standard_order(2, False, [], start=EARLIER)
    await send(client, *events[1:])
    assert await told(db, "mailboxes.ready") == []
    await send(client, events[0])  # the order, late: now its mailboxes are all there
    assert [m["mailboxCount"] for m in await told(db, "mailboxes.ready")] == [2]


async def test_a_group_committed_together_tells_each_ready_order_once(
    database_url, tmp_path, monkeypatch, db
):
    """The last mailboxes of two orders, with a mailbox of an order never stored, meet in one
    group (one transaction, its subjects read at once): each order is told ready once."""
    orders = [streams.standard_order(2, False, [], start=EARLIER) for _ in range(2)]
    settings = make_settings(
        database_url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        cmr_signature_tolerance_seconds=streams.TOLERANCE,
        outbound_dispatch=False,
        group_commit_window_ms=300,  # a burst in one process meets in one group
    )
    async with app_client(settings) as client:
        await send(client, *(event for events in orders for event in events[:2]))
        assert await told(db, "mailboxes.ready") == []
        burst = [events[2] for events in orders] + [traffic.mailbox_created()]
        answers = await asyncio.gather(*(deliver(client, p) for p in burst))
    assert [a.status_code for a in answers] == [200] * 3
    ids = [p["eventId"] for p in burst]
    writers = "SELECT count(DISTINCT xmin::text) FROM events WHERE event_id = ANY($1)"
    assert await db.fetchval(writers, ids) == 1
    ready = await told(db, "mailboxes.ready")
    assert sorted((m["orderId"], m["mailboxCount"]) for m in ready) == sorted(
        (events[0]["data"]["orderId"], 2) for events in orders
    )


async def test_mailboxes_ready_is_told_once_when_the_order_and_its_last_mailbox_arrive_at_once(
    client, db
):
    """The order and its last mailbox are recorded at the same time, the order first: its
    read of the mailboxes cannot see the last one (not committed), and the mailbox's
    statement began before the order was committed. The mailbox still tells it ready: it
    waited for the order on their subscription's row, and reads that row as written."""
    events = streams.standard_order(2, False, [], start=EARLIER)
    subscription_id = events[0]["data"]["subscriptionId"]
    await send(client, events[1])  # the first mailbox (and the subscription)
    await db.execute("BEGIN")
    await db.execute(
        "SELECT FROM subscriptions WHERE subscription_id = $1 FOR UPDATE", subscription_id
    )
    order = asyncio.ensure_future(deliver(client, events[0]))
    await until_waiting(db, 1)
    last = asyncio.ensure_future(deliver(client, events[2]))
    await until_waiting(db, 2)
    assert await told(db, "mailboxes.ready") == []
    await db.execute("COMMIT")
    answers = await asyncio.gather(order, last)
    assert [a.status_code for a in answers] == [200, 200]
    ready = await told(db, "mailboxes.ready")
    assert [(m["orderId"], m["mailboxCount"]) for m in ready] == [(events[0]["data"]["orderId"], 2)]


@pytest.mark.parametrize("window_ms", [0, 2], ids=["alone", "grouped"])
async def test_mailboxes_ready_is_told_once_when_the_last_mailboxes_of_two_domains_arrive_at_once(
    database_url, tmp_path, monkeypatch, db, window_ms
):
    """An order over two domains (two subscriptions), the last mailbox of each recorded at
    the same time by two replicas (each delivery on its own, or in a group of its
    replica): each counts the order's mailboxes while the other's is not committed. Here
    both have written their mailbox when the orders are let go: one waits to read them (the
    table held), the other behind it (the order's lock), so each would find the other's
    missing without that lock; the order is still told ready, once."""
    order_id, user = traffic.provider_id(), traffic.provider_id()
    orders = [traffic.mailbox_order_success(orderId=order_id, userId=user, quantity=1)]
    orders.append(traffic.mailbox_order_success(orderId=order_id, userId=user, quantity=1))
    boxes = [
        streams.sent(
            traffic.mailbox_created(
                subscriptionId=order["data"]["subscriptionId"],
                orderId=order_id,
                domain=order["data"]["domainName"],
                userId=user,
            ),
            LATER,
        )
        for order in orders
    ]
    settings = make_settings(
        database_url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        cmr_signature_tolerance_seconds=streams.TOLERANCE,
        outbound_dispatch=False,
        group_commit_window_ms=window_ms,
    )
    async with app_client(settings) as one, app_client(settings) as other:
        await send(one, *(streams.sent(order, EARLIER) for order in orders))
        await db.execute("BEGIN")
        await db.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        last = [
            asyncio.ensure_future(deliver(replica, box))
            for replica, box in zip((one, other), boxes, strict=True)
        ]
        await until_waiting(db, 2)
        assert await told(db, "mailboxes.ready") == []
        await db.execute("COMMIT")
        answers = await asyncio.gather(*last)
    assert [a.status_code for a in answers] == [200, 200]
    ready = await told(db, "mailboxes.ready")
    assert [(m["orderId"], m["mailboxCount"], len(m["domains"])) for m in ready] == [
        (order_id, 2, 2)
    ]


async def test_mailboxes_naming_their_order_complete_it_whatever_subscription_they_name(client, db):
    """Readiness counts an order's mailboxes by order and domain: mailboxes that name
    another subscription than the order's still complete it."""
    events = streams.standard_order(2, False, [], start=EARLIER)
    other = traffic.provider_id()
    await send(
        client,
        events[0],
        *(e | {"data": e["data"] | {"subscriptionId": other}} for e in events[1:]),
    )
    assert [m["mailboxCount"] for m in await told(db, "mailboxes.ready")] == [2]


# The statements held up by this session's locks: waiting for one it holds, or behind such a
# statement (a delivery waiting for an advisory lock another holds while it waits for the
# table). Read from pg_locks, which is read anew by every statement: pg_stat_activity, read
# in a transaction (the lock's), lists only the sessions there were at its first read in
# it, so a delivery on a connection its replica opens after that is never counted.
HELD_UP = """
WITH RECURSIVE waiting AS (SELECT DISTINCT pid FROM pg_locks WHERE NOT granted),
held_up (pid) AS (
    SELECT pid FROM waiting WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))
    UNION
    SELECT w.pid FROM waiting w JOIN held_up h ON h.pid = ANY(pg_blocking_pids(w.pid)))
SELECT count(*) FROM held_up
"""


async def until_waiting(db: asyncpg.Connection, count: int) -> None:
    """Until `count` statements are held up by the locks `db` holds (bounded: a minute)."""
    deadline = time.monotonic() + 60
    while await db.fetchval(HELD_UP) < count:
        assert time.monotonic() < deadline, f"{count} deliveries never waited together"
        await asyncio.sleep(0.02)


async def test_until_waiting_counts_statements_of_connections_opened_after_its_first_read(
    database_url, db
):
    """The tests above hold a lock in a transaction, then wait until deliveries wait on it:
    a replica may open a delivery's connection after that wait began (its pool empty or
    busy: more likely under load), and that delivery is counted too. Only the statements
    held up by the lock are: a wait on another session's lock is not."""
    dsn = asyncpg_dsn(database_url)
    holder = await asyncpg.connect(dsn)
    late = []
    try:
        await db.execute("BEGIN")
        await db.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        assert await db.fetchval(HELD_UP) == 0  # the first read in the lock's transaction
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")
        late = [await asyncpg.connect(dsn) for _ in range(2)]
        reads = [
            asyncio.ensure_future(late[0].fetchval("SELECT count(*) FROM orders")),
            asyncio.ensure_future(late[1].fetchval("SELECT count(*) FROM mailboxes")),
        ]
        await until_waiting(db, 1)
        on_mailboxes = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = $1"
        deadline = time.monotonic() + 60
        while not await holder.fetchval(on_mailboxes, late[1].get_server_pid()):
            assert time.monotonic() < deadline, "the read of mailboxes never waited"
            await asyncio.sleep(0.02)
        assert await db.fetchval(HELD_UP) == 1
        await db.execute("COMMIT")
        await holder.execute("COMMIT")
        assert await asyncio.gather(*reads) == [0, 0]
    finally:
        for conn in (holder, *late):
            await conn.close()


async def test_a_subscriptions_mailboxes_without_an_order_are_ready_at_its_quantity(client, db):
    """Mailboxes heard of without an order: ready once as many are stored as the
    subscription is billed for, not before, and not again."""
    sub = traffic.provider_id()
    billed = lifecycle("subscription.renewal.success", sub, EARLIER, quantity=2, **near(30))
    boxes = [
        streams.sent(traffic.mailbox_created(subscriptionId=sub, orderId=None), EARLIER + i)
        for i in (1, 2)
    ]
    await send(client, billed, boxes[0])
    assert await told(db, "mailboxes.ready") == []
    await send(client, boxes[1], boxes[1])
    ready = await told(db, "mailboxes.ready")
    assert [(m["subscriptionId"], m["orderId"], m["mailboxCount"]) for m in ready] == [
        (sub, None, 2)
    ]


async def test_a_prewarmup_order_is_ready_with_its_one_delivery(client, db):
    order = traffic.prewarmup_success(domains=2, per_domain=3)
    await send(client, order, order, order | {"eventId": traffic.provider_id()})
    [ready] = await told(db, "mailboxes.ready")
    assert ready["mailboxCount"] == 6
    assert len(ready["domains"]) == 2
    assert "password" not in orjson.dumps(ready).decode().lower()


# --- subscriptions at risk ------------------------------------------------------------


def near(days: int) -> dict[str, str]:
    end = datetime.now(UTC) + timedelta(days=days)
    return {"periodStart": (end - timedelta(days=30)).isoformat(), "periodEnd": end.isoformat()}


def lifecycle(event: str, sub: str, at: float, **data: Any) -> dict[str, Any]:
    return streams.sent(streams.subscription_event(event, sub, domain="risk.com", **data), at)


async def test_a_renewal_failure_is_told_once_and_a_new_risk_again(client, db):
    sub = traffic.provider_id()
    failed = lifecycle("subscription.renewal.failed", sub, EARLIER, **near(3))
    await send(client, failed, failed)
    [first] = await told(db, "subscription.at_risk")
    # a failed renewal leaves the subscription past due
    assert (first["subscriptionId"], first["newRisks"]) == (sub, ["renewal_failed", "past_due"])
    # a late, older event that changes no risk tells nothing
    await send(client, lifecycle("subscription.renewing", sub, EARLIER - 60, **near(3)))
    assert len(await told(db, "subscription.at_risk")) == 1
    await send(client, lifecycle("subscription.updated", sub, LATER, autoRenew=False))
    second = (await told(db, "subscription.at_risk"))[1]
    assert second["newRisks"] == ["auto_renew_off"]
    # its risks are those the renewals list shows
    listed = await client.get("/api/v1/renewals", headers=OPS, params={"withinDays": 30})
    [shown] = [r for r in listed.json()["items"] if r["subscriptionId"] == sub]
    assert "auto_renew_off" in shown["risks"]
    assert second["risks"] == [r for r in AT_RISK if r in shown["risks"]]


async def test_a_domain_in_its_grace_period_puts_its_subscriptions_at_risk(client, db):
    order = traffic.mailbox_order_success()
    data = order["data"]
    grace = traffic.envelope(
        "domain.grace_period", {"domainId": data["domainId"]} | streams.expiry(0)
    )
    await send(client, order)
    assert await told(db, "subscription.at_risk") == []
    await send(client, grace, grace)
    [risk] = await told(db, "subscription.at_risk")
    assert (risk["subscriptionId"], risk["newRisks"]) == (
        data["subscriptionId"],
        ["domain_grace_period"],
    )


async def test_a_healthy_subscription_tells_nothing(client, db):
    sub = traffic.provider_id()
    await send(client, lifecycle("subscription.renewal.success", sub, EARLIER, **near(20)))
    assert await told(db, "subscription.at_risk") == []


# --- rejected deliveries --------------------------------------------------------------


async def test_rejected_deliveries_are_told_once_per_cause_and_window(client, db):
    for _ in range(3):
        await deliver(client, b"{not json")
    bad_payload = traffic.envelope("mailbox.created", {"mailboxDetails": {}})
    bad_payload["eventId"] = None
    for _ in range(2):
        assert (await deliver(client, bad_payload)).status_code in (400, 422)
    told_rejections = await told(db, "deliveries.rejected")
    assert sorted(m["reason"] for m in told_rejections) == ["invalid_json", "invalid_payload"]
    stored = await db.fetchval("SELECT count(*) FROM rejected_deliveries")
    assert stored == 5


# --- reconciliation and the spool -----------------------------------------------------


async def test_reconcile_drift_is_told_when_it_changes_not_when_found_again(
    client, db, database_url, tmp_path, monkeypatch
):
    from app.db import make_engine
    from app.destinations import load
    from app.operations.reconcile import SenderApi, reconcile
    from app.outbound.outbox import DestinationsOutbox
    from tests.fake_sender import API_KEY, FakeSender, remote_subscription, serving

    engine = make_engine(database_url)
    outbox = DestinationsOutbox(engine, load(destinations_file(tmp_path, monkeypatch)))

    async def run(remote: list[dict[str, Any]]) -> None:
        with serving(FakeSender(remote)) as url:
            api = SenderApi(url, API_KEY)
            try:
                await reconcile(engine, api, dry_run=False, outbox=outbox)
            finally:
                await api.close()

    lost = remote_subscription("NEVERHEARDOF00000000000000000", domain="lost.com")
    try:
        await run([lost])
        await run([lost])  # the same drift again
        assert [m["unknown"] for m in await told(db, "reconcile.drift")] == [1]
        other = remote_subscription("ALSONEVERHEARDOF0000000000000", domain="gone.com")
        await run([lost, other])
        assert [m["unknown"] for m in await told(db, "reconcile.drift")] == [1, 2]
    finally:
        await engine.dispose()


async def test_the_spool_is_told_once_started_and_once_drained(database_url, tmp_path, monkeypatch):
    from tests.reliability.proxy import Proxy
    from tests.reliability.test_spool import wait_until_drained

    proxy = Proxy(database_url)
    await proxy.start()
    settings = make_settings(
        proxy.url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        outbound_dispatch=False,
    )
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with app_client(settings) as client:
            await proxy.cut()
            for _ in range(3):
                assert (await deliver(client, traffic.mailbox_created())).status_code == 200
            await proxy.restore()
            await wait_until_drained(client)
            [started] = await told(conn, "spool.started")
            [drained] = await eventually(lambda: told(conn, "spool.drained"))
        assert started["depth"] == 3 and drained["applied"] == 3
        assert started["replica"] == drained["replica"]
    finally:
        await conn.close()


async def eventually(read: Callable[[], Awaitable[list[Any]]], patience: float = 30) -> list[Any]:
    """What `read` returns once it is not empty (the drainer writes after it empties)."""
    deadline = time.monotonic() + patience
    while not (found := await read()):
        assert time.monotonic() < deadline, "never written"
        await asyncio.sleep(0.05)
    return found
