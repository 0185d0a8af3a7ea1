"""What each event does to the stored state, in any arrival order."""

import asyncio
import time
from decimal import Decimal

import orjson
import pytest
from cryptography.fernet import Fernet

from app.simulation import traffic as factories
from tests.conftest import FERNET_KEY, credentials_of, deliver
from tests.streams import sent


async def deliver_all(client, payloads):
    for payload in payloads:
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text


async def test_mailbox_order_success_creates_an_active_subscription_and_order(client, db):
    payload = factories.mailbox_order_success(price=8.16)
    await deliver_all(client, [payload])
    data = payload["data"]
    sub = await db.fetchrow("select * from subscriptions")
    assert (
        sub["subscription_id"],
        sub["domain"],
        sub["domain_id"],
        sub["status"],
        sub["source"],
    ) == (data["subscriptionId"], data["domainName"], data["domainId"], "active", "standard")
    assert (sub["price"], sub["quantity"], sub["provider"]) == (Decimal("8.16"), 3, "GOOGLE")
    order = await db.fetchrow("select order_id, kind, status from orders")
    assert tuple(order) == (data["orderId"], "mailbox", "succeeded")
    domain = await db.fetchrow("select domain, status, subscription_id from order_domains")
    assert tuple(domain) == (data["domainName"], "succeeded", data["subscriptionId"])


async def test_mailbox_order_failed_records_the_reason(client, db):
    payload = factories.mailbox_order_failed(workspaceType="microsoft")
    await deliver_all(client, [payload])
    assert await db.fetchval("select status from orders") == "failed"
    assert await db.fetchval("select reason from order_domains") == "Domain not verified"
    assert await db.fetchval("select status from subscriptions") == "failed"
    assert await db.fetchval("select provider from subscriptions") == "MICROSOFT"


async def test_google_mailbox_created_stores_the_app_password_encrypted(client, db):
    payload = factories.mailbox_created(provider="GOOGLE")
    await deliver_all(client, [payload])
    box = await db.fetchrow("select * from mailboxes")
    details = payload["data"]["mailboxDetails"]
    assert (box["mailbox_id"], box["email"], box["provider"], box["is_admin"]) == (
        details["mailboxId"],
        details["email"],
        "GOOGLE",
        True,
    )
    assert box["password_encrypted"] is None
    assert credentials_of(box)["app_password"] == details["appPassword"]
    assert box["subscription_id"] == payload["data"]["subscriptionId"]
    assert await db.fetchval("select status from subscriptions") == "active"


async def test_microsoft_mailbox_created_stores_password_and_final_url(client, db):
    payload = factories.mailbox_created(provider="MICROSOFT")
    await deliver_all(client, [payload])
    box = await db.fetchrow("select * from mailboxes")
    assert box["final_url"] == "https://example.com/oauth-callback"
    assert box["app_password_encrypted"] is None
    assert credentials_of(box)["password"] == payload["data"]["mailboxDetails"]["password"]


async def test_mailbox_updated_changes_only_the_given_fields(client, db):
    created = factories.mailbox_created()
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    update = factories.mailbox_updated(mailbox_id, {"firstName": "Alice", "userName": "ali"})
    await deliver_all(client, [created, update])
    box = await db.fetchrow("select first_name, last_name, user_name from mailboxes")
    assert tuple(box) == ("Alice", "Doe", "ali")


async def test_prewarmup_success_creates_a_subscription_per_domain(client, db):
    payload = factories.prewarmup_success(domains=3, per_domain=2, provider="MICROSOFT")
    await deliver_all(client, [payload])
    rows = await db.fetch(
        "select s.domain, s.source, s.provider, count(m.id) as n from subscriptions s "
        "join mailboxes m using (subscription_id) group by 1, 2, 3 order by 1"
    )
    expected = sorted(g["domain"] for g in payload["data"]["mailboxDetails"])
    assert [r["domain"] for r in rows] == expected
    assert {(r["source"], r["provider"], r["n"]) for r in rows} == {("prewarmed", "MICROSOFT", 2)}
    assert (
        await db.fetchval(
            "select count(*) from mailboxes where password_encrypted is not null and "
            "app_password_encrypted is not null and authenticator_secret_encrypted is not null"
        )
        == 6
    )
    assert await db.fetchval("select status from orders") == "succeeded"


async def test_prewarmup_partial_failure_is_recorded_per_domain(client, db):
    order_id = factories.provider_id()
    success = factories.prewarmup_success(order_id=order_id, domain_names=["a.com"])
    failed = factories.prewarmup_failed(
        order_id=order_id, failures={"b.com": "Insufficient wallet balance"}
    )
    await deliver_all(client, [success, failed])
    assert await db.fetchval("select status from orders") == "partially_failed"
    domains = await db.fetch("select domain, status, reason from order_domains order by domain")
    assert [tuple(d) for d in domains] == [
        ("a.com", "succeeded", None),
        ("b.com", "failed", "Insufficient wallet balance"),
    ]


