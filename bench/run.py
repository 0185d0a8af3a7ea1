"""One benchmark run: the service beside its HTTP, database and physical ceilings, on this
machine, with every request checked.

    python bench/run.py [--seconds 10] [--memory-events 100000] [--out DIR]
    python bench/run.py --baseline 4f460bf --pairs 2   # that commit against the work tree

Needs a PostgreSQL server (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/
postgres; scratch databases are created and dropped), `wrk` and `pgbench` (Debian: wrk,
postgresql-client). Prints one table; writes results.json and the load generators' own
reports to --out (default: a new temporary folder). Any failed, refused or unexpected
answer in any row is printed, and the run exits 1: such a run is not a figure.
"""

import argparse
import asyncio
import errno
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.crypto import Vault, generate_key  # noqa: E402
from app.hashing import Hasher  # noqa: E402
from app.receiving import payloads, signing  # noqa: E402
from app.receiving.delivery import Delivery  # noqa: E402
from app.receiving.signing import SignatureCheck  # noqa: E402
from app.receiving.spool import SPOOL_FILE, Spool  # noqa: E402
from app.recording import effects, merge, record  # noqa: E402
from app.simulation import traffic  # noqa: E402

SERVER = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY, TOKEN, SIGNING_KEY = generate_key(), "bench-webhook-token", "bench-signing-key"
OPS = "bench-ops-token-0001"
HASHER = Hasher(os.urandom(32))
CLI = [sys.executable, "-m", "app.cli"]
CONCURRENCY = 32
PREWARMUPS = 21  # 1,000 mailboxes each; the first warms caches, the median is of the rest


@dataclass
class Run:
    out: Path
    seconds: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, figures: dict[str, Any], failures: list[str]) -> dict[str, Any]:
        row = {"name": name, "events_per_second": None, "p50_ms": None, "p99_ms": None}
        row |= figures | {"failed": len(failures)}
        self.rows.append(row)
        self.failures += [f"{name}: {failure}" for failure in failures]
        return row


# --- processes and databases ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(SERVER)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# Each run names its scratch databases `cmw_bench_<row>_<pid>_<token>`: two runs on one
# server never drop each other's (a fixed name, dropped WITH (FORCE), cut the other run's
# row short). A run that was killed outright leaves its own behind: --drop-leftovers.
SCRATCH = re.compile(r"cmw_bench_[a-z0-9_]+_(?P<pid>[0-9]+)_[0-9a-f]{6}")


def scratch_name(row: str) -> str:
    return f"cmw_bench_{row}_{os.getpid()}_{secrets.token_hex(3)}"


@contextmanager
def scratch_database(row: str, *, migrated: bool = False) -> Iterator[str]:
    """A new database of this run's own for one row, dropped after it, even when the row
    fails: what a row leaves behind (and autovacuum's work on it) must not weigh on the
    rows after."""
    name = scratch_name(row)
    asyncio.run(admin(f"CREATE DATABASE {name}"))
    url = SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        if migrated:
            subprocess.run([*CLI, "migrate"], env=service_env(url), check=True, cwd=ROOT)
        yield url
    finally:
        # FORCE: a server of the row may still be closing its connections
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def leftovers(names: Iterable[str], *, running: Callable[[int], bool]) -> list[str]:
    """The scratch databases among `names` whose run no longer runs on this machine."""
    found = (SCRATCH.fullmatch(name) for name in names)
    return [m.group(0) for m in found if m and not running(int(m.group("pid")))]


