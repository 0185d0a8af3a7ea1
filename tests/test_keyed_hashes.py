"""Content hashes and derived eventIds are keyed; those stored before migration 0007 are
keyed in place, and a sender's retry still finds its event."""

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import pytest

from app.config import get_settings
from app.crypto import generate_key
from app.operations.migrations import upgrade
from app.simulation import traffic
from tests.conftest import (
    FERNET_KEY,
    app_client,
    asyncpg_dsn,
    deliver,
    make_settings,
    with_database,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import run_cli


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def migrate(url: str, revision: str) -> None:
    with ThreadPoolExecutor(1) as pool:  # Alembic's env.py runs its own event loop
        pool.submit(upgrade, url, revision).result()


@asynccontextmanager
async def migrated_only_to(server_url: str, revision: str) -> AsyncIterator[str]:
    """An empty database migrated only as far as `revision`, dropped afterwards."""
    name = f"cmw_at_{revision}_{os.getpid()}_{id(object())}"
    admin = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(server_url, name)
    try:
        await asyncio.to_thread(migrate, url, revision)
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def migrate_to_head(
    url: str, monkeypatch: pytest.MonkeyPatch, *, fernet_keys: str | None
) -> None:
    """`alembic upgrade head` with FERNET_KEYS set to `fernet_keys` (None: unset, and no
    .env to read it from), the settings read afresh for it and forgotten after."""
    if fernet_keys is None:
        monkeypatch.delenv("FERNET_KEYS", raising=False)
        monkeypatch.chdir("/")
    else:
        monkeypatch.setenv("FERNET_KEYS", fernet_keys)
    get_settings.cache_clear()
    try:
        await asyncio.to_thread(migrate, url, "head")
    finally:
        get_settings.cache_clear()


@pytest.fixture
async def at_0006(server_url: str) -> AsyncIterator[str]:
    async with migrated_only_to(server_url, "0006") as url:
        yield url


async def store_as_0006_did(conn: asyncpg.Connection, envelope: dict[str, Any]) -> None:
    """An event recorded the way the service recorded it before 0007: plain SHA-256."""
    content = hashlib.sha256(canonical(envelope)).digest()
    await conn.execute(
        "INSERT INTO event_keys (event_id, content_hash) VALUES ($1, $2)",
        envelope["eventId"],
        content,
    )
    await conn.execute(
        "INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict,"
        " signature, payload) VALUES ($1, $2, 'ignored', $3, 1, false, 'valid', $4::jsonb)",
        envelope["eventId"],
        envelope["event"],
        content,
        orjson.dumps(envelope).decode(),
    )


async def test_stored_hashes_are_keyed_and_a_retry_is_still_a_duplicate(at_0006, monkeypatch):
    with_id = {"event": "dns-record.updated", "eventId": "E-0006", "data": {"n": 1}}
    without_id = {"eventType": "mailbox.warmup.started", "data": {"password": "hunter2"}}
    derived = "sha256:" + hashlib.sha256(canonical(without_id)).hexdigest()
    plain = {hashlib.sha256(canonical(e)).hexdigest() for e in (with_id,)} | {derived[7:]}
    conn = await asyncpg.connect(asyncpg_dsn(at_0006))
    try:
        await store_as_0006_did(conn, with_id)
        await store_as_0006_did(
            conn, without_id | {"event": "mailbox.warmup.started", "eventId": derived}
        )
        await conn.execute(
            "INSERT INTO subscriptions (subscription_id, status, lifecycle_version)"
            " VALUES ('S', 'active', $1)",
            f"{1:020d}|{derived}",
        )
        await migrate_to_head(at_0006, monkeypatch, fernet_keys=FERNET_KEY)
        rows = []
        for table in ("events", "event_keys", "subscriptions"):
            rows += await conn.fetch(f"SELECT * FROM {table}")
        dump = "\n".join(str(tuple(row)) for row in rows)
        stored = {
            bytes(h).hex()
            for h in await conn.fetchval("SELECT array_agg(content_hash) FROM events")
        }
        ids = set(await conn.fetchval("SELECT array_agg(event_id) FROM event_keys"))
        version = await conn.fetchval("SELECT lifecycle_version FROM subscriptions")
    finally:
        await conn.close()
    assert not plain & stored and all(h not in dump for h in plain)
    new_derived = (ids - {"E-0006"}).pop()
    assert new_derived.startswith("sha256:") and new_derived != derived
    assert version == f"{1:020d}|{new_derived}"
    async with app_client(make_settings(at_0006)) as client:
        retry = await deliver(client, orjson.dumps(with_id))
        again = await deliver(client, orjson.dumps(without_id))
    assert retry.json()["status"] == "duplicate"
    assert again.json()["eventId"] == new_derived  # the same event, keyed the same way


async def test_a_database_with_events_will_not_migrate_without_fernet_keys(at_0006, monkeypatch):
    conn = await asyncpg.connect(asyncpg_dsn(at_0006))
    try:
        await store_as_0006_did(conn, {"event": "x", "eventId": "E", "data": {}})
    finally:
        await conn.close()
    with pytest.raises(SystemExit, match="FERNET_KEYS"):
        await migrate_to_head(at_0006, monkeypatch, fernet_keys=None)


async def test_a_derived_event_id_is_no_plain_hash_of_the_body(client):
    payload = traffic.mailbox_created()
    del payload["eventId"]
    response = await deliver(client, payload)
    plain = "sha256:" + hashlib.sha256(canonical(payload)).hexdigest()
    assert response.status_code == 200
    assert response.json()["eventId"].startswith("sha256:")
    assert response.json()["eventId"] != plain
    again = await deliver(client, payload)
    assert again.json() == response.json() | {"status": "duplicate"}


async def test_derived_event_ids_survive_rotating_the_fernet_keys(client, database_url):
    """rotate-keys re-encrypts the hashing key; the key itself, and so every derived
    eventId, stays the same: a retry after the rotation is still a duplicate."""
    payload = traffic.mailbox_created()
    del payload["eventId"]
    first = await deliver(client, payload)
    new_key = generate_key()
    env = server_env(database_url) | {"FERNET_KEYS": f"{new_key},{FERNET_KEY}"}
    out = run_cli("rotate-keys", env=env)
    assert re.search(r"server_keys.key_encrypted\s+re-encrypted\s+1", out)
    async with app_client(make_settings(database_url, fernet_keys=new_key)) as rotated:
        retry = await deliver(rotated, payload)
    assert retry.json() == first.json() | {"status": "duplicate"}
