"""`reconcile` against a fake of the sender's API: repairs what it can, reports the rest."""

import asyncio
import subprocess
import time
from typing import Any

import pytest

from app.db import make_engine, raw_connection
from app.operations import leases
from app.operations.reconcile import LEASE, SenderApi, reconcile, run_leased
from app.simulation import traffic
from tests import streams
from tests.conftest import app_client, deliver, fresh_database, make_settings
from tests.fake_sender import API_KEY, FakeSender, HeldApi, remote_subscription, serving
from tests.servers import CLI, clean_env
from tests.state import OPS
from tests.test_outbound_delivery import until


def run_reconcile(database_url: str, api_url: str, *args: str, key: str = API_KEY) -> Any:
    env = clean_env(DATABASE_URL=database_url, CMR_API_KEY=key, CMR_API_URL=api_url)
    env |= {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"}
    return subprocess.run(
        [*CLI, "reconcile", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def known_order(client, *, mailboxes: int) -> dict[str, Any]:
    """A subscription we heard of: its order and `mailboxes` of its mailboxes."""
    order = traffic.mailbox_order_success(quantity=3)
    data = order["data"]
    assert (await deliver(client, order)).status_code == 200
    for _ in range(mailboxes):
        box = traffic.mailbox_created(
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain=data["domainName"],
        )
        assert (await deliver(client, box)).status_code == 200
    return dict(data)


async def test_a_clean_run_applies_the_senders_period_and_reports_no_drift(client, database_url):
    known = [await known_order(client, mailboxes=3) for _ in range(5)]
    remote = [remote_subscription(k["subscriptionId"], domain=k["domainName"]) for k in known]
    fake = FakeSender(remote, page_size=2)
    with serving(fake) as url:
        result = run_reconcile(database_url, url)
    assert result.returncode == 0, result.stderr
    assert "reconciled 5 subscriptions in 3 pages" in result.stdout and "no drift" in result.stdout
    assert [page for _, page in fake.requests] == [1, 2, 3]  # stopped at totalPages
    sub = await client.get(f"/api/v1/subscriptions/{known[0]['subscriptionId']}", headers=OPS)
    body = sub.json()
    assert (body["subscriptionStatus"], body["periodEnd"], body["lifecycleSource"]) == (
        "ACTIVE",
        "2026-02-08T10:15:30Z",
        "reconciliation",
    )
    report = (await client.get("/api/v1/reconciliation", headers=OPS)).json()
    assert (report["subscriptions"], report["drift"]) == (5, 0)


async def test_each_kind_of_drift_is_reported_and_the_command_exits_1(client, database_url):
    complete = await known_order(client, mailboxes=3)
    short = await known_order(client, mailboxes=1)  # two mailbox.created never arrived
    further = await known_order(client, mailboxes=3)
    past_due = streams.subscription_event(
        "subscription.past_due", further["subscriptionId"], **streams.period(0)
    )
    assert (await deliver(client, past_due)).status_code == 200
    remote = [
        remote_subscription(complete["subscriptionId"], **streams.period(0)),
        remote_subscription(short["subscriptionId"], **streams.period(0)),
        remote_subscription(further["subscriptionId"], **streams.period(0)),  # says ACTIVE
        remote_subscription("NEVERHEARDOF00000000000000000", domain="lost.com"),
    ]
    with serving(FakeSender(remote)) as url:
        dry = run_reconcile(database_url, url, "--dry-run")
        result = run_reconcile(database_url, url)
    assert dry.returncode == 1 and "would apply" in dry.stdout
    assert result.returncode == 1, result.stderr
    report = (await client.get("/api/v1/reconciliation", headers=OPS)).json()
    assert report["unknown"] == [
        {"subscriptionId": "NEVERHEARDOF00000000000000000", "domain": "lost.com"}
    ]
    assert report["missingMailboxes"] == [
        {"subscriptionId": short["subscriptionId"], "mailboxes": 1, "expected": 3}
    ]
    differs = report["differences"]
    assert [d["subscriptionId"] for d in differs] == [further["subscriptionId"]]
    assert (differs[0]["ours"]["status"], differs[0]["theirs"]["status"]) == ("PAST_DUE", "ACTIVE")
    assert "retry its mailbox.created deliveries" in result.stdout
    assert "drift: 3" in result.stdout


async def test_a_wrong_key_is_one_clear_line_and_exit_2(database_url):
    with serving(FakeSender([])) as url:
        result = run_reconcile(database_url, url, key="wrong-" + API_KEY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "coldmail-webhooks: the sender refused CMR_API_KEY (401): check the key"
    ]
    assert API_KEY not in result.stdout + result.stderr


async def test_429_and_500_are_retried_with_back_off_and_the_key_never_logged(client, database_url):
    known = await known_order(client, mailboxes=3)
    fake = FakeSender([remote_subscription(known["subscriptionId"])])
    fake.failures = [429, 500, 503]
    with serving(fake) as url:
        result = run_reconcile(database_url, url)
    assert result.returncode == 0, result.stderr
    times = [t for t, _ in fake.requests]
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.5 for gap in gaps), gaps  # backed off, not hammered
    assert result.stderr.count("backing off") == 3
    assert API_KEY not in result.stdout + result.stderr


async def test_at_most_5_requests_a_second(database_url):
    remote = [remote_subscription(f"S{i:027d}") for i in range(12)]
    fake = FakeSender(remote, page_size=1)
    with serving(fake) as url:
        result = run_reconcile(database_url, url)
    assert result.returncode == 1  # all twelve unknown to us
    times = [t for t, _ in fake.requests]
    assert len(times) == 12
    assert all(times[i + 5] - times[i] >= 0.99 for i in range(len(times) - 5)), (
        times,
        result.stderr[-2000:],
    )


async def test_a_reconcile_during_deliveries_ends_as_in_either_order(server_url, template_name):
    sent_at = time.time() - 3600
    order = streams.sent(traffic.mailbox_order_success(), sent_at)
    sub = order["data"]["subscriptionId"]
    lifecycle = streams.lifecycle(order, 4, start=sent_at + 100)[:4]  # ends PAST_DUE, period 1
    remote = [remote_subscription(sub, subscriptionStatus="PAST_DUE", **streams.period(1))]

    async def final(mode: str) -> Any:
        async with fresh_database(server_url, template_name) as url:
            settings = make_settings(url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
            async with app_client(settings) as client, _engine(url) as engine:
                with serving(FakeSender(remote)) as api_url:
                    api = SenderApi(api_url, API_KEY)
                    send = _send_all(client, [order, *lifecycle])
                    if mode == "events first":
                        await send
                        await reconcile(engine, api, dry_run=False)
                    elif mode == "reconcile first":
                        await deliver(client, order)
                        await reconcile(engine, api, dry_run=False)
                        await send
                    else:
                        await asyncio.gather(send, reconcile(engine, api, dry_run=False))
                    await api.close()
                body = (await client.get(f"/api/v1/subscriptions/{sub}", headers=OPS)).json()
                return {k: body[k] for k in ("subscriptionStatus", "periodEnd", "autoRenew")}

    states = [await final(m) for m in ("events first", "reconcile first", "together")]
    assert states[0]["subscriptionStatus"] == "PAST_DUE"
    assert states[0] == states[1] == states[2]


async def _send_all(client, payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        assert (await deliver(client, payload)).status_code == 200


class _engine:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, pool_size=2)

    async def __aenter__(self) -> Any:
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.dispose()


async def test_serve_reconciles_on_its_own_when_an_interval_is_set(database_url):
    remote = [remote_subscription("PERIODIC000000000000000000000")]
    with serving(FakeSender(remote)) as url:
        settings = make_settings(
            database_url, cmr_api_key=API_KEY, cmr_api_url=url, reconcile_interval_seconds=1
        )
        async with app_client(settings) as client:
            for _ in range(50):
                report = await client.get("/api/v1/reconciliation", headers=OPS)
                if report.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            metrics = (await client.get("/metrics")).text
    assert report.json()["unknown"] == [
        {"subscriptionId": "PERIODIC000000000000000000000", "domain": "company.com"}
    ]
    assert 'cmr_reconcile_drift{kind="unknown"} 1.0' in metrics


async def test_one_periodic_run_at_a_time_and_the_next_once_it_has_ended(database_url):
    """Two replicas: while one runs, the other's turn passes without a run; once it has
    ended (its connections back in their pools), the other's next turn runs."""
    async with _engine(database_url) as one, _engine(database_url) as two:
        await one_at_a_time(one, two)
        assert await reports(two) == 2


async def one_at_a_time(one: Any, two: Any) -> None:
    """A run on `one` held under way: a run on `two` passes without running; once the
    first has ended, the next on `two` runs."""
    made: list[str] = []
    go, ready = asyncio.Event(), asyncio.Event()
    ready.set()  # a second run would not wait: it would show at once
    first = asyncio.create_task(run_leased(one, lambda: HeldApi("first", made, go)))
    try:
        await until(lambda: made == ["first"])
        await run_leased(two, lambda: HeldApi("second", made, ready))
        assert made == ["first"]
        go.set()
        await first
        await run_leased(two, lambda: HeldApi("second", made, ready))
        assert made == ["first", "second"]
    finally:
        go.set()
        await asyncio.gather(first, return_exceptions=True)


async def test_a_lease_its_holder_left_to_expire_is_taken_and_a_lost_one_stops_the_run(
    database_url,
):
    """A runner that died leaves its lease until it expires, then the next run takes it;
    a run whose lease another took stops before it applies its page."""
    remote = [remote_subscription("LEASED0000000000000000000000")]
    async with _engine(database_url) as engine, raw_connection(engine) as conn:
        assert await leases.take(conn, LEASE, "died", seconds=0)
        made: list[str] = []
        go = asyncio.Event()
        go.set()
        await run_leased(engine, lambda: HeldApi("next", made, go))
        assert made == ["next"] and await reports(engine) == 1

        assert await leases.take(conn, LEASE, "slow", seconds=0)
        assert await leases.take(conn, LEASE, "other")  # the slow one's lease expired
        with serving(FakeSender(remote)) as url:
            api = SenderApi(url, API_KEY)
            with pytest.raises(leases.LeaseLost) as lost:
                await reconcile(engine, api, dry_run=False, holder="slow")
            assert lost.value.args == (LEASE,)  # it names the lease it lost
            await api.close()
        assert await conn.fetchval("SELECT count(*) FROM subscriptions") == 0
        assert not await leases.take(conn, LEASE, "third")  # still the other's


async def reports(engine: Any) -> int:
    async with raw_connection(engine) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM reconciliations"))
