"""The whole service through a real PgBouncer (Debian's) in transaction pooling mode:
migrations, deliveries of every shape, reads, sign-in, replay, and the spool draining once
the pooler is back. A slow check of its own: `pytest -m pgbouncer`."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from app.db import make_engine
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    OPS_TOKEN,
    app_client,
    asyncpg_dsn,
    deliver,
    make_settings,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.reliability.test_edge import post, sign
from tests.reliability.test_spool import events_by_id, wait_until_drained
from tests.servers import Server, free_port, run_cli, serve_to_its_end
from tests.test_reconcile import one_at_a_time

pytestmark = pytest.mark.pgbouncer
PATIENCE = 60
POOLER_FIX = "add ?prepared_statement_cache_size=0 to DATABASE_URL"


class PgBouncer:
    def __init__(self, home: Path, server_url: str, pool_size: int = 5) -> None:
        upstream = make_url(server_url)
        self.home, self.port = home, free_port()
        self.ini = home / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"* = host={upstream.host} port={upstream.port} user={upstream.username}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 200\n"
            f"logfile = {home}/pgbouncer.log\n"
        )
        shutil.chown(home, "postgres")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["pgbouncer", "-u", "postgres", str(self.ini)])
        deadline = time.monotonic() + PATIENCE
        while subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        ).returncode:
            assert time.monotonic() < deadline, (self.home / "pgbouncer.log").read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # PgBouncer 1.18: immediate shutdown
            self.proc.wait(PATIENCE)

    def url(self, database_url: str) -> str:
        through = make_url(database_url).set(host="127.0.0.1", port=self.port)
        through = through.update_query_dict({"prepared_statement_cache_size": "0"})
        return through.render_as_string(hide_password=False)


@contextmanager
def pooler(server_url: str, pool_size: int = 5) -> Iterator[PgBouncer]:
    if shutil.which("pgbouncer") is None:
        pytest.fail("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    # PgBouncer runs as postgres: its folder must not sit inside root's private ones
    home = Path(tempfile.mkdtemp(prefix="cmw-pgbouncer-", dir="/tmp"))
    bouncer = PgBouncer(home, server_url, pool_size)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    with pooler(server_url) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def server(database, pgbouncer, tmp_path_factory) -> Iterator[Server]:
    """`serve` whose only way to PostgreSQL is the pooler (it migrates through it too)."""
    home = tmp_path_factory.mktemp("serve")
    env = server_env(pgbouncer.url(database)) | {
        "CREDENTIALS_API_TOKENS": CREDENTIALS_TOKEN,
        "SPOOL_DIR": str(home / "spool"),
    }
    serve = Server(env, home, workers=2)
    serve.start()
    yield serve
    serve.stop()


async def count(database: str, sql: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database))
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


def deliver_all(server: Server, payloads: list[dict[str, object]]) -> list[str]:
    def one(payload: dict[str, object]) -> str:
        body = orjson.dumps(payload)
        response = post(server, body, sign(body))
        assert response.status_code == 200, response.text
        return str(response.json()["status"])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, payloads))


async def test_deliveries_of_every_shape_go_through_the_pooler(server, database):
    created = [traffic.mailbox_created() for _ in range(80)]
    orders = [traffic.prewarmup_success(domains=3, per_domain=100) for _ in range(4)]
    failed = [
        traffic.prewarmup_failed(order_id=f"o{i}", failures={"a.io": "DNS"}) for i in range(5)
    ]
    payloads = created + orders + failed
    assert set(deliver_all(server, payloads)) == {"processed"}
    assert set(deliver_all(server, payloads[:20])) == {"duplicate"}
    assert await count(database, "select count(*) from events") == len(payloads)
    assert await count(database, "select count(*) from mailboxes") == 80 + 4 * 300
    assert await count(database, "select count(*) from orders where status = 'failed'") == 5


def test_reads_credentials_and_sign_in_go_through_the_pooler(server):
    ops = {"authorization": f"Bearer {OPS_TOKEN}"}
    payload = traffic.mailbox_created()
    deliver_all(server, [payload])
    mailbox = payload["data"]["mailboxDetails"]["mailboxId"]
    listed = httpx.get(f"{server.url}/api/v1/mailboxes", params={"limit": 500}, headers=ops)
    assert listed.status_code == 200 and listed.json()["items"]
    creds = httpx.get(
        f"{server.url}/api/v1/mailboxes/{mailbox}/credentials",
        headers={"authorization": f"Bearer {CREDENTIALS_TOKEN}"},
    )
    assert creds.status_code == 200 and creds.json()["appPassword"]
    signed = httpx.post(f"{server.url}/ui/login", data={"token": OPS_TOKEN})
    cookie = signed.cookies["cmw_session"]
    for page in ("/ui", "/ui/orders", "/ui/events", "/ui/subscriptions"):
        assert httpx.get(f"{server.url}{page}", cookies={"cmw_session": cookie}).status_code == 200


def test_replay_goes_through_the_pooler(server, pgbouncer, database):
    env = server_env(pgbouncer.url(database))
    out = run_cli("replay", "--all", env=env)
    assert "events" in out and "applied" in out


async def test_the_spool_drains_through_the_pooler_once_it_is_back(server, pgbouncer, database):
    before = await count(database, "select count(*) from events")
    pgbouncer.stop()
    try:
        payloads = [traffic.mailbox_created() for _ in range(30)]
        assert set(deliver_all(server, payloads)) == {"queued"}
    finally:
        pgbouncer.start()
    deadline = time.monotonic() + PATIENCE
    while await count(database, "select count(*) from events") < before + 30:
        assert time.monotonic() < deadline, server.output()[-4000:]
        time.sleep(0.2)
    while httpx.get(f"{server.url}/readyz").json()["database"] != "up":
        assert time.monotonic() < deadline, "not ready again through the pooler"
        time.sleep(0.2)


def test_the_pooler_sees_no_prepared_statement_errors(pgbouncer, server):
    log = (pgbouncer.home / "pgbouncer.log").read_text()
    assert "prepared statement" not in log.lower()
    assert "does not exist" not in server.output()
    assert os.path.exists(pgbouncer.ini)


def without_the_flag(pgbouncer: PgBouncer, database_url: str) -> str:
    return pgbouncer.url(database_url).replace("?prepared_statement_cache_size=0", "")


async def test_a_pooler_without_its_flag_is_named_and_loses_nothing(
    pgbouncer, database_url, capsys
):
    payloads = [traffic.mailbox_created() for _ in range(10)]
    wrong = make_settings(without_the_flag(pgbouncer, database_url))
    async with app_client(wrong) as client:
        answers = [await deliver(client, payload) for payload in payloads]
        ready = await client.get("/readyz")
    assert {a.json()["status"] for a in answers} == {"queued"}  # kept, in the spool
    assert ready.status_code == 503 and POOLER_FIX in ready.json()["error"]
    err = capsys.readouterr().err
    receiver_lines = [line for line in err.splitlines() if "coldmail.receiver" in line]
    assert len(receiver_lines) == 1 and POOLER_FIX in receiver_lines[0], receiver_lines
    assert "database unreachable" not in err
    fixed = make_settings(pgbouncer.url(database_url), spool_dir=str(wrong.spool_path))
    async with app_client(fixed) as client:
        await wait_until_drained(client)
    assert set(await events_by_id(database_url)) == {p["eventId"] for p in payloads}


def test_serve_through_a_pooler_without_its_flag_stops_in_one_line(
    pgbouncer, database_url, tmp_path
):
    env = server_env(without_the_flag(pgbouncer, database_url))
    result = serve_to_its_end(env, tmp_path)
    assert result.returncode == 2
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].endswith(POOLER_FIX), stderr


async def test_one_reconcile_runs_at_a_time_through_a_pooler(server_url, database):
    """Two replicas behind a pooler that gives both the same server connection: while one
    reconciles, the other's turn passes without a run; once it has ended, the other's next
    turn runs. (A session advisory lock taken on that server connection let both run.)"""
    with pooler(server_url, pool_size=1) as bouncer:
        one, two = (make_engine(bouncer.url(database), pool_size=2) for _ in range(2))
        try:
            await one_at_a_time(one, two)
        finally:
            await one.dispose()
            await two.dispose()
