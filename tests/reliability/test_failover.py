"""A real PostgreSQL failover under load: a primary and a streaming replica (Debian's
PostgreSQL), `serve` on a multi-host DATABASE_URL with target_session_attrs=read-write,
senders on the provider's retry schedule, the primary killed with SIGKILL mid-load and the
replica promoted. Run for asynchronous and for synchronous replication; prints a table.
A slow check of its own: `pytest -m failover -s`.

What it shows: with synchronous replication (synchronous_commit=on and
synchronous_standby_names) no acknowledged delivery is missing after the failover; with
asynchronous replication the figures say what was lost, if anything (commits the primary
acknowledged but had not yet sent). Nothing is applied twice in either mode.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.simulation import traffic
from tests.reliability.senders import Tally, send_all
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import Server, free_port

pytestmark = pytest.mark.failover
PATIENCE = 120
DELIVERIES = 900
KILL_AFTER = 300  # acknowledged deliveries before the primary is killed
RESULTS: list[str] = []
LAG = """SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)), 0)
FROM pg_stat_replication"""


def pg_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not versions:
        pytest.fail("PostgreSQL server binaries are not installed (Debian: postgresql)")
    return versions[-1].parent


def as_postgres(*command: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)


class Cluster:
    """One PostgreSQL instance of its own, in a folder of its own."""

    def __init__(self, home: Path, name: str) -> None:
        self.data, self.port = home / name, free_port()
        self.log = home / f"{name}.log"

    def configure(self, **settings: str) -> None:
        conf = self.data / "postgresql.conf"
        lines = [f"{key} = '{value}'" for key, value in settings.items()]
        conf.write_text(conf.read_text() + "\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        as_postgres(
            str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"
        )

    def kill(self) -> None:
        """SIGKILL to the postmaster: no shutdown, no last WAL sent."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def promote(self) -> None:
        as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-w", "promote")

    def stop(self) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(pg_bin() / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@dataclass
class Pair:
    primary: Cluster
    replica: Cluster

    @property
    def url(self) -> str:
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.replica.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"


@pytest.fixture
def home() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="cmw-failover-", dir="/tmp"))
    shutil.chown(folder, "postgres")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_pair(home: Path, synchronous: bool) -> Pair:
    primary, replica = Cluster(home, "primary"), Cluster(home, "replica")
    as_postgres(str(pg_bin() / "initdb"), "-D", str(primary.data), "-U", "postgres", "--auth=trust")
    primary.configure(
        port=str(primary.port),
        listen_addresses="127.0.0.1",
        unix_socket_directories=str(home),
        wal_level="replica",
        max_wal_senders="5",
        synchronous_commit="on",
        synchronous_standby_names="*" if synchronous else "",
    )
    primary.start()
    as_postgres(
        str(pg_bin() / "pg_basebackup"),
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-D",
        str(replica.data),
        "-R",
        "-X",
        "stream",
    )
    replica.configure(port=str(replica.port), hot_standby="on", synchronous_standby_names="")
    replica.start()
    wanted = "sync" if synchronous else "async"
    wait_until(
        lambda: (
            asyncio.run(
                fetch(
                    primary.dsn,
                    "select count(*) from pg_stat_replication where sync_state = $1",
                    wanted,
                )
            )
            == 1
        ),
        f"the replica streaming ({wanted})",
    )
    return Pair(primary, replica)


async def fetch(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            if condition():
                return
        except (OSError, asyncpg.PostgresError):
            pass
        assert time.monotonic() < deadline, f"still not: {what}"
        time.sleep(0.1)


async def run_failover(pair: Pair, server: Server) -> dict[str, Any]:
    payloads = [traffic.mailbox_created() for _ in range(DELIVERIES)]
    tally = Tally()
    spool_peak, queued, lag = 0, 0, 0
    killed_at = promoted_at = first_applied_at = None

    async def watch(client: httpx.AsyncClient) -> None:
        nonlocal spool_peak, killed_at, promoted_at, first_applied_at, lag
        while len(tally.acknowledged) < KILL_AFTER:
            await asyncio.sleep(0.01)
        lag = await fetch(pair.primary.dsn, LAG)  # WAL written here, not yet on the replica
        pair.primary.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(1.0)  # the time a failover manager takes to decide
        await asyncio.to_thread(pair.replica.promote)
        promoted_at = time.monotonic()
        before = await fetch(pair.replica.dsn, "select count(*) from events")
        while first_applied_at is None:
            spool_peak = max(
                spool_peak, (await client.get(f"{server.url}/readyz")).json()["spool"]["depth"]
            )
            if await fetch(pair.replica.dsn, "select count(*) from events") > before:
                first_applied_at = time.monotonic()
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=70) as client:
        url = f"{server.url}/webhooks/cmr"
        await asyncio.gather(
            send_all(client, url, payloads, tally, concurrency=16, on_schedule=True), watch(client)
        )
        deadline = time.monotonic() + PATIENCE
        while True:  # the spool drained into the new primary
            ready = (await client.get(f"{server.url}/readyz")).json()
            if ready["database"] == "up" and ready["spool"]["depth"] == 0:
                break
            assert time.monotonic() < deadline, ready
            await asyncio.sleep(0.2)
    queued = tally.answers.get("200", 0)
    conn = await asyncpg.connect(pair.replica.dsn)
    try:
        rows = await conn.fetch("select event_id, count(*) as n from events group by event_id")
    finally:
        await conn.close()
    stored = {r["event_id"] for r in rows}
    assert killed_at is not None and promoted_at is not None and first_applied_at is not None
    return {
        "acknowledged": len(tally.acknowledged),
        "missing": len(tally.acknowledged - stored),
        "twice": sum(1 for r in rows if r["n"] > 1),
        "first_applied_s": first_applied_at - killed_at,
        "promoted_s": promoted_at - killed_at,
        "spool_peak": spool_peak,
        "gave_up": len(tally.gave_up),
        "answers": dict(tally.answers),
        "queued": queued,
        "lag_bytes": int(lag),
    }


@pytest.mark.parametrize("synchronous", [False, True], ids=["asynchronous", "synchronous"])
def test_a_primary_killed_mid_load_fails_over_to_the_replica(home, synchronous):
    pair = make_pair(home, synchronous)
    serve_home = home / "serve"
    serve_home.mkdir()
    server = Server(server_env(pair.url) | {"SPOOL_DIR": str(serve_home / "spool")}, serve_home)
    try:
        server.start()
        figures = asyncio.run(run_failover(pair, server))
    finally:
        server.stop()
        pair.primary.stop()
        pair.replica.stop()
    mode = "synchronous" if synchronous else "asynchronous"
    RESULTS.append(
        f"{mode:13} acknowledged {figures['acknowledged']:4}  acked+missing {figures['missing']:3}"
        f"  applied twice {figures['twice']}  kill->promoted {figures['promoted_s']:.1f} s"
        f"  kill->first applied on new primary {figures['first_applied_s']:.1f} s"
        f"  spool peak {figures['spool_peak']}  gave up {figures['gave_up']}"
        f"  replica behind at the kill {figures['lag_bytes']} bytes"
        f"  answers {figures['answers']}"
    )
    print("\n" + "\n".join(RESULTS))
    assert figures["twice"] == 0
    assert figures["gave_up"] == 0
    if synchronous:
        assert figures["missing"] == 0
