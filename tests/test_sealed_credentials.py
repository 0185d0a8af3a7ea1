"""A mailbox event's credentials are one sealed token, stored in each carried credential's
column: still merged per credential; those stored before migration 0018 (a token each) are
sealed in place, one token per mailbox."""

import asyncio
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
)
from tests.streams import sent
from tests.test_keyed_hashes import migrate_to_head, migrated_only_to

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
    async with migrated_only_to(server_url, "0016") as url:
        yield url


@pytest.fixture
async def db_at_0016(at_0016: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to `at_0016`, open through the test's migrations."""
    conn = await asyncpg.connect(asyncpg_dsn(at_0016))
    yield conn
    await conn.close()


async def store_as_0016_did(conn: asyncpg.Connection, mailbox_id: str, **given: Any) -> None:
    """A mailbox stored the way the service stored it before 0018: a token per credential."""
    await conn.execute(
        f"INSERT INTO mailboxes (mailbox_id, provider, updated_at, {COLUMNS})"
        " VALUES ($1, 'GOOGLE', '2026-01-02T03:04:05Z', $2, $3, $4)",
        mailbox_id,
        *(given.get(name) for name in ("password", "app_password", "authenticator_secret")),
    )


async def test_stored_credentials_are_sealed_one_token_a_mailbox(at_0016, db_at_0016, monkeypatch):
    old_key = generate_key()
    fernet, old = Fernet(FERNET_KEY), Fernet(old_key)
    await store_as_0016_did(
        db_at_0016,
        "ALL",
        password=fernet.encrypt(b"pw-1"),
        app_password=old.encrypt("äpp-1".encode()),  # under a key being retired
        authenticator_secret=fernet.encrypt(b"s-1"),
    )
    await store_as_0016_did(db_at_0016, "APP", app_password=fernet.encrypt(b"app-2"))
    await store_as_0016_did(db_at_0016, "NONE")
    await migrate_to_head(at_0016, monkeypatch, fernet_keys=f"{FERNET_KEY},{old_key}")
    rows = {
        row["mailbox_id"]: row
        for row in await db_at_0016.fetch(
            f"SELECT mailbox_id, updated_at::text, {COLUMNS} FROM mailboxes"
        )
    }
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
    at_0016, db_at_0016, monkeypatch
):
    await store_as_0016_did(db_at_0016, "ALL", password=Fernet(FERNET_KEY).encrypt(b"pw-1"))
    with pytest.raises(SystemExit, match="0018 seals the credentials"):
        await migrate_to_head(at_0016, monkeypatch, fernet_keys=None)


async def test_a_downgrade_gives_each_credential_its_own_token_again(
    at_0016, db_at_0016, monkeypatch
):
    fernet = Fernet(FERNET_KEY)
    await store_as_0016_did(
        db_at_0016,
        "ALL",
        password=fernet.encrypt(b"pw-1"),
        authenticator_secret=fernet.encrypt(b"s-1"),
    )
    await migrate_to_head(at_0016, monkeypatch, fernet_keys=FERNET_KEY)
    sealed = await db_at_0016.fetchrow(f"SELECT {COLUMNS} FROM mailboxes")
    await asyncio.to_thread(downgrade, at_0016, "0016")
    get_settings.cache_clear()
    row = await db_at_0016.fetchrow(f"SELECT {COLUMNS} FROM mailboxes")
    assert sealed["password_encrypted"] == sealed["authenticator_secret_encrypted"]
    assert row["app_password_encrypted"] is None
    assert fernet.decrypt(row["password_encrypted"]) == b"pw-1"  # bare, as 0016 reads them
    assert fernet.decrypt(row["authenticator_secret_encrypted"]) == b"s-1"


def downgrade(url: str, revision: str) -> None:
    with ThreadPoolExecutor(1) as pool:  # Alembic's env.py runs its own event loop
        pool.submit(command.downgrade, alembic_config(url), revision).result()
