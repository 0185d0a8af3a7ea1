"""Promises of the edge that one-line mistakes broke unseen: token lists as operators type
them, the signature window on both sides, the HTTPS rule by client address, the session's
two lifetimes, the rejected bodies' bound, and every outcome counted in its metric.

Each test varies what code could confuse (several tokens per role, clients on loopback,
private and public addresses, times in the past and the future) and asserts both ways."""

import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.config import Settings
from app.crypto import Vault
from app.db import make_engine
from app.main import create_app
from app.receiving.delivery import Rejection
from app.receiving.signing import verify
from app.recording.record import store_rejected
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    OPS_TOKEN,
    WEBHOOK_TOKEN,
    app_client,
    deliver,
    make_settings,
    refuse_doomed_mailboxes,
    sender_signature,
)

CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


def token(role: str) -> str:
    return f"{role}-{os.urandom(8).hex()}"


# --- comma-separated token lists, typed with spaces -------------------------------------


async def test_every_token_of_a_list_typed_with_spaces_works_in_its_role(database_url):
    hooks, ops, creds = ([token(role) for _ in range(3)] for role in ("wh", "ops", "cred"))
    settings = make_settings(
        database_url,
        webhook_tokens=f"{hooks[0]}, {hooks[1]} ,  {hooks[2]}",
        ops_api_tokens=f" {ops[0]},{ops[1]}, {ops[2]}",
        credentials_api_tokens=f"{creds[0]} , {creds[1]},{creds[2]} ",
    )
    async with app_client(settings) as client:
        payload = traffic.mailbox_created()
        mailbox = payload["data"]["mailboxDetails"]["mailboxId"]
        for i, hook in enumerate(hooks):
            sent = traffic.mailbox_created() if i else payload
            assert (await deliver(client, sent, token=hook)).status_code == 200, i
        for wrong in (f"{hooks[1]} ", hooks[1][:-1], ops[0], creds[0]):
            assert (
                await deliver(client, traffic.mailbox_created(), token=wrong)
            ).status_code == 401

        def bearer(value: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {value}"}

        for reader in (*ops, *creds):
            listed = await client.get("/api/v1/mailboxes", headers=bearer(reader))
            assert listed.status_code == 200, reader[:4]
        assert (await client.get("/api/v1/mailboxes", headers=bearer(hooks[1]))).status_code == 401
        path = f"/api/v1/mailboxes/{mailbox}/credentials"
        for reader in creds:
            assert (await client.get(path, headers=bearer(reader))).status_code == 200
        for reader in ops:
            assert (await client.get(path, headers=bearer(reader))).status_code == 403
        for reader in (ops[2], creds[2]):  # the dashboard's sign-in too
            client.cookies.clear()
            signed = await client.post(
                "/ui/login",
                content=f"token={reader}",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert signed.status_code == 303, reader[:4]


# --- the signature's replay window, in the past and in the future -----------------------

KEY = "cmr-partner-key-7f3a"
BODY = b'{"event":"mailbox.created","eventId":"E1"}'
NOW = 1_760_000_000


def signed_at(ts: str) -> str:
    """The sender's signature over `<ts>.<body>`, computed here (hex)."""
    return hmac.new(KEY.encode(), f"{ts}.".encode() + BODY, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("offset", "result"),
    [(-301, "stale"), (-299, "valid"), (0, "valid"), (299, "valid"), (301, "stale")],
)
@pytest.mark.parametrize("unit", [1, 1000])  # seconds, or milliseconds
def test_the_signature_window_holds_on_both_sides_of_now(offset, result, unit):
    ts = str((NOW + offset) * unit)
    check = verify(KEY, BODY, signature=signed_at(ts), timestamp=ts, tolerance=300, now=NOW)
    assert check.result == result


async def test_a_delivery_signed_ten_minutes_in_the_future_is_refused(client, db):
    body = orjson.dumps(traffic.mailbox_created())
    for offset, status in ((600, 401), (-600, 401), (-60, 200), (60, 200)):
        headers = sender_signature(body, timestamp=int(time.time()) + offset)
        headers["content-type"] = "application/json"
        response = await client.post(
            "/webhooks/cmr", content=body, params={"token": WEBHOOK_TOKEN}, headers=headers
        )
        assert response.status_code == status, offset
    assert await db.fetchval("select count(*) from events") == 1


# --- the HTTPS rule: loopback is not "private" ------------------------------------------


@asynccontextmanager
async def client_at(
    settings: Settings, address: str | None, *, scheme: str = "http", proxy: bool = False
) -> AsyncIterator[httpx.AsyncClient]:
    """The app as a client at `address` reaches it (None: one without an address, as over
    a unix socket), through uvicorn's proxy-headers middleware (as `serve` runs it) when
    `proxy`."""
    application = create_app(settings)
    served: Any = application
    if proxy:
        served = ProxyHeadersMiddleware(served, trusted_hosts=settings.forwarded_allow_ips)
    async with application.router.lifespan_context(application):
        client: Any = (address, 40000) if address else None
        transport = httpx.ASGITransport(app=served, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://test") as http:
            yield http


@pytest.mark.parametrize(
    ("address", "scheme", "headers", "proxy", "allowed"),
    [
        ("127.0.0.1", "http", {}, False, True),  # on the host itself
        ("::1", "http", {}, False, True),
        ("127.0.0.1", "http", {"x-forwarded-for": "203.0.113.9"}, False, False),  # a proxy
        ("10.1.2.3", "http", {}, False, False),  # private is not loopback
        ("192.168.7.20", "http", {}, False, False),
        ("172.16.4.4", "http", {}, False, False),
        ("203.0.113.9", "http", {}, False, False),  # public
        ("localhost", "http", {}, False, False),  # a name, not an address
        (None, "http", {}, False, False),  # no address at all
        ("10.1.2.3", "https", {}, False, True),  # TLS at this server
        # a trusted proxy (127.0.0.1) that terminated TLS for a private or public client
        ("127.0.0.1", "http", {"x-forwarded-proto": "https", "x-forwarded-for": "10.9.9.9"},
         True, True),
        ("127.0.0.1", "http", {"x-forwarded-proto": "http", "x-forwarded-for": "10.9.9.9"},
         True, False),
        # an untrusted client claiming https
        ("10.1.2.3", "http", {"x-forwarded-proto": "https", "x-forwarded-for": "10.9.9.9"},
         True, False),
    ],
)  # fmt: skip
async def test_credentials_go_only_over_https_or_to_a_loopback_client_without_a_proxy(
    settings, address, scheme, headers, proxy, allowed
):
    payload = traffic.mailbox_created()
    mailbox = payload["data"]["mailboxDetails"]["mailboxId"]
    async with client_at(settings, "127.0.0.1") as local:
        assert (await deliver(local, payload)).status_code == 200
    async with client_at(settings, address, scheme=scheme, proxy=proxy) as http:
        got = await http.get(f"/api/v1/mailboxes/{mailbox}/credentials", headers=CREDS | headers)
    if allowed:
        assert got.status_code == 200, got.text
        assert got.json()["appPassword"] == payload["data"]["mailboxDetails"]["appPassword"]
    else:
        assert (got.status_code, got.json()) == (403, {"error": "https_required"})


# --- the dashboard session: idle timeout and absolute lifetime --------------------------


@pytest.mark.parametrize(
    ("created", "seen", "open_"),
    [
        (timedelta(hours=7, minutes=59), timedelta(minutes=1), True),
        (timedelta(hours=8, minutes=1), timedelta(minutes=1), False),  # active, yet too old
        (timedelta(hours=1), timedelta(minutes=29), True),
        (timedelta(hours=1), timedelta(minutes=31), False),  # idle too long
    ],
)
async def test_a_session_ends_after_its_idle_timeout_and_after_its_lifetime(
    client, db, created, seen, open_
):
    signed = await client.post(
        "/ui/login",
        content=f"token={OPS_TOKEN}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert signed.status_code == 303 and (await client.get("/ui")).status_code == 200
    await db.execute(
        "update ui_sessions set created_at = now() - $1::interval,"
        " last_seen_at = now() - $2::interval",
        created,
        seen,
    )
    assert (await client.get("/ui")).status_code == (200 if open_ else 303)


# --- the rejected bodies' bound drops the oldest ----------------------------------------


async def test_past_the_bound_the_oldest_rejected_bodies_go_and_the_newest_stay(
    database_url, db, caplog
):
    engine = make_engine(database_url, pool_size=1)
    vault = Vault([FERNET_KEY])
    bodies = [
        orjson.dumps({"event": "mailbox.created", "n": n, "pad": "x" * 400}) for n in range(5)
    ]
    size = len(vault.encrypt(bodies[0]))
    try:
        for body in bodies:
            rejection = Rejection(body, "valid", "invalid_payload", [{"msg": "bad"}])
            await store_rejected(engine, vault, rejection, max_bytes=3 * size + size // 2)
    finally:
        await engine.dispose()
    kept = await db.fetch(
        "select body_encrypted is not null as kept, errors from rejected_deliveries order by id"
    )
    assert [row["kept"] for row in kept] == [False, False, True, True, True]
    assert all(orjson.loads(row["errors"]) == [{"msg": "bad"}] for row in kept)
    said = [r.getMessage() for r in caplog.records if r.name == "coldmail.recording"]
    assert said == [
        f"dropped the {n} oldest rejected bodies: over REJECTED_MAX_BYTES" for n in (1, 1)
    ]


class FailingOutbox:
    """Tells of a rejected delivery, then fails (a destination's message not written)."""

    telling = True

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    async def rejected(self, conn: Any, rejection: Rejection) -> None:
        if self.fails:
            raise RuntimeError("the outbound message could not be written")


@pytest.mark.parametrize("fails", [False, True])
async def test_a_rejected_delivery_is_kept_only_with_its_telling(database_url, db, fails):
    """Stored and told in one transaction: a rejection is never kept untold. One spooled
    while the database was away keeps the time it was received, not the time it was stored."""
    engine = make_engine(database_url, pool_size=1)
    received = datetime.now(UTC) - timedelta(hours=1)
    rejection = Rejection(b"{not json", "valid", "invalid_json", [], received_at=received)
    store = partial(store_rejected, engine, Vault([FERNET_KEY]), rejection, max_bytes=10**6)
    outbox: Any = FailingOutbox(fails)  # only what store_rejected uses of an Outbox
    try:
        if fails:
            with pytest.raises(RuntimeError):
                await store(outbox=outbox)
        else:
            await store(outbox=outbox)
    finally:
        await engine.dispose()
    kept = await db.fetch("select reason, received_at from rejected_deliveries")
    assert [tuple(row) for row in kept] == ([] if fails else [("invalid_json", received)])


# --- every outcome moves its metric -----------------------------------------------------


async def outcomes(client: httpx.AsyncClient) -> dict[str, float]:
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        if family.name == "cmr_webhook_deliveries":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    counted[outcome] = counted.get(outcome, 0) + sample.value
    return counted


async def test_each_outcome_counts_once_in_the_deliveries_metric(client, db):
    await refuse_doomed_mailboxes(db)
    processed = traffic.mailbox_created()
    invalid = traffic.mailbox_created()
    del invalid["data"]["mailboxDetails"]["mailboxId"]
    doomed = traffic.mailbox_created(details={"email": "doomed@x.example"})
    sends: list[tuple[dict[str, Any] | bytes, int, str]] = [
        (processed, 200, "processed"),
        (processed, 200, "duplicate"),
        (traffic.envelope("dns-record.updated", {"domain": "a.example"}), 200, "ignored"),
        (b"[1, 2]", 400, "invalid_json"),
        (invalid, 422, "invalid_payload"),
        (doomed, 500, "apply_failed"),
    ]
    for payload, status, outcome in sends:
        before = await outcomes(client)
        assert (await deliver(client, payload)).status_code == status, outcome
        after = await outcomes(client)
        moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert moved == {outcome: 1}, outcome