async def test_prewarmup_failed_for_every_domain_fails_the_order(client, db):
    failed = factories.prewarmup_failed(
        order_id="ord_1", failures={"a.com": "Pre-warmed mailboxes not available", "b.com": "x"}
    )
    await deliver_all(client, [failed])
    assert await db.fetchval("select status from orders") == "failed"
    assert await db.fetchval("select count(*) from subscriptions") == 0


# --- arrival order never changes the outcome -------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_update_and_create_combine_in_either_order(client, db, reverse):
    created = factories.mailbox_created()
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    update = factories.mailbox_updated(mailbox_id, {"lastName": "White", "profilePicture": "p.jpg"})
    await deliver_all(client, [update, created][:: -1 if reverse else 1])
    box = await db.fetchrow(
        "select first_name, last_name, profile_picture, subscription_id, app_password_encrypted "
        "from mailboxes"
    )
    assert (box["first_name"], box["last_name"], box["profile_picture"]) == (
        "John",
        "White",
        "p.jpg",
    )
    assert box["subscription_id"] == created["data"]["subscriptionId"]
    assert box["app_password_encrypted"] is not None


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_of_two_competing_updates_the_later_sent_wins_in_either_order(client, db, reverse):
    created = factories.mailbox_created()
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    earlier = sent(
        factories.mailbox_updated(mailbox_id, {"firstName": "Earlier"}), time.time() - 60
    )
    later = sent(factories.mailbox_updated(mailbox_id, {"firstName": "Later"}), time.time() - 30)
    earlier["eventId"], later["eventId"] = "9-earlier", "1-later"  # eventIds say nothing of time
    stream = [created, earlier, later]
    await deliver_all(client, stream[::-1] if reverse else stream)
    assert await db.fetchval("select first_name from mailboxes") == "Later"


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_created_and_order_success_combine_in_either_order(client, db, reverse):
    success = factories.mailbox_order_success(quantity=2)
    data = success["data"]
    created = [
        factories.mailbox_created(
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain=data["domainName"],
            price=99,
        )
        for _ in range(2)
    ]
    await deliver_all(client, [success, *created] if not reverse else [*created, success])
    assert await db.fetchval("select count(*) from mailboxes") == 2
    sub = await db.fetchrow("select domain_id, price, quantity, status from subscriptions")
    assert tuple(sub) == (data["domainId"], Decimal("11"), 2, "active")


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_one_domain_reported_both_ways_succeeds_and_keeps_the_failure(client, db, reverse):
    order_id = factories.provider_id()
    success = factories.prewarmup_success(order_id=order_id, domain_names=["a.com", "b.com"])
    failed = factories.prewarmup_failed(order_id=order_id, failures={"a.com": "Pool empty"})
    await deliver_all(client, [success, failed] if not reverse else [failed, success])
    assert await db.fetchval("select status from orders") == "succeeded"
    rows = await db.fetch("select domain, status, reason from order_domains order by domain")
    assert [tuple(r) for r in rows] == [
        ("a.com", "succeeded", "Pool empty"),
        ("b.com", "succeeded", None),
    ]


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_standard_order_failure_then_success_is_a_success(client, db, reverse):
    success = factories.mailbox_order_success()
    failed = factories.mailbox_order_failed(
        orderId=success["data"]["orderId"],
        subscriptionId=success["data"]["subscriptionId"],
        domain=success["data"]["domainName"],
    )
    await deliver_all(client, [success, failed] if not reverse else [failed, success])
    assert await db.fetchval("select status from orders") == "succeeded"
    assert await db.fetchval("select status from subscriptions") == "active"


# --- exactly once under concurrency ---------------------------------------------------


async def test_32_concurrent_identical_deliveries_apply_once(client, db):
    payload = factories.prewarmup_success(domains=2, per_domain=3)
    responses = await asyncio.gather(*(deliver(client, payload) for _ in range(32)))
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["duplicate"] * 31 + ["processed"]
    assert await db.fetchval("select count(*) from events") == 1
    assert await db.fetchval("select deliveries from events") == 32
    assert await db.fetchval("select count(*) from mailboxes") == 6


async def test_concurrent_deliveries_for_one_order_combine(client, db):
    order_id = factories.provider_id()
    payloads = [
        factories.prewarmup_success(order_id=order_id, domain_names=[f"d{i}.com"]) for i in range(8)
    ]
    payloads.append(factories.prewarmup_failed(order_id=order_id, failures={"x.com": "Pool"}))
    responses = await asyncio.gather(*(deliver(client, p) for p in payloads))
    assert {r.status_code for r in responses} == {200}
    assert await db.fetchval("select status from orders") == "partially_failed"
    assert await db.fetchval("select count(*) from order_domains") == 9


