"""No delivery is refused for a detail; a failure that a retry will not cure is kept first."""

from decimal import Decimal
from typing import Any

import orjson
import pytest

from app.recording import record
from app.simulation import traffic as factories
from tests.conftest import OPS_TOKEN, deliver, refuse_doomed_mailboxes

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


async def stored_event(client, event_id: str) -> Any:
    items = (await client.get("/api/v1/events", params={"eventId": event_id}, headers=OPS)).json()
    return (await client.get(f"/api/v1/events/{items['items'][0]['id']}", headers=OPS)).json()


@pytest.mark.parametrize(
    ("payload", "field", "column", "stored"),
    [
        (factories.mailbox_created(price=0.30000000000000004), "price", "price", Decimal("0.3")),
        (factories.mailbox_created(workspaceType="GOOGLE_WORKSPACE"), None, "provider", "GOOGLE"),
        (factories.mailbox_created(workspaceType="Yahoo"), "workspaceType", "provider", None),
        (factories.mailbox_created(details={"expiryDate": ""}), "expiryDate", "expiry_date", None),
        (
            factories.mailbox_created(details={"creationTime": "last tuesday"}),
            "creationTime",
            "creation_time",
            None,
        ),
        (factories.mailbox_created(details={"isAdmin": "maybe"}), "isAdmin", "is_admin", None),
        (factories.mailbox_created(details={"firstName": 42}), "firstName", "first_name", "42"),
    ],
)
async def test_a_descriptive_oddity_is_accepted_repaired_and_noted(
    client, db, payload, field, column, stored
):
    response = await deliver(client, payload)
    assert response.status_code == 200 and response.json()["status"] == "processed"
    assert await db.fetchval(f"select {column} from mailboxes") == stored
    warnings = (await stored_event(client, payload["eventId"]))["warnings"]
    if field is None:  # a known spelling of a provider: nothing to say
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(f"{field}:")


async def test_an_order_level_prewarmup_failure_without_failed_orders_fails_the_order(client):
    order_id = factories.provider_id()
    failed = factories.prewarmup_failed(order_id=order_id, failures={})
    del failed["data"]["failedOrders"]
    failed["data"]["reason"] = "Insufficient wallet balance"
    assert (await deliver(client, failed)).json()["status"] == "processed"
    order = (await client.get(f"/api/v1/orders/{order_id}", headers=OPS)).json()
    assert (order["status"], order["failureReason"], order["domains"]) == (
        "failed",
        "Insufficient wallet balance",
        [],
    )
    # ...unless a domain of it succeeds
    success = factories.prewarmup_success(order_id=order_id, domains=1)
    assert (await deliver(client, success)).status_code == 200
    order = (await client.get(f"/api/v1/orders/{order_id}", headers=OPS)).json()
    assert order["status"] == "partially_failed"


async def test_an_email_too_long_for_an_index_is_cut_not_refused(client, db):
    long_email = "a" * 2800 + "@example.com"
    payload = factories.mailbox_created(details={"email": long_email})
    response = await deliver(client, payload)
    assert response.status_code == 200
    assert await db.fetchval("select length(email) from mailboxes") == 320
    assert (await stored_event(client, payload["eventId"]))["warnings"] == [
        "email: longer than 320 characters; cut"
    ]


async def test_a_cursor_beyond_bigint_is_a_422(client):
    cursor = f"{2**64}-10-10"  # an id beyond bigint
    response = await client.get("/api/v1/mailboxes", params={"cursor": cursor}, headers=OPS)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "cursor"]


async def test_event_type_is_a_synonym_and_a_missing_event_id_is_derived_from_content(client, db):
    created = factories.mailbox_created()
    box_id = created["data"]["mailboxDetails"]["mailboxId"]
    warmup = {"eventType": "mailbox.warmup.started", "data": {"mailboxId": box_id}}
    first = await deliver(client, created)
    answers = [(await deliver(client, warmup)).json() for _ in range(2)]
    assert first.status_code == 200
    assert [a["status"] for a in answers] == ["processed", "duplicate"]
    assert (
        answers[0]["eventId"].startswith("sha256:") and answers[0]["event"] == warmup["eventType"]
    )
    assert await db.fetchval("select warmup_status from mailboxes") == "started"


async def test_a_failure_a_retry_will_not_cure_is_kept_then_answered_500(client, db):
    await refuse_doomed_mailboxes(db)
    secret = factories.canary("app")
    payload = factories.mailbox_created(details={"email": "doomed@x.com", "appPassword": secret})
    response = await deliver(client, payload)
    assert response.status_code == 500
    assert response.json() == {"error": "apply_failed"}
    row = await db.fetchrow(
        "select reason, event_id, errors, body_encrypted from rejected_deliveries"
    )
    assert (row["reason"], row["event_id"]) == ("apply_failed", payload["eventId"])
    assert orjson.loads(row["errors"])[0]["type"] == "XX000"
    assert secret.encode() not in row["body_encrypted"]
    assert await db.fetchval("select count(*) from events") == 0  # nothing half-applied
    rejected = (await client.get("/api/v1/rejected", headers=OPS)).json()["items"]
    assert rejected[0]["reason"] == "apply_failed"
    # once the cause is gone, the sender's retry applies
    await db.execute("drop trigger refuse on mailboxes")
    assert (await deliver(client, payload)).json()["status"] == "processed"
    assert await db.fetchval("select email from mailboxes") == "doomed@x.com"


async def test_a_large_order_failing_at_its_last_mailbox_leaves_nothing_half_written(client, db):
    payload = factories.prewarmup_success(domains=40, per_domain=10)
    last = max(
        box["mailboxId"]
        for group in payload["data"]["mailboxDetails"]
        for box in group["preWarmedUpMailboxes"]
    )
    await refuse_doomed_mailboxes(db, when=f"new.mailbox_id = '{last}'")
    response = await deliver(client, payload)
    assert response.status_code == 500
    for table in ("events", "orders", "subscriptions", "mailboxes"):
        assert await db.fetchval(f"select count(*) from {table}") == 0, table
    await db.execute("drop trigger refuse on mailboxes")
    assert (await deliver(client, payload)).json()["status"] == "processed"
    assert await db.fetchval("select count(*) from mailboxes") == 400


class SealingFailed(Exception):
    pass


async def test_an_order_failing_while_a_part_is_written_is_kept_with_its_own_cause(
    client, db, monkeypatch
):
    """A failure between two parts of an order (here: sealing the second part's
    credentials, while the first part's statement runs) waits for that statement, so the
    transaction rolls back cleanly: the sender is answered 500 and the delivery kept as
    rejected with its own cause, not spooled for a connection left mid-statement."""
    payload = factories.prewarmup_success(domains=3, per_domain=50)  # two parts: record.parts
    sealing = record.sealed
    parts = []

    def sealed(vault, mailboxes):
        parts.append(len(mailboxes))
        if len(parts) == 2:
            raise SealingFailed()
        return sealing(vault, mailboxes)

    monkeypatch.setattr(record, "sealed", sealed)
    response = await deliver(client, payload)
    assert response.status_code == 500 and parts == [100, 50]
    errors = orjson.loads(await db.fetchval("select errors from rejected_deliveries"))
    assert errors[0]["type"] == "SealingFailed"
    for table in ("events", "orders", "subscriptions", "mailboxes"):
        assert await db.fetchval(f"select count(*) from {table}") == 0, table
    monkeypatch.undo()
    assert (await deliver(client, payload)).json()["status"] == "processed"
    assert await db.fetchval("select count(*) from mailboxes") == 150