def pid_running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def drop_leftovers() -> list[str]:
    """Drops the scratch databases of killed runs. Without FORCE: one still in use (a run
    on another machine, or a pid since reused) is left and named."""
    conn = await asyncpg.connect(SERVER)
    try:
        names = [r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")]
        dropped = []
        for name in leftovers(names, running=pid_running):
            try:
                await conn.execute(f"DROP DATABASE {name}")
                dropped.append(name)
            except asyncpg.ObjectInUseError:
                print(f"kept {name}: still in use")
        return dropped
    finally:
        await conn.close()


def stop_on_sigterm() -> None:
    """A terminated run unwinds like an interrupted one: its servers stopped, its scratch
    databases dropped."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), in MB."""
    total = 0
    for proc in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def process_cpu(pid: int, *, reaped: bool = False) -> float:
    """A process's CPU seconds (user and system), with `reaped` those of the children it has
    waited for; 0 for a process gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone, even while being read
        return 0.0
    ticks = sum(int(f) for f in fields[11 : 15 if reaped else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """A server's CPU seconds: its process and its workers."""
    return sum(process_cpu(p) for p in [pid, *children(pid)])


async def postmaster(url: str) -> int | None:
    """The PostgreSQL server's own process, when it runs on this machine."""
    conn = await asyncpg.connect(url)
    try:  # while this backend is there
        stat = Path(f"/proc/{await conn.fetchval('SELECT pg_backend_pid()')}/stat")
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return None  # a server elsewhere: its CPU is not seen from here
    finally:
        await conn.close()


def cluster_cpu(pid: int | None) -> float:
    """Every CPU second of the database server so far: the postmaster, its live processes
    (backends, WAL writer, checkpointer, autovacuum) and those it has reaped."""
    if pid is None:
        return 0.0
    return process_cpu(pid, reaped=True) + sum(process_cpu(c, reaped=True) for c in children(pid))


@dataclass
class Cpu:
    """CPU seconds a row's three parties spend while it runs: the sender (this process, or
    the load generators it runs and waits for), the server (a process tree, if any) and
    the database server; `per_event` gives each in microseconds an event."""

    database: int | None
    server: int | None = None
    children: bool = True
    spent: dict[str, float] = field(default_factory=dict)

    def now(self) -> dict[str, float]:
        who = resource.RUSAGE_CHILDREN if self.children else resource.RUSAGE_SELF
        usage = resource.getrusage(who)
        return {
            "sender": usage.ru_utime + usage.ru_stime,
            "server": tree_cpu(self.server) if self.server else 0.0,
            "database": cluster_cpu(self.database),
        }

    @contextmanager
    def measuring(self) -> Iterator[None]:
        before, running = self.now(), len(children(self.database or 0))
        yield
        # a load generator's backends have exited: wait until the postmaster has reaped them
        deadline = time.monotonic() + 5
        while len(children(self.database or 0)) > running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.spent = {k: v - before[k] for k, v in self.now().items()}

    def per_event(self, events: int) -> dict[str, int]:
        shown = {f"cpu_us_{k}": round(v / max(events, 1) * 1e6) for k, v in self.spent.items()}
        return shown | {"cpu_us": sum(shown.values())}


@contextmanager
def server(
    command: list[str], env: dict[str, str], port: int, ready: str, log: Path, wait: float = 60
) -> Iterator[subprocess.Popen[bytes]]:
    """A server whose output goes to `log`, ready within `wait` seconds; a server that dies
    during its row fails it."""
    with log.open("wb") as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=output, cwd=ROOT)
        deadline = time.monotonic() + wait
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()  # not left serving (and running its tasks) after the run
                raise RuntimeError(f"server did not start: {command} (see {log})")
            time.sleep(0.2)
        try:
            yield proc
        finally:
            died = proc.poll()
            proc.terminate()
            proc.wait(timeout=60)
            if died is not None:
                raise RuntimeError(f"server exited with {died} during the run (see {log})")


def service_env(url: str, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        DATABASE_URL=url,
        FERNET_KEYS=KEY,
        WEBHOOK_TOKENS=TOKEN,
        CMR_SIGNING_KEY=SIGNING_KEY,
        OPS_API_TOKENS=OPS,
        LOG_LEVEL="WARNING",
        DB_POOL_SIZE="20",
        **extra,
    )


# --- load generators --------------------------------------------------------------------