# --- size and secrecy -------------------------------------------------------------------


async def test_a_600_mailbox_prewarmup_order_stores_each_mailbox_with_its_own_credentials(
    client, db
):
    payload = factories.prewarmup_success(domains=60, per_domain=10)
    first = payload["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]
    first.append(first[0] | {"password": "canary-pw-given-again"})  # listed twice: last wins
    started = time.perf_counter()
    response = await deliver(client, payload)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert await db.fetchval("select count(*) from subscriptions") == 60
    assert await db.fetchval("select count(*) from order_domains where status='succeeded'") == 60
    sent = {
        box["mailboxId"]: (box["password"], box["appPassword"], box["authenticatorSecret"])
        for group in payload["data"]["mailboxDetails"]
        for box in group["preWarmedUpMailboxes"]
    }
    stored = {
        row["mailbox_id"]: tuple(credentials_of(row).values())
        for row in await db.fetch(
            "select mailbox_id, password_encrypted, app_password_encrypted,"
            " authenticator_secret_encrypted from mailboxes"
        )
    }
    assert len(stored) == 600
    assert stored == sent
    assert stored[first[0]["mailboxId"]][0] == "canary-pw-given-again"
    print(f"\n600-mailbox prewarmup delivery: {elapsed * 1000:.0f} ms end to end")


async def test_secrets_are_ciphertext_at_rest_and_redacted_in_the_copy(client, db):
    payload = factories.prewarmup_success(domains=1, per_domain=1)
    box = payload["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"][0]
    secrets = [box["password"], box["appPassword"], box["authenticatorSecret"]]
    response = await deliver(client, payload)
    assert response.status_code == 200
    row = await db.fetchrow("select * from mailboxes")
    event = await db.fetchrow("select payload::text as payload, body_encrypted from events")
    raw_everything = repr(dict(row)) + repr(dict(event))
    for secret in secrets:
        assert secret not in raw_everything
    assert list(credentials_of(row).values()) == secrets
    # sealed as one token: one encryption for the three, each column holding it
    token = row["password_encrypted"]
    assert row["app_password_encrypted"] == token == row["authenticator_secret_encrypted"]
    assert orjson.loads(Fernet(FERNET_KEY).decrypt(token)) == dict(
        zip(("password", "app_password", "authenticator_secret"), secrets, strict=True)
    )
    assert Fernet(FERNET_KEY).decrypt(event["body_encrypted"]).decode().count("canary-") == 3
    assert event["payload"].count('"[REDACTED]"') == 3


# A delivery that loses a race (a deadlock) is tried again at once, up to three times; a
# failure no retry cures is not. The test database plays the race: its first `losses`
# inserts into events fail with `sqlstate` (a sequence counts across rolled-back attempts).
LOSE = """
CREATE SEQUENCE tries;
CREATE FUNCTION lose() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('tries') <= {losses} THEN
        RAISE EXCEPTION 'lost a race (played)' USING ERRCODE = '{sqlstate}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER lose BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION lose();
"""
RETRIED = "retrying a delivery that lost a race"


@pytest.mark.parametrize(
    ("losses", "sqlstate", "answer", "tries"),
    [
        (2, "40P01", "processed", 3),  # two deadlocks: the third try records it
        (3, "40P01", "queued", 3),  # three: spooled for later, the cause in the log
        (1, "23514", None, 1),  # a check violated: kept as rejected at once, not retried
    ],
)
async def test_a_delivery_that_lost_a_race_is_tried_again_up_to_three_times(
    client, db, caplog, losses, sqlstate, answer, tries
):
    await db.execute(LOSE.format(losses=losses, sqlstate=sqlstate))
    payload = factories.prewarmup_success(domains=1, per_domain=2)
    caplog.set_level("INFO")
    response = await deliver(client, payload)
    if answer is None:
        assert response.status_code == 500
        assert await db.fetchval("select reason from rejected_deliveries") == "apply_failed"
    else:
        assert response.status_code == 200 and response.json()["status"] == answer
    if answer != "queued":  # (the spool's drainer may record it meanwhile: one try more)
        assert await db.fetchval("select last_value from tries") == tries
    said = [record.getMessage() for record in caplog.records]
    assert said.count(RETRIED) == tries - 1
    if answer == "processed":
        assert await db.fetchval("select count(*) from mailboxes") == 2
    if answer == "queued":
        assert "DeadlockDetectedError: lost a race (played)" in caplog.text
