"""Outbound messages delivered to real HTTP receivers (CONTRACT section 9): forwarded in the
transaction of their event, signed, retried on the Standard Webhooks schedule (an injected
clock, never a sleep), a circuit per destination, 410, Retry-After, redirects, replicas."""

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from app.crypto import Vault
from app.db import make_engine
from app.destinations import Destination, load
from app.operations.privacy import ERASED, erase_mailbox
from app.outbound import dead_letters
from app.outbound.dispatch import (
    CIRCUIT_COOLDOWN,
    CIRCUIT_FAILURES,
    RETRY_DELAYS,
    Dispatcher,
    Result,
    clip,
    destination_outcomes,
    retry_after,
    why,
)
from app.outbound.formats import Message
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    OPS_TOKEN,
    SIGNING_KEY,
    WEBHOOK_TOKEN,
    app_client,
    deliver,
    make_settings,
)
from tests.receivers import receiving
from tests.reliability.proxy import Proxy

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Clock:
    """The dispatcher's now, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def destinations_file(tmp_path: Path, *declared: dict[str, Any]) -> Path:
    path = tmp_path / "destinations.yaml"
    path.write_text(orjson.dumps({"destinations": list(declared)}).decode())
    return path


def declared(name: str, url: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "url": url,
        "format": "standard-webhooks",
        "events": ["*"],
        "secretEnv": "CRM_SECRET",
        "allowPrivateNetwork": True,
    } | more


@pytest.fixture(autouse=True)
def secrets_in_environment(monkeypatch):
    monkeypatch.setenv("CRM_SECRET", SECRET)
    monkeypatch.setenv("OTHER_SECRET", OTHER_SECRET)


@asynccontextmanager
async def recording(
    database_url: str, path: Path, **settings: Any
) -> AsyncIterator[tuple[Any, list[Destination]]]:
    """The real app recording deliveries with these destinations (its own dispatcher off:
    the test drives one with its clock)."""
    configured = make_settings(
        database_url, destinations_file=path, outbound_dispatch=False, **settings
    )
    async with app_client(configured) as client:
        yield client, load(path)


async def recorded_for_crm(
    database_url: str, tmp_path: Path, url: str, events: list[dict[str, Any]]
) -> list[Destination]:
    """`events` recorded by the real app for one destination, "crm" at `url`; its
    destinations, for a dispatcher the test then drives."""
    path = destinations_file(tmp_path, declared("crm", url))
    async with recording(database_url, path) as (client, destinations):
        await deliver_all(client, events)
    return destinations


@asynccontextmanager
async def dispatching(
    database_url: str, destinations: list[Destination], clock: Callable[[], datetime], **more: Any
) -> AsyncIterator[Dispatcher]:
    engine = make_engine(database_url, pool_size=4)
    dispatcher = Dispatcher(engine, destinations, clock=clock, random=lambda: 0.5, **more)
    await dispatcher.register()
    try:
        yield dispatcher
    finally:
        await dispatcher.client.aclose()
        await engine.dispose()


async def messages(db, destination: str | None = None):
    return await db.fetch(
        "SELECT * FROM outbound_messages WHERE $1::text IS NULL OR destination = $1 ORDER BY id",
        destination,
    )


async def deliver_all(client, payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        assert (await deliver(client, payload)).status_code == 200


async def test_every_event_is_forwarded_once_signed_in_our_names_without_credentials(
    database_url, db, tmp_path
):
    async with receiving(SECRET) as receiver:
        path = destinations_file(tmp_path, declared("crm", receiver.url))
        created = traffic.mailbox_created()
        prewarmed = traffic.prewarmup_success(domains=2, per_domain=2)
        unknown = traffic.envelope("mailbox.frozen", {"mailboxId": "mb1", "pwd": "canary-x1"})
        async with recording(database_url, path) as (client, destinations):
            await deliver_all(client, [created, prewarmed, unknown, created])  # one duplicate
        # the three events, and the prewarmup order's derived mailboxes.ready (`*` takes all)
        assert len(await messages(db)) == 4
        clock = Clock()
        async with dispatching(database_url, destinations, clock) as dispatcher:
            assert await dispatcher.step() == 4
    assert receiver.bad_signatures == 0 and len(receiver.requests) == 4
    bodies = {body["type"]: body for body in receiver.applied.values()}
    assert set(bodies) == {
        "mailbox.created",
        "prewarmup.order.success",
        "mailbox.frozen",
        "mailboxes.ready",
    }
    forwarded = bodies["mailbox.created"]
    assert forwarded["data"]["eventId"] == created["eventId"]
    assert forwarded["data"]["domain"] == created["data"]["domain"]
    box = forwarded["data"]["mailboxDetails"]
    assert box["mailboxId"] == created["data"]["mailboxDetails"]["mailboxId"]
    assert box["email"] == created["data"]["mailboxDetails"]["email"]
    assert forwarded["timestamp"].endswith("Z") and "eventTime" in forwarded["data"]
    assert bodies["mailbox.frozen"]["data"]["mailboxId"] == "mb1"
    for raw in receiver.bodies():
        assert traffic.CANARY_PREFIX.encode() not in raw
        assert SECRET.encode() not in raw and SIGNING_KEY.encode() not in raw
        for token in (WEBHOOK_TOKEN, OPS_TOKEN, CREDENTIALS_TOKEN, FERNET_KEY):
            assert token.encode() not in raw
    stored = orjson.dumps([dict(r) for r in await messages(db)], default=str)
    assert traffic.CANARY_PREFIX.encode() not in stored
    assert all(r["status"] == "delivered" for r in await messages(db))


async def test_types_wildcards_and_customers_choose_what_each_destination_gets(
    database_url, db, tmp_path
):
    order = traffic.mailbox_order_success()
    mine = traffic.mailbox_created(userId="u-mine")
    spaced = traffic.mailbox_created(userId=" u-mine ")  # the customer as we keep it
    # the same for an order, which is recorded alone (record.record, not a group)
    spaced_order = traffic.mailbox_order_success(userId=" u-mine ")
    # a type we do not model names its customer in its data; another customer's goes nowhere
    frozen = traffic.envelope("mailbox.frozen", {"mailboxId": "mb1", "userId": "u-mine"})
    others = traffic.envelope("mailbox.frozen", {"mailboxId": "mb2", "userId": "u-other"})
    warmup = traffic.envelope("mailbox.warmup.started", {"mailboxId": "mb3"})  # no customer
    path = destinations_file(
        tmp_path,
        declared("orders", "https://orders.example.com/h", events=["mailbox.order.*"]),
        declared("mine", "https://mine.example.com/h", userIds=["u-mine"]),
        declared("none", "https://none.example.com/h", events=["domain.*"]),
        declared("warmups", "https://warmups.example.com/h", events=["mailbox.warmup.*"]),
    )
    async with recording(database_url, path) as (client, _):
        await deliver_all(client, [order, mine, spaced, spaced_order, frozen, others, warmup])
    sent = [(r["destination"], r["type"], r["user_id"]) for r in await messages(db)]
    assert sorted(sent) == [
        ("mine", "mailbox.created", "u-mine"),
        ("mine", "mailbox.created", "u-mine"),
        ("mine", "mailbox.frozen", "u-mine"),
        ("mine", "mailbox.order.success", "u-mine"),
        ("orders", "mailbox.order.success", order["data"]["userId"]),
        ("orders", "mailbox.order.success", "u-mine"),
        ("warmups", "mailbox.warmup.started", None),
    ]


async def test_a_destination_down_longer_than_its_first_retries_gets_everything_once_back(
    database_url, db, tmp_path
):
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created() for _ in range(6)]
        )
        clock = Clock()
        async with dispatching(database_url, destinations, clock) as dispatcher:
            receiver.answer = 503
            assert await dispatcher.step() == 6  # all fail: the circuit opens (5 failures)
            clock.advance(RETRY_DELAYS[0])
            assert await dispatcher.step() == 0  # due again, but the circuit is open
            clock.advance(CIRCUIT_COOLDOWN.total_seconds())
            assert await dispatcher.step() == 1  # one probe: still down
            receiver.answer = 200
            clock.advance(CIRCUIT_COOLDOWN.total_seconds())
            assert await dispatcher.step() == 6  # the probe closes it; the rest go at once
            assert await dispatcher.step() == 0
    rows = await messages(db)
    assert {r["status"] for r in rows} == {"delivered"}
    assert set(receiver.applied) == {r["webhook_id"] for r in rows}
    assert len(receiver.requests) == 6 + 1 + 6
    # every attempt of a message carried its one webhook-id
    assert receiver.received == {r["webhook_id"]: 2 + (r["attempts"] == 3) for r in rows}
    assert receiver.bad_signatures == 0
    state = await db.fetchrow("SELECT * FROM outbound_destinations WHERE name = 'crm'")
    assert state["opened_at"] is None and state["failures"] == 0


async def test_retries_follow_the_standard_webhooks_schedule_then_dead_letters_replay(
    database_url, db, tmp_path
):
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created()]
        )
        receiver.answer = 500
        clock = Clock()
        async with dispatching(database_url, destinations, clock) as dispatcher:
            waits = []
            for _ in range(8):
                assert await dispatcher.step() == 1
                (row,) = await messages(db)
                if row["next_attempt_at"] is not None:
                    waits.append((row["next_attempt_at"] - clock.now).total_seconds())
                    clock.now = row["next_attempt_at"]
            assert waits == list(RETRY_DELAYS)  # jitter drawn at its middle
            assert row["status"] == "dead" and row["attempts"] == 8
            clock.advance(36000 * 2)
            assert await dispatcher.step() == 0
            receiver.answer = 200
            replayed = await dead_letters.replay(
                dispatcher.engine, "crm", dead_letters.Window(until=datetime.now(UTC))
            )
            assert replayed == 1
            assert await dispatcher.step() == 1
    (row,) = await messages(db)
    assert row["status"] == "delivered" and list(receiver.applied) == [row["webhook_id"]]
    assert set(receiver.received) == {row["webhook_id"]}


async def test_jitter_moves_a_retry_by_at_most_a_tenth(database_url, db, tmp_path):
    destination = load(destinations_file(tmp_path, declared("crm", "http://127.0.0.1:9/h")))
    engine = make_engine(database_url, pool_size=1)
    try:
        for draw, expected in ((0.0, 0.9), (1.0, 1.1)):
            dispatcher = Dispatcher(engine, destination, random=partial(float, draw))
            now = datetime.now(UTC)
            failed = Result(now, 1.0, status=500)
            later = dispatcher.next_attempt(2, failed, now)
            assert later is not None
            assert (later - now).total_seconds() == pytest.approx(300 * expected)
            await dispatcher.client.aclose()
    finally:
        await engine.dispose()


async def test_429_and_503_are_retried_when_retry_after_says(database_url, db, tmp_path):
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created()]
        )
        clock = Clock()
        async with dispatching(database_url, destinations, clock) as dispatcher:
            receiver.answer, receiver.answer_headers = 429, {"Retry-After": "120"}
            assert await dispatcher.step() == 1
            (row,) = await messages(db)
            assert (row["next_attempt_at"] - clock.now).total_seconds() == 120
            assert row["last_status"] == 429
            clock.advance(119)
            assert await dispatcher.step() == 0
            receiver.answer = 200
            clock.advance(1)
            assert await dispatcher.step() == 1
    assert (await messages(db))[0]["status"] == "delivered"


async def test_a_retry_after_date_beyond_ten_hours_waits_ten_hours(database_url, db, tmp_path):
    """Retry-After as an HTTP date, read against the time the answer came (in UTC): one
    far ahead is cut to the longest delay."""
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created()]
        )
        clock = Clock()
        async with dispatching(database_url, destinations, clock) as dispatcher:
            receiver.answer = 503
            receiver.answer_headers = {"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"}
            assert await dispatcher.step() == 1
    (row,) = await messages(db)
    assert (row["next_attempt_at"] - clock.now).total_seconds() == 36000
    assert (row["status"], row["last_status"]) == ("pending", 503)


async def test_a_410_stops_that_destination_and_no_other(database_url, db, tmp_path):
    async with receiving(SECRET) as gone, receiving(OTHER_SECRET) as other:
        path = destinations_file(
            tmp_path,
            declared("gone", gone.url),
            declared("other", other.url, secretEnv="OTHER_SECRET"),
        )
        gone.answer = 410
        async with recording(database_url, path) as (client, destinations):
            await deliver_all(client, [traffic.mailbox_created()])
            clock = Clock()
            async with dispatching(database_url, destinations, clock) as dispatcher:
                assert await dispatcher.step() == 2
                await deliver_all(client, [traffic.mailbox_created() for _ in range(3)])
                clock.advance(3600)
                assert await dispatcher.step() == 3  # only the other destination's
                assert len(gone.requests) == 1 and len(other.applied) == 4
                state = await db.fetchrow("SELECT * FROM outbound_destinations WHERE name='gone'")
                assert state["disabled_at"] is not None
                first = (await messages(db, "gone"))[0]
                assert first["status"] == "dead" and first["last_status"] == 410
                gone.answer = 200
                assert await dead_letters.enable(dispatcher.engine, "gone")
                assert await dispatcher.step() == 3
    assert len(gone.applied) == 3 and other.bad_signatures == gone.bad_signatures == 0


async def test_a_redirect_is_never_followed_to_a_private_address(database_url, db, tmp_path):
    async with receiving(SECRET) as redirecting, receiving(SECRET) as internal:
        redirecting.answer = 302
        redirecting.answer_headers = {"Location": internal.url}
        path = destinations_file(tmp_path, declared("crm", redirecting.url))
        async with recording(database_url, path) as (client, destinations):
            await deliver_all(client, [traffic.mailbox_created()])
        async with dispatching(database_url, destinations, Clock()) as dispatcher:
            assert await dispatcher.step() == 1
    assert len(redirecting.requests) == 1 and internal.requests == []
    (row,) = await messages(db)
    assert row["status"] == "pending" and row["last_status"] == 302
    assert row["last_error"] == "redirect (302) not followed"
    attempt = await db.fetchrow("SELECT * FROM outbound_attempts")
    assert attempt["status_code"] == 302 and attempt["error"] == "redirect (302) not followed"


async def test_a_name_that_resolves_to_loopback_at_send_time_is_refused(database_url, db, tmp_path):
    """DNS rebinding: the names resolve to a public address while the service starts, then
    to 127.0.0.1 when it sends (a resolver the test points). Only the destination that
    allows a private network reaches the receiver there."""
    answers = {"rebind.example": ["93.184.216.34"], "lab.example": ["93.184.216.34"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    async with receiving(SECRET) as receiver:
        port = urlsplit(receiver.url).port
        path = destinations_file(
            tmp_path,
            declared("crm", f"http://rebind.example:{port}/hooks", allowPrivateNetwork=False),
            declared("lab", f"http://lab.example:{port}/hooks", events=["mailbox.*"]),
        )
        async with recording(database_url, path) as (client, destinations):
            await deliver_all(client, [traffic.mailbox_created()])
        answers |= {"rebind.example": ["127.0.0.1"], "lab.example": ["127.0.0.1"]}
        async with dispatching(database_url, destinations, Clock(), resolve=resolve) as dispatcher:
            assert await dispatcher.step() == 2
    (heard,) = receiver.applied.values()  # lab's message, at 127.0.0.1: nothing else
    assert heard["type"] == "mailbox.created" and len(receiver.requests) == 1
    crm, lab = await messages(db, "crm"), await messages(db, "lab")
    assert lab[0]["status"] == "delivered"
    assert crm[0]["status"] == "pending" and crm[0]["last_status"] is None
    refused = "rebind.example resolves to the internal address 127.0.0.1: refused"
    assert crm[0]["last_error"] == refused


async def test_two_replicas_never_send_one_message_twice_at_once(database_url, db, tmp_path):
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created() for _ in range(120)]
        )
        receiver.hold = asyncio.Event()  # slow: requests wait until released
        stop = asyncio.Event()
        async with (
            dispatching(database_url, destinations, Clock(), batch=10, workers=3) as first,
            dispatching(database_url, destinations, Clock(), batch=10, workers=3) as second,
        ):
            runs = [asyncio.create_task(d.run(stop)) for d in (first, second)]
            # both replicas' six batches are being sent at once
            await until(lambda: len(receiver.requests) == 60)
            receiver.hold.set()
            await until(lambda: len(receiver.applied) == 120)
            stop.set()
            await asyncio.gather(*runs)
    assert receiver.concurrent_duplicates == []
    assert set(receiver.received.values()) == {1}
    assert {r["status"] for r in await messages(db)} == {"delivered"}


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_slack_message_is_one_short_line_linking_to_the_page_it_names(
    database_url, db, tmp_path, monkeypatch
):
    async with receiving() as slack:
        monkeypatch.setenv("SLACK_URL", slack.url)
        path = destinations_file(
            tmp_path,
            {
                "name": "ops",
                "urlEnv": "SLACK_URL",
                "format": "slack",
                "events": ["prewarmup.order.*"],
                "allowPrivateNetwork": True,
            },
        )
        failed = traffic.prewarmup_failed(order_id="ord/1", failures={"a.com": "DNS <unset>"})
        public = "https://ops.example.com"
        async with recording(database_url, path, public_url=public) as (client, destinations):
            await deliver_all(client, [failed, traffic.mailbox_created()])
        async with dispatching(database_url, destinations, Clock(), public_url=public) as d:
            assert await d.step() == 1
    ((headers, body),) = slack.requests
    assert orjson.loads(body) == {
        "text": "prewarmup.order.failed: orderId ord/1 <https://ops.example.com/ui/orders/ord%2F1|open>"
    }
    assert "webhook-signature" not in headers
    stored = orjson.dumps([dict(r) for r in await messages(db)], default=str)
    assert slack.url.encode() not in stored


async def test_a_dispatcher_started_while_the_database_is_away_sends_once_it_is_back(
    database_url, db, tmp_path, caplog
):
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(
            database_url, tmp_path, receiver.url, [traffic.mailbox_created() for _ in range(3)]
        )
        logging.getLogger().addHandler(caplog.handler)  # the app's start-up replaced it
        proxy = Proxy(database_url)  # the dispatcher's way to PostgreSQL, cut at its start
        engine = make_engine(proxy.url, pool_size=2)
        dispatcher = Dispatcher(engine, destinations, poll_seconds=0.01)
        tries, register = [], dispatcher.register

        async def counted() -> None:
            tries.append(1)
            await register()

        dispatcher.register = counted  # type: ignore[method-assign]
        stop = asyncio.Event()
        run = asyncio.create_task(dispatcher.run(stop))
        try:
            await until(lambda: len(tries) >= 3)  # it tried, failed and tried again
            assert not run.done() and receiver.requests == []  # waiting, not dead
            await proxy.start()
            await until(lambda: len(receiver.applied) == 3)
        finally:
            stop.set()
            await run
            await proxy.cut()
            await engine.dispose()
    assert {r["status"] for r in await messages(db)} == {"delivered"}
    # each wait said why: the database away, and the driver's error class
    prefix = "outbound: the database is away ("
    away = [r.getMessage() for r in caplog.records if r.name == "coldmail.outbound"]
    assert len(away) >= 2 and all(m.startswith(prefix) and m.endswith(")") for m in away)
    assert all(m[len(prefix) :].split(":")[0].endswith("Error") for m in away), away


async def sent_once(database_url: str, tmp_path: Path, *events: dict[str, Any]) -> list[bytes]:
    """The bodies a verifying receiver gets for these events forwarded to one destination
    that takes only their types (nothing derived), sent in one round."""
    async with receiving(SECRET) as receiver:
        types = sorted({event["event"] for event in events})
        path = destinations_file(tmp_path, declared("crm", receiver.url, events=types))
        async with recording(database_url, path) as (client, destinations):
            await deliver_all(client, list(events))
        async with dispatching(database_url, destinations, Clock()) as dispatcher:
            assert await dispatcher.step() == len(events)
    assert receiver.bad_signatures == 0
    bodies: list[bytes] = receiver.bodies()
    return bodies


async def test_a_forwarded_order_carries_its_fields_as_we_keep_them(database_url, db, tmp_path):
    """An order (recorded alone) forwards its fields as modelled: a price sent with float
    noise goes out as the decimal we keep, not as the sender spelled it."""
    order = traffic.mailbox_order_success(price=0.30000000000000004)
    [raw] = await sent_once(database_url, tmp_path, order)
    data = orjson.loads(raw)["data"]
    assert (data["eventId"], data["orderId"]) == (order["eventId"], order["data"]["orderId"])
    kept = await db.fetchval("SELECT price FROM subscriptions")
    assert Decimal(str(data["price"])) == Decimal("0.3") == kept


def created_with_every_credential(**extra: Any) -> dict[str, Any]:
    """A mailbox.created carrying each of the sender's credentials (canaries), a provider,
    an admin flag and a price as the sender spells them, and `extra` fields in its data."""
    box = {
        "mailboxId": traffic.provider_id(),
        "firstName": "John",
        "lastName": "Doe",
        "email": "john@acme.example",
        "isAdmin": "yes",
        "creationTime": "2024-03-08T23:59:59Z",
        "expiryDate": "2025-03-08T23:59:59.294Z",
        "password": traffic.canary("pw"),
        "appPassword": traffic.canary("app"),
        "authenticatorSecret": traffic.canary("totp"),
    }
    data = {
        "userId": "user-1",
        "userEmail": "jane@agency.example",
        "domain": "acme.example",
        "subscriptionId": traffic.provider_id(),
        "orderId": traffic.provider_id(),
        "workspaceType": "Google Workspace",
        "price": 8.16,
        "mailboxDetails": box,
    }
    return traffic.envelope("mailbox.created", data | extra)


async def test_a_forwarded_mailbox_created_goes_out_byte_for_byte_as_before(
    database_url, db, tmp_path
):
    """The body a receiver gets for a forwarded mailbox.created is the one it got when the
    message copied the event's data (key order included), though
    the message now names its stored event and the dispatcher builds the data when it
    sends: no credential, our names, the values as we keep them."""
    created = created_with_every_credential()
    [raw] = await sent_once(database_url, tmp_path, created)
    at = orjson.loads(raw)["timestamp"]
    given = created["data"]
    # in jsonb's key order (shorter first), as a copied message's data came back
    data = {
        "price": "8.1600",
        "domain": "acme.example",
        "userId": "user-1",
        "eventId": created["eventId"],
        "orderId": given["orderId"],
        "eventTime": at,
        "userEmail": "jane@agency.example",
        "workspaceType": "GOOGLE",
        "mailboxDetails": {
            "email": "john@acme.example",
            "isAdmin": True,
            "lastName": "Doe",
            "firstName": "John",
            "mailboxId": given["mailboxDetails"]["mailboxId"],
            "expiryDate": "2025-03-08T23:59:59.294000Z",
            "creationTime": "2024-03-08T23:59:59Z",
        },
        "subscriptionId": given["subscriptionId"],
    }
    assert raw == orjson.dumps({"type": "mailbox.created", "timestamp": at, "data": data})
    assert traffic.CANARY_PREFIX.encode() not in raw


async def test_a_forwarded_message_names_its_event_and_copies_none_of_its_data(
    database_url, db, tmp_path
):
    """A forwarded event's message holds no copy of the event's data (nor of a credential):
    it names the stored event, which its webhook-id and body are sent from on every
    attempt."""
    created = created_with_every_credential()
    path = destinations_file(tmp_path, declared("crm", "https://crm.example.com/h"))
    async with recording(database_url, path) as (client, _):
        await deliver_all(client, [created])
    [message] = await messages(db)
    event = await db.fetchval("SELECT id FROM events WHERE event_id = $1", created["eventId"])
    assert (message["event_id"], message["payload"]) == (event, None)
    assert (message["type"], message["user_id"]) == ("mailbox.created", "user-1")


async def test_a_field_the_sender_added_is_never_forwarded(database_url, db, tmp_path):
    """Only the fields we model go out (docs/outbound.md): a field the sender added, at
    any depth, is not forwarded, whatever its name (`pwd` is named like no credential)."""
    created = created_with_every_credential(pwd=traffic.canary("pwd"), notes="call Jane")
    created["data"]["mailboxDetails"]["recovery"] = {"phone": "+1 555 0100"}
    [raw] = await sent_once(database_url, tmp_path, created)
    data = orjson.loads(raw)["data"]
    assert "pwd" not in data and "notes" not in data
    assert "recovery" not in data["mailboxDetails"] and b"555" not in raw
    assert traffic.CANARY_PREFIX.encode() not in raw
    assert data["mailboxDetails"]["email"] == "john@acme.example"


async def test_a_message_written_before_its_mailbox_was_erased_sends_nothing_erased(
    database_url, db, tmp_path
):
    """A mailbox erased while its forwarded mailbox.created still waits to be sent: what
    is sent is the erased event (its personal fields shown as erased), not what was erased."""
    created = created_with_every_credential()
    mailbox = created["data"]["mailboxDetails"]["mailboxId"]
    async with receiving(SECRET) as receiver:
        destinations = await recorded_for_crm(database_url, tmp_path, receiver.url, [created])
        engine = make_engine(database_url, pool_size=1)
        try:
            assert await erase_mailbox(engine, Vault([FERNET_KEY]), mailbox) is not None
        finally:
            await engine.dispose()
        async with dispatching(database_url, destinations, Clock()) as dispatcher:
            assert await dispatcher.step() == 1
    [raw] = receiver.bodies()
    box = orjson.loads(raw)["data"]["mailboxDetails"]
    assert box["mailboxId"] == mailbox
    assert {box[key] for key in ("email", "firstName", "lastName")} == {ERASED}
    assert b"john@acme.example" not in raw and b"John" not in raw and b"Doe" not in raw


async def test_the_app_sends_what_it_forwards_itself_and_its_dispatcher_ends_with_it(
    database_url, db, tmp_path, monkeypatch
):
    """Unless OUTBOUND_DISPATCH=false, the app runs a dispatcher of its own (dispatch.start):
    what it forwards is sent without another process, a Slack line linking to the public
    URL's page, and when the app stops its dispatcher's connections are closed."""
    async with receiving(SECRET) as crm, receiving() as slack:
        monkeypatch.setenv("SLACK_URL", slack.url)
        failed = ["prewarmup.order.failed"]
        path = destinations_file(
            tmp_path,
            declared("crm", crm.url, events=failed),
            {"name": "ops", "urlEnv": "SLACK_URL", "format": "slack", "events": failed}
            | {"allowPrivateNetwork": True},
        )
        public = "https://ops.example.com"
        settings = make_settings(
            database_url, destinations_file=path, public_url=public, outbound_dispatch=True
        )
        async with app_client(settings) as client:
            order = traffic.prewarmup_failed(order_id="ord-1", failures={"a.com": "DNS"})
            await deliver_all(client, [order])
            await until(lambda: len(crm.applied) == 1 and len(slack.requests) == 1)
    ((_, body),) = slack.requests
    assert f"<{public}/ui/orders/ord-1|open>" in orjson.loads(body)["text"]
    assert crm.bad_signatures == 0
    assert {r["status"] for r in await messages(db)} == {"delivered"}
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    others += " AND pid <> pg_backend_pid()"
    left: list[int] = []

    async def connections() -> int:
        left.append(await db.fetchval(others))
        return left[-1]

    async with asyncio.timeout(10):
        while await connections():
            await asyncio.sleep(0.01)
    assert left[-1] == 0


def test_retry_after_is_read_from_a_429_or_503_in_seconds_or_as_a_date_up_to_ten_hours():
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)

    def asked(status: int, value: str | None = None) -> float | None:
        headers = {} if value is None else {"Retry-After": value}
        return retry_after(httpx.Response(status, headers=headers), now)

    assert asked(429, "120") == asked(503, " 120 ") == 120.0
    assert asked(500, "120") is None and asked(200, "120") is None and asked(410, "1") is None
    assert asked(503, "36001") == asked(503, "86400") == 36000.0  # the longest delay
    assert asked(429, "Sun, 06 Dec 2026 12:02:00 GMT") == 120.0
    assert asked(429, "Sun, 06 Dec 2026 11:58:00 GMT") == 0.0  # a date past: at once
    assert asked(503, "Mon, 07 Dec 2026 12:00:00 GMT") == 36000.0
    assert asked(503, "soon") is None and asked(503) is None and asked(429, "") is None


def test_an_attempt_says_what_the_answer_was_in_at_most_200_characters():
    assert [Result(AT, 1.0, status=s).ok for s in (199, 200, 299, 300, None)] == [
        False,
        True,
        True,
        False,
        False,
    ]
    assert [Result(AT, 1.0, status=s).gone for s in (410, 404, None)] == [True, False, False]
    assert why(200) is None and why(299) is None
    assert why(300) == "redirect (300) not followed" and why(399) == "redirect (399) not followed"
    assert (why(199), why(400), why(503)) == ("answered 199", "answered 400", "answered 503")
    assert clip(None) is None and clip("x" * 201) == clip("x" * 200) == "x" * 200
    assert clip("short") == "short"


AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_rounds_outcomes_are_told_per_destination_in_name_order():
    """Any success, the failures counted, any 410, per destination (sorted, so that rounds
    lock the rows alike), then the failures that open a circuit."""

    def sent(id: int, destination: str) -> Message:
        return Message(id, destination, "mailbox.created", f"msg_{id}", {}, AT, 0)

    messages = [sent(1, "b"), sent(2, "a"), sent(3, "b"), sent(4, "a"), sent(5, "c")]
    results = [
        Result(AT, 1.0, status=500),
        Result(AT, 1.0, status=200),
        Result(AT, 1.0, status=410),
        Result(AT, 1.0, error="ConnectError"),
        Result(AT, 1.0, status=204),
    ]
    assert destination_outcomes(messages, results) == (
        ["a", "b", "c"],
        [True, False, True],
        [1, 2, 0],
        [False, True, False],
        CIRCUIT_FAILURES,
    )