def simulate(run: Run, port: int, events: int) -> tuple[dict[str, Any], list[str]]:
    """The project's own Python sender (aiohttp), single-mailbox events, checked answers."""
    out = run.out / f"simulate-{port}-{events}.json"
    done = subprocess.run(
        [
            *CLI,
            "simulate",
            f"http://127.0.0.1:{port}/webhooks/cmr",
            *("--token", TOKEN, "--signing-key", SIGNING_KEY),
            *("--events", str(events), "--concurrency", str(CONCURRENCY)),
            *("--single-mailbox", "--duplicates", "0", "--quiet", "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    failures = [
        f"{count} answered {status}"
        for status, count in report["by_status"].items()
        if status != "200 processed"
    ]
    if done.returncode and not failures:
        failures.append(f"simulate exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return report, failures


def signed_lines(path: Path, count: int) -> None:
    """`count` fresh mailbox.created deliveries, signed now, for wrk."""
    with path.open("wb") as out:
        for _ in range(count):
            body = orjson.dumps(traffic.mailbox_created())
            headers = signing.sign(SIGNING_KEY, body)
            out.write(
                f"{headers[signing.SIGNATURE_HEADER]}\t{headers[signing.TIMESTAMP_HEADER]}\t".encode()
                + body
                + b"\n"
            )


def wrk(
    run: Run, port: int, lines: int, path: str = "/webhooks/cmr", bodies: str = ""
) -> dict[str, Any]:
    """wrk (C) for run.seconds with 2 threads and 32 connections, each body sent once: of
    the file `bodies` in run.out when given (its `lines` signed beforehand), else signed
    now."""
    if bodies:
        file = run.out / bodies
    else:
        file = run.out / f"wrk-{port}.tsv"
        signed_lines(file, lines)
    url = f"http://127.0.0.1:{port}{path}?token={TOKEN}"
    done = subprocess.run(
        ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{run.seconds}s", "--timeout", "30s"]
        + ["-s", str(ROOT / "bench" / "deliveries.lua"), url, "--", str(file), "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    (run.out / f"wrk-{port}.txt").write_text(done.stdout)
    report: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    report["lines"] = lines
    return report


def wrk_figures(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    failures = [
        f"{report[kind]} {kind} errors"
        for kind in ("connect", "read", "write", "timeout")
        if report[kind]
    ]
    if report["status"]:
        failures.append(f"{report['status']} answers other than 2xx")
    if report["requests"] > report["lines"]:
        failures.append(f"ran out of unique bodies ({report['requests']} > {report['lines']})")
    figures = {
        "events_per_second": round(report["requests"] / report["seconds"], 1),
        "p50_ms": round(report["p50_ms"], 2),
        "p99_ms": round(report["p99_ms"], 2),
    }
    return figures, failures


async def count_events(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events WHERE status = 'processed'"))
    finally:
        await conn.close()


# --- the rows ---------------------------------------------------------------------------


def bench_service(run: Run, workers: int, events: int, limited: str = "") -> None:
    """The service's rows: `events` through simulate (none: no such row), then wrk;
    `limited` ends their names."""
    port = free_port()
    command = [*CLI, "serve", "--port", str(port), "--workers", str(workers)]
    log = run.out / f"service-{workers}{limited.replace(' ', '-')}.log"
    with (
        scratch_database(f"service_{workers}") as url,
        server(command, service_env(url), port, "/readyz", log) as proc,
    ):
        simulate(run, port, 500)  # warm-up
        if events:
            report, failures = simulate(run, port, events)
            figures = {k: report[k] for k in ("events_per_second", "p50_ms", "p99_ms")}
            run.add(f"service, {workers} worker(s), simulate{limited}", figures, failures)
        before = asyncio.run(count_events(url))
        lines = 8000 * run.seconds
        signed_lines(run.out / f"wrk-{port}.tsv", lines)
        cpu = Cpu(asyncio.run(postmaster(url)), server=proc.pid)
        with cpu.measuring():
            report = wrk(run, port, lines=lines, bodies=f"wrk-{port}.tsv")
        figures, failures = wrk_figures(report)
        figures |= cpu.per_event(report["requests"])
        stored = asyncio.run(count_events(url)) - before
        if stored < report["requests"]:
            failures.append(f"{report['requests']} answered, {stored} events processed")
        run.add(f"service, {workers} worker(s), wrk{limited}", figures, failures)


def bench_http_ceiling(run: Run, workers: int) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.ceiling_app:app", "--port", str(port)]
    command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    log = run.out / f"http-ceiling-{workers}.log"
    with server(command, dict(os.environ), port, "/docs", log) as proc:
        lines = 40000 * run.seconds
        signed_lines(run.out / f"wrk-{port}.tsv", lines)
        cpu = Cpu(None, server=proc.pid)
        with cpu.measuring():
            report = wrk(run, port, lines=lines, bodies=f"wrk-{port}.tsv")
        figures, failures = wrk_figures(report)
        figures |= cpu.per_event(report["requests"])
        run.add(f"HTTP ceiling, {workers} worker(s), wrk", figures, failures)


def service_writes(count: int) -> list[tuple[str, list[Any]]]:
    """The service's own statement and arguments for `count` mailbox.created deliveries."""
    vault, writes = Vault([KEY]), []
    for _ in range(count):
        raw = orjson.dumps(traffic.mailbox_created())
        envelope = payloads.parse_envelope(raw, HASHER)
        model = payloads.parse_handled(envelope, [])
        assert model is not None
        signature = SignatureCheck("valid", None, time.time())
        delivery = Delivery(envelope, raw, signature, hasher=HASHER)
        version = record.delivery_version(delivery)
        changes = effects.of(model, vault=vault, when=delivery.event_time, version=version)
        only = record.insert_only(changes, telling=False)  # as a group writes it
        writes.append(record.delivery_write(delivery, changes, vault, insert_only=only))
    return writes


async def db_ceiling_run(url: str, writes: list[tuple[str, list[Any]]]) -> dict[str, Any]:
    """The service's statements, prepared beforehand, straight through asyncpg: 32 senders
    on a pool of 20 connections, as the service has."""
    pool = await asyncpg.create_pool(url, min_size=20, max_size=20)
    latencies: list[float] = []
    queue = iter(writes)

    async def sender() -> None:
        for sql, args in queue:
            started = time.perf_counter()
            async with pool.acquire() as conn:
                row = await conn.fetchrow(sql, *args)
            assert row["inserted"]
            latencies.append(time.perf_counter() - started)

    cpu = Cpu(await postmaster(url), children=False)
    started = time.perf_counter()
    with cpu.measuring():
        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await pool.close()
    ms = sorted(v * 1000 for v in latencies)
    return {
        "events_per_second": round(len(ms) / elapsed, 1),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[int(len(ms) * 0.99)], 2),
    } | cpu.per_event(len(ms))


def bench_db_ceiling(run: Run, limited: str = "") -> tuple[str, list[Any]]:
    writes = service_writes(2000 * run.seconds)
    with scratch_database("db", migrated=True) as url:
        try:
            figures, failures = asyncio.run(db_ceiling_run(url, writes)), []
        except (AssertionError, asyncpg.PostgresError) as error:
            figures, failures = {}, [repr(error)]
    run.add(f"DB ceiling: the service's statement, asyncpg{limited}", figures, failures)
    return writes[0]


# --- the database as the limit ------------------------------------------------------------

CGROUPS = Path("/sys/fs/cgroup")
# A short quota period: a throttled database stalls for at most (1 - cpus) x 5 ms at a
# time (Kubernetes' CPU limits use 100 ms, whose stalls would dwarf a delivery's latency).
QUOTA_PERIOD_US = 5000


def quota_files(cpus: float, root: Path = CGROUPS) -> dict[str, str]:
    """What confines a cgroup to `cpus` CPUs: cgroup v2's cpu.max, else v1's CFS quota."""
    quota = str(round(cpus * QUOTA_PERIOD_US))
    if cpu_hierarchy(root) == root:
        return {"cpu.max": f"{quota} {QUOTA_PERIOD_US}"}
    return {"cpu.cfs_period_us": str(QUOTA_PERIOD_US), "cpu.cfs_quota_us": quota}


def move(pids: Iterable[int], procs: Path) -> None:
    """Each process into the cgroup of `procs` (one that has exited meanwhile is skipped)."""
    for pid in pids:
        try:
            procs.write_text(str(pid))
        except ProcessLookupError:
            pass


def cpu_hierarchy(root: Path = CGROUPS) -> Path:
    """Where the cgroups of the cpu controller are: the unified hierarchy (v2), else v1's."""
    return root if (root / "cgroup.controllers").exists() else root / "cpu"


def cgroup_of(pid: int) -> str:
    """The cgroup a process is in: in the hierarchy of the cpu controller (cgroup v1), else
    in the unified one (v2)."""
    lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    v1 = [path for _, controllers, path in lines if "cpu" in controllers.split(",")]
    return v1[0] if v1 else next(path for _, controllers, path in lines if not controllers)


@contextmanager
def database_cpus(cpus: float, postmaster_pid: int, root: Path = CGROUPS) -> Iterator[Path]:
    """The database server held to `cpus` CPUs while the block runs, as a server of its own
    of that size would be: the postmaster and its processes in a cgroup with a CPU quota
    inside their own (the backends it forks meanwhile are born in it); moved back after.
    OSError when this machine does not allow it (no cgroup file system, not root)."""
    hierarchy = cpu_hierarchy(root)
    home = hierarchy / cgroup_of(postmaster_pid).lstrip("/")
    if hierarchy == root:  # v2: refused (EBUSY) unless home is the root or holds no process
        (home / "cgroup.subtree_control").write_text("+cpu")
    group = home / f"cmw-bench-{os.getpid()}"
    group.mkdir()
    print(f"the database server held to {cpus:g} CPU in {group}", flush=True)
    try:
        for name, value in quota_files(cpus, root).items():
            (group / name).write_text(value)
        move([postmaster_pid, *children(postmaster_pid)], group / "cgroup.procs")
        yield group
    finally:
        release(group)


def release(group: Path, wait: float = 10) -> None:
    """Every process of the cgroup back into its parent, the cgroup removed: again while the
    postmaster forks a backend into it meanwhile, or while the kernel still counts one that
    has just exited (rmdir: EBUSY); for `wait` seconds at most, then OSError naming the
    cgroup and any process left in it."""
    deadline = time.monotonic() + wait
    while True:
        if pids := (group / "cgroup.procs").read_text().split():
            move(map(int, pids), group.parent / "cgroup.procs")
        else:
            try:
                group.rmdir()
                return
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
        if time.monotonic() > deadline:
            left = ", ".join(f"{pid} {read_stat(int(pid))}" for pid in pids) or "none listed"
            raise OSError(f"{group} stays busy; processes in it: {left}")
        time.sleep(0.01)


def read_stat(pid: int) -> str:
    """A process's name and state, as /proc shows them (`(postgres) Z`)."""
    try:
        return " ".join(Path(f"/proc/{pid}/stat").read_text().split()[1:3])
    except OSError:
        return "(gone)"


def release_leftovers(root: Path = CGROUPS) -> list[Path]:
    """Releases the database server from the cgroups of killed runs (a run killed outright
    leaves it held to a few CPUs)."""
    released = []
    for group in sorted(cpu_hierarchy(root).glob("**/cmw-bench-*")):
        if group.is_dir() and not pid_running(int(group.name.rsplit("-", 1)[1])):
            release(group)
            released.append(group)
    return released


def bench_database_bound(run: Run, cpus: float) -> None:
    """The service (one and two workers) and the DB ceiling again, the database server held
    to `cpus` CPUs: where the database is the limit, as on a server of its own, how the
    service's group commit compares with the one-statement ceiling. Not measured (and
    said why) where the database is elsewhere or this machine allows no CPU quota."""
    limited = f", database at {cpus:g} CPU"
    try:
        pid = asyncio.run(postmaster(SERVER))
        if pid is None:
            raise OSError("the database server is not on this machine")
        with database_cpus(cpus, pid, CGROUPS):
            for workers in (1, 2):
                bench_service(run, workers, 0, limited)
            bench_db_ceiling(run, limited)
    except OSError as error:
        print(f"database-bound rows not measured: {error}")


def literal(value: Any, keys: dict[str, str]) -> str:
    """A value as SQL text for pgbench; a key value becomes a fresh one per transaction.
    Colons are escaped: pgbench would read `:name` inside a string as a variable."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, bytes):
        return f"'\\x{value.hex()}'::bytea"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, list):
        return f"ARRAY[{', '.join(literal(v, keys) for v in value)}]" if value else "'{}'"
    if value in keys:
        return f"('{keys[value]}' || :n)"
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'").replace(":", "\\x3a")
    return f"E'{escaped}'"


def bench_physical_limit(run: Run, write: tuple[str, list[Any]]) -> None:
    """The same statement through pgbench (C, libpq, prepared), with fresh keys each time."""
    sql, args = write
    # the keys: the eventId, the subscription's ID (the first effect's first column) and
    # the mailbox's ID (the second effect's first column)
    second = record.RECORD_PARAMETERS + len(merge.SUBSCRIPTION_MAILBOX_CREATED.names)
    keys = {args[0]: "ev", args[record.RECORD_PARAMETERS]: "sub", args[second]: "mbx"}
    rendered = re.sub(r"\$(\d+)", lambda m: f"({literal(args[int(m[1]) - 1], keys)})", sql)
    script = run.out / "pgbench.sql"
    script.write_text("\\set n random(1, 1000000000000)\n" + " ".join(rendered.split()) + ";\n")
    with scratch_database("pgbench", migrated=True) as url:
        cpu = Cpu(asyncio.run(postmaster(url)))
        with cpu.measuring():
            done = subprocess.run(
                ["pgbench", "-n", "-M", "prepared", f"-c{CONCURRENCY}", "-j2", f"-T{run.seconds}"]
                + ["-f", str(script), "-l", "--log-prefix", str(run.out / "pgbench"), url],
                capture_output=True,
                text=True,
                cwd=run.out,
            )
    (run.out / "pgbench.txt").write_text(done.stdout + done.stderr)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    failures = [] if done.returncode == 0 else [done.stderr.strip()[-300:]]
    if failed and int(failed[1]):
        failures.append(f"{failed[1]} failed transactions")
    tps = re.search(r"tps = ([\d.]+)", done.stdout)
    us = sorted(
        int(line.split()[2])
        for log in run.out.glob("pgbench.*")
        if log.suffix not in (".sql", ".txt")
        for line in log.read_text().splitlines()
    )
    figures = {}
    if tps and us:
        figures = {
            "events_per_second": round(float(tps[1]), 1),
            "p50_ms": round(us[len(us) // 2] / 1000, 2),
            "p99_ms": round(us[int(len(us) * 0.99)] / 1000, 2),
        } | cpu.per_event(len(us))
    else:
        failures.append("pgbench printed no figures")
    run.add("physical limit: the same statement, pgbench", figures, failures)


def bench_spooling(run: Run) -> None:
    """Deliveries while PostgreSQL is away: every one goes to the fsynced spool."""
    port = free_port()
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=run.out))
    env = service_env("postgresql://postgres@127.0.0.1:9/nowhere", SPOOL_DIR=str(spool))
    command = [*CLI, "serve", "--port", str(port), "--no-migrate"]
    with server(command, env, port, "/healthz", run.out / "spooling.log"):
        report = wrk(run, port, lines=8000 * run.seconds)
    figures, failures = wrk_figures(report)
    with sqlite3.connect(spool / "spool.sqlite3") as db:
        (kept,) = db.execute("SELECT count(*) FROM deliveries").fetchone()
    if kept < report["requests"]:
        failures.append(f"{report['requests']} answered, {kept} in the spool")
    run.add("spooling, database away, wrk", figures, failures)


# The drain row: spooled deliveries written this many at once (one transaction).
SPOOL_CHUNK = 1000


async def fill_spool(directory: Path, deliveries: int) -> None:
    """What `serve` spools while the database is away: encrypted bodies and their checks."""
    vault, spool = Vault([KEY]), Spool(directory, max_bytes=2**40)

    async def put() -> None:
        meta: dict[str, Any] = {"kind": "delivery", "signature": "valid", "warnings": []}
        meta |= {"form": "timestamp.body:hex", "signedAt": time.time()}
        body = vault.encrypt(orjson.dumps(traffic.mailbox_created()))
        await spool.put(body=body, meta=meta, received_at=time.time())

    try:
        for start in range(0, deliveries, SPOOL_CHUNK):
            await asyncio.gather(*(put() for _ in range(min(SPOOL_CHUNK, deliveries - start))))
    finally:
        spool.close()


def spool_depth(path: Path) -> int:
    with sqlite3.connect(path, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM deliveries").fetchone()[0])


def timed_drain(path: Path, deliveries: int, proc: subprocess.Popen[bytes]) -> float:
    """Deliveries a second, from the first batch out of the spool to the last (those of
    the first batch not counted)."""
    while (first := spool_depth(path)) == deliveries:
        if proc.poll() is not None:
            raise RuntimeError("serve exited before draining")
        time.sleep(0.05)
    started = time.perf_counter()
    while spool_depth(path):
        if proc.poll() is not None:
            raise RuntimeError("serve exited while draining")
        time.sleep(0.05)
    return first / (time.perf_counter() - started)


def bench_drain(run: Run, deliveries: int) -> None:
    """`serve` on a scratch database, started with a spool of `deliveries` single-mailbox
    deliveries, timed from its first committed batch to an empty spool; every delivery
    must be processed."""
    spool = Path(tempfile.mkdtemp(prefix="drain-", dir=run.out))
    asyncio.run(fill_spool(spool, deliveries))
    port, failures, figures = free_port(), [], {}
    log = run.out / "drain.log"
    with scratch_database("drain", migrated=True) as url, log.open("wb") as output:
        env = service_env(url, SPOOL_DIR=str(spool))
        command = [*CLI, "serve", "--port", str(port), "--no-migrate"]
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=output, cwd=ROOT)
        try:
            rate = timed_drain(spool / SPOOL_FILE, deliveries, proc)
            figures = {"events_per_second": round(rate, 1)}
        except RuntimeError as error:
            failures.append(f"{error} (see {log})")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        processed = asyncio.run(count_events(url))
    if processed != deliveries:
        failures.append(f"{deliveries} spooled, {processed} processed")
    run.add(f"drain: {deliveries:,} spooled deliveries", figures, failures)


def bench_prewarmup_page_memory(run: Run, memory_events: int) -> None:
    port = free_port()
    log = run.out / "api.log"
    command = [*CLI, "serve", "--port", str(port)]
    with (
        scratch_database("api") as url,
        server(command, service_env(url), port, "/readyz", log) as proc,
    ):
        prewarmup(run, port)
        asyncio.run(fill_mailboxes(url, 100_000 - 1000 * PREWARMUPS))
        mailbox_page(run, port)
        if memory_events:
            memory_run(run, proc.pid, port, memory_events)


def prewarmup(run: Run, port: int) -> None:
    timings, failures = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(PREWARMUPS):
            body = orjson.dumps(traffic.prewarmup_success(domains=100, per_domain=10))
            headers = signing.sign(SIGNING_KEY, body) | {"content-type": "application/json"}
            started = time.perf_counter()
            response = client.post(
                f"http://127.0.0.1:{port}/webhooks/cmr",
                params={"token": TOKEN},
                content=body,
                headers=headers,
            )
            timings.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200 or response.json().get("status") != "processed":
                failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
    timings = timings[1:]  # the first warms caches
    figures = {"p50_ms": round(statistics.median(timings), 1), "p99_ms": round(max(timings), 1)}
    run.add(f"1,000-mailbox prewarmup (p50, max of {PREWARMUPS - 1})", figures, failures)


def mailbox_page(run: Run, port: int) -> None:
    page_ms, failures, cursor = [], [], None
    with httpx.Client(headers={"Authorization": f"Bearer {OPS}"}, timeout=30) as client:
        for i in range(110):
            params: dict[str, Any] = {"limit": 500}
            if i % 3 == 1:
                params["provider"] = "GOOGLE"
            if cursor and i % 3 == 2:
                params["cursor"] = cursor
            started = time.perf_counter()
            page = client.get(f"http://127.0.0.1:{port}/api/v1/mailboxes", params=params)
            page_ms.append((time.perf_counter() - started) * 1000)
            if page.status_code != 200 or len(page.json()["items"]) != 500:
                failures.append(f"HTTP {page.status_code}, {page.text[:200]}")
                continue
            cursor = page.json()["nextCursor"]
    page_ms = sorted(page_ms[10:])
    figures = {
        "p50_ms": round(statistics.median(page_ms), 2),
        "p99_ms": round(page_ms[int(len(page_ms) * 0.99)], 2),
    }
    run.add("500-item mailbox page, 100,000 stored (p50, p99)", figures, failures)


def memory_run(run: Run, pid: int, port: int, events: int) -> None:
    start = rss_mb(pid)
    samples = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    report, failures = simulate(run, port, events)
    done.set()
    sampler.join()
    tenth = max(1, len(samples) // 10)
    figures = {
        "events_per_second": report["events_per_second"],
        "rss_start_mb": round(start, 1),
        "rss_after_first_tenth_mb": round(max(samples[:tenth]), 1),
        "rss_peak_mb": round(max(samples), 1),
        "rss_end_mb": round(samples[-1], 1),
    }
    run.add(f"RSS through {events:,} events", figures, failures)


async def fill_mailboxes(url: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute(
        """INSERT INTO subscriptions (subscription_id, domain, source, status)
           SELECT 'bsub' || d, 'b' || d || '.com', 'prewarmed', 'active'
           FROM generate_series(0, 9999) d;
           INSERT INTO mailboxes (mailbox_id, subscription_id, domain, email, first_name,
             provider, source, password_encrypted)
           SELECT 'bmbx' || i, 'bsub' || (i % 10000), 'b' || (i % 10000) || '.com',
             'u' || i || '@b.com', 'Name', CASE WHEN i % 2 = 0 THEN 'GOOGLE' ELSE 'MICROSOFT'
             END, 'prewarmed', '\\x00' FROM generate_series(1, $1) i;
           ANALYZE""".replace("$1", str(count))
    )
    await conn.close()


# --- the report ---------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'measurement':66}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for r in rows:
        eps = "" if r["events_per_second"] is None else f"{r['events_per_second']:.0f}"
        p50 = "" if r["p50_ms"] is None else r["p50_ms"]
        p99 = "" if r["p99_ms"] is None else r["p99_ms"]
        print(f"{r['name']:66}{eps:>10}{p50:>9}{p99:>9}{r['failed']:>8}")
        rss = {k: v for k, v in r.items() if k.startswith("rss_")}
        if rss:
            print("    " + ", ".join(f"{k[4:-3].replace('_', ' ')} {v} MB" for k, v in rss.items()))
        cpu = {k[7:]: v for k, v in r.items() if k.startswith("cpu_us_")}
        if cpu:
            shown = ", ".join(f"{k} {v}" for k, v in cpu.items())
            print(f"    CPU µs an event: {shown}; all {r['cpu_us']}")


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    rate = {r["name"]: r["events_per_second"] for r in rows}
    service = rate.get("service, 1 worker(s), wrk")
    result = {}
    for label, name in (
        ("service(1w, wrk) / HTTP ceiling(1w)", "HTTP ceiling, 1 worker(s), wrk"),
        ("service(1w, wrk) / DB ceiling", "DB ceiling: the service's statement, asyncpg"),
        ("service(1w, wrk) / physical limit", "physical limit: the same statement, pgbench"),
    ):
        if service and rate.get(name):
            result[label] = round(service / rate[name], 2)
    result |= cpu_ratios({r["name"]: r for r in rows})
    result |= database_bound_ratios(rate)
    for r in rows:  # bench/outbound.py: with two destinations, against none (in turns)
        if "vs_none" in r:
            result["ingest with two destinations / none, events/s"] = r["vs_none"]
            result["ingest with two destinations / none, p99"] = r["p99_vs_none"]
            result["ingest with two destinations / none, CPU per delivery"] = r["cpu_vs_none"]
    return result


def database_bound_ratios(rate: dict[str, float | None]) -> dict[str, float]:
    """Service / DB ceiling where both ran with the database held to a few CPUs."""
    result = {}
    for name, ceiling in rate.items():
        if name.startswith("DB ceiling") and ", database at " in name and ceiling:
            limited = name[name.index(", database at ") :]
            for workers in (1, 2):
                service = rate.get(f"service, {workers} worker(s), wrk{limited}")
                if service:
                    label = f"service({workers}w, wrk) / DB ceiling{limited}"
                    result[label] = round(service / ceiling, 2)
    return result


def cpu_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The DB ceiling's CPU an event over the service's: all of it (with every party on one
    box and all of it busy, the service's events/s could reach that share of the ceiling's
    at most), and the database's alone (where the database is the limit, as on a server of
    its own, the service's deliveries go that much past the one-statement ceiling)."""
    ceiling = rows.get("DB ceiling: the service's statement, asyncpg", {})
    result = {}
    for workers in (1, 2):
        service = rows.get(f"service, {workers} worker(s), wrk", {})
        for label, key in (("CPU", "cpu_us"), ("database CPU", "cpu_us_database")):
            if ceiling.get(key) and service.get(key):
                name = f"{label} an event, DB ceiling / service({workers}w, wrk)"
                result[name] = round(ceiling[key] / service[key], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--events", type=int, default=10_000, help="events per simulate run")
    parser.add_argument("--memory-events", type=int, default=100_000)
    parser.add_argument("--drain-deliveries", type=int, default=50_000)
    parser.add_argument("--out", type=Path, help="folder for the reports (default: temporary)")
    parser.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="instead: COMMIT and the work tree in alternating runs (bench/compare.py)",
    )
    parser.add_argument("--pairs", type=int, default=2, help="with --baseline: runs per side")
    parser.add_argument(
        "--database-cpus",
        type=float,
        default=1.0,
        help="the database-bound rows: the database server held to this many CPUs (0: none)",
    )
    parser.add_argument(
        "--drop-leftovers",
        action="store_true",
        help="instead: drop the scratch databases of runs that were killed (and release the"
        " database server from their CPU quota)",
    )
    args = parser.parse_args()
    if args.drop_leftovers:
        done = [f"dropped {name}" for name in asyncio.run(drop_leftovers())]
        done += [f"released the database from {group}" for group in release_leftovers()]
        print("\n".join(done) or "nothing left behind by killed runs")
        return 0
    stop_on_sigterm()
    if args.baseline:
        from bench import compare

        passed = [f"--seconds={args.seconds}", f"--events={args.events}"]
        passed.append(f"--memory-events={args.memory_events}")
        return compare.compare(args.baseline, args.pairs, passed, args.out)
    missing = [tool for tool in ("wrk", "pgbench") if shutil.which(tool) is None]
    if missing:
        print(f"FAILED: {' and '.join(missing)} not found (Debian: wrk, postgresql-client)")
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="cmw-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.seconds)
    random.seed(1)
    started = time.perf_counter()
    for workers in (1, 2):
        bench_service(run, workers, args.events)
    for workers in (1, 2):
        bench_http_ceiling(run, workers)
    bench_physical_limit(run, bench_db_ceiling(run))
    if args.database_cpus:
        bench_database_bound(run, args.database_cpus)
    bench_spooling(run)
    bench_drain(run, args.drain_deliveries)
    bench_prewarmup_page_memory(run, args.memory_events)
    bench_outbound(run)
    print_table(run.rows)
    return report(run, ratios(run.rows), started)


def bench_outbound(run: Run) -> None:
    """bench/outbound.py's rows (ingest with destinations against none, in turns; a
    100,000-message backlog dispatched), run as its own command: it builds on this one."""
    out = run.out / "outbound"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "outbound.py")]
        + ["--seconds", str(run.seconds), "--out", str(out)],
        cwd=ROOT,
    )
    results = orjson.loads((out / "results.json").read_bytes())
    run.rows += results["rows"]
    run.failures += results["failures"]
    if done.returncode and not results["failures"]:
        run.failures.append(f"bench/outbound.py exited {done.returncode}")


def report(run: Run, result: dict[str, float], started: float) -> int:
    """Print the ratios and any failure, write results.json; 1 if a request failed."""
    for label, value in result.items():
        print(f"ratio {label}: {value}")
    print(f"benchmark took {time.perf_counter() - started:.0f} s; reports in {run.out}")
    results = {"rows": run.rows, "ratios": result, "failures": run.failures}
    (run.out / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    for failure in run.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if run.failures:
        print(f"{len(run.failures)} row(s) had failed requests: not a measurement", file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
