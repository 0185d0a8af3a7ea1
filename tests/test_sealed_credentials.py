"""A mailbox event's credentials are one sealed token, stored in each carried credential's
column: still merged per credential; those stored before migration 0018 (a token each) are
sealed in place, one token per mailbox."""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.fernet import Fernet

from alembic import command
from app.config import get_settings
from app.crypto import generate_key
from app.operations.migrations import alembic_config
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    app_client,
    asyncpg_dsn,
    credentials_of,
    deliver,
    make_settings,
    with_database,
)
from tests.streams import sent
from tests.test_keyed_hashes import migrate

CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}
COLUMNS = "password_encrypted, app_password_encrypted, authenticator_secret_encrypted"


async def shown(client: Any, mailbox_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/mailboxes/{mailbox_id}/credentials", headers=CREDS)
    assert response.status_code == 200
    return dict(response.json())


async def test_an_event_carrying_some_credentials_changes_only_those_the_later_edit_winning(
    client, db
):
    order = traffic.prewarmup_success(domains=1, per_domain=1)
    box = order["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"][0]
    assert (await deliver(client, order)).status_code == 200
    row = await db.fetchrow(f"select {COLUMNS} from mailboxes")
    assert len(set(row.values())) == 1  # one token for the three
    now = time.time()

    def exported(at: float, **details: str) -> dict[str, Any]:
        payload = {"mailboxDetails": {"mailboxId": box["mailboxId"], **details}}
        return sent(traffic.envelope("mailbox.exported", payload), at)

    # the later password edit arrives first; then the earlier one, and an app password
    for payload in (
        exported(now - 60, password="pw-later"),
        exported(now - 120, password="pw-earlier", authenticatorSecret="s-earlier"),
        exported(now - 90, appPassword="app-new"),
    ):
        assert (await deliver(client, payload)).status_code == 200
    assert await shown(client, box["mailboxId"]) == {
        "mailboxId": box["mailboxId"],
        "password": "pw-later",
        "appPassword": "app-new",
        "authenticatorSecret": "s-earlier",  # edited once: the edit beats the order's
    }
    row = await db.fetchrow(f"select {COLUMNS} from mailboxes")
    assert len(set(row.values())) == 3  # each now from its own event
    late_snapshot = traffic.prewarmup_success(domains=1, per_domain=1)
    late_box = late_snapshot["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]
    late_box[0] |= {"mailboxId": box["mailboxId"], "password": "pw-snapshot"}
    assert (await deliver(client, late_snapshot)).status_code == 200
    assert (await shown(client, box["mailboxId"]))["password"] == "pw-later"  # edits stay


@pytest.fixture
async def at_0016(server_url: str) -> AsyncIterator[str]:
    """An empty database migrated only as far as 0016, dropped afterwards."""
    name = f"cmw_at_0016_{os.getpid()}_{id(object())}"
    admin = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(server_url, name)
    try:
        await asyncio.to_thread(migrate, url, "0016")
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def store_as_0016_did(conn: asyncpg.Connection, mailbox_id: str, **given: Any) -> None:
    """A mailbox stored the way the service stored it before 0018: a token per credential."""
    await conn.execute(
        f"INSERT INTO mailboxes (mailbox_id, provider, updated_at, {COLUMNS})"
        " VALUES ($1, 'GOOGLE', '2026-01-02T03:04:05Z', $2, $3, $4)",
        mailbox_id,
        *(given.get(name) for name in ("password", "app_password", "authenticator_secret")),
    )


async def test_stored_credentials_are_sealed_one_token_a_mailbox(at_0016, monkeypatch):
    old_key = generate_key()
    fernet, old = Fernet(FERNET_KEY), Fernet(old_key)
    conn = await asyncpg.connect(asyncpg_dsn(at_0016))
    try:
        await store_as_0016_did(
            conn,
            "ALL",
            password=fernet.encrypt(b"pw-1"),
            app_password=old.encrypt("äpp-1".encode()),  # under a key being retired
            authenticator_secret=fernet.encrypt(b"s-1"),
        )
        await store_as_0016_did(conn, "APP", app_password=fernet.encrypt(b"app-2"))
        await store_as_0016_did(conn, "NONE")
        monkeypatch.setenv("FERNET_KEYS", f"{FERNET_KEY},{old_key}")
        get_settings.cache_clear()
        await asyncio.to_thread(migrate, at_0016, "head")
        get_settings.cache_clear()
        rows = {
            row["mailbox_id"]: row
            for row in await conn.fetch(
                f"SELECT mailbox_id, updated_at::text, {COLUMNS} FROM mailboxes"
            )
        }
    finally:
        await conn.close()
    both = rows["ALL"]
    token = both["password_encrypted"]
    assert both["app_password_encrypted"] == token == both["authenticator_secret_encrypted"]
    assert orjson.loads(fernet.decrypt(token)) == {  # under the first key alone
        "password": "pw-1",
        "app_password": "äpp-1",
        "authenticator_secret": "s-1",
    }
    assert credentials_of(rows["APP"]) == {
        "password": None,
        "app_password": "app-2",
        "authenticator_secret": None,
    }
    assert rows["APP"]["password_encrypted"] is None
    assert credentials_of(rows["NONE"]) == dict.fromkeys(credentials_of(rows["NONE"]))
    assert {row["updated_at"] for row in rows.values()} == {"2026-01-02 03:04:05+00"}
    async with app_client(make_settings(at_0016)) as client:
        assert await shown(client, "ALL") == {
            "mailboxId": "ALL",
            "password": "pw-1",
            "appPassword": "äpp-1",
            "authenticatorSecret": "s-1",
        }
        edit = {"mailboxDetails": {"mailboxId": "ALL", "password": "pw-2"}}
        assert (await deliver(client, traffic.envelope("mailbox.exported", edit))).is_success
        assert (await shown(client, "ALL"))["password"] == "pw-2"
        assert (await shown(client, "ALL"))["appPassword"] == "äpp-1"


async def test_a_database_with_credentials_will_not_migrate_without_fernet_keys(
    at_0016, monkeypatch
):
    conn = await asyncpg.connect(asyncpg_dsn(at_0016))
    try:
        await store_as_0016_did(conn, "ALL", password=Fernet(FERNET_KEY).encrypt(b"pw-1"))
    finally:
        await conn.close()
    monkeypatch.delenv("FERNET_KEYS", raising=False)
    monkeypatch.chdir("/")  # no .env to read it from
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="0018 seals the credentials"):
            await asyncio.to_thread(migrate, at_0016, "head")
    finally:
        get_settings.cache_clear()


async def test_a_downgrade_gives_each_credential_its_own_token_again(at_0016, monkeypatch):
    fernet = Fernet(FERNET_KEY)
    conn = await asyncpg.connect(asyncpg_dsn(at_0016))
    try:
        await store_as_0016_did(
            conn,
            "ALL",
            password=fernet.encrypt(b"pw-1"),
            authenticator_secret=fernet.encrypt(b"s-1"),
        )
        monkeypatch.setenv("FERNET_KEYS", FERNET_KEY)
        get_settings.cache_clear()
        await asyncio.to_thread(migrate, at_0016, "head")
        sealed = await conn.fetchrow(f"SELECT {COLUMNS} FROM mailboxes")
        await asyncio.to_thread(downgrade, at_0016, "0016")
        get_settings.cache_clear()
        row = await conn.fetchrow(f"SELECT {COLUMNS} FROM mailboxes")
    finally:
        await conn.close()
    assert sealed["password_encrypted"] == sealed["authenticator_secret_encrypted"]
    assert row["app_password_encrypted"] is None
    assert fernet.decrypt(row["password_encrypted"]) == b"pw-1"  # bare, as 0016 reads them
    assert fernet.decrypt(row["authenticator_secret_encrypted"]) == b"s-1"


def downgrade(url: str, revision: str) -> None:
    with ThreadPoolExecutor(1) as pool:  # Alembic's env.py runs its own event loop
        pool.submit(command.downgrade, alembic_config(url), revision).result()
