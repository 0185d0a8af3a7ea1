"""One benchmark run: the service beside its HTTP and database ceilings, on this machine.

    python bench/run.py [--events 5000] [--memory-events 100000] [--json bench/results.json]

Needs a PostgreSQL server (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/
postgres); scratch databases are created and dropped. Prints one table and writes JSON.
"""

import argparse
import asyncio
import hashlib
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import signing, traffic  # noqa: E402
from app.crypto import Vault, generate_key, redact  # noqa: E402
from app.schemas import canonical  # noqa: E402

SERVER = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY, TOKEN, SIGNING_KEY, OPS = generate_key(), "bench-token", "bench-signing-key", "bench-ops"
CLI = [sys.executable, "-m", "app.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database(name: str) -> str:
    return SERVER.rsplit("/", 1)[0] + "/" + name


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(SERVER)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def scratch_database(name: str) -> str:
    asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    asyncio.run(admin(f"CREATE DATABASE {name}"))
    return database(name)


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


@contextmanager
def server(
    command: list[str], env: dict[str, str], port: int, ready: str
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code < 500:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"server did not start: {command}")
        time.sleep(0.2)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def service_env(url: str) -> dict[str, str]:
    return dict(
        os.environ,
        DATABASE_URL=url,
        FERNET_KEYS=KEY,
        WEBHOOK_TOKENS=TOKEN,
        CMR_SIGNING_KEY=SIGNING_KEY,
        OPS_API_TOKENS=OPS,
        LOG_LEVEL="WARNING",
        DB_POOL_SIZE="20",
    )


def simulate(port: int, events: int, *extra: str) -> dict[str, Any]:
    out = ROOT / "bench" / f".simulate-{port}.json"
    subprocess.run(
        [
            *CLI,
            "simulate",
            f"http://127.0.0.1:{port}/webhooks/cmr",
            "--token",
            TOKEN,
            "--signing-key",
            SIGNING_KEY,
            "--events",
            str(events),
            "--concurrency",
            "32",
            "--single-mailbox",
            "--duplicates",
            "0",
            "--quiet",
            "--json",
            str(out),
            *extra,
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    out.unlink()
    return result


def row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "events_per_second": result["events_per_second"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
    }


def bench_service(workers: int, events: int) -> dict[str, Any]:
    url = scratch_database(f"cmw_bench_service_{workers}")
    port = free_port()
    command = [*CLI, "serve", "--port", str(port), "--workers", str(workers)]
    with server(command, service_env(url), port, "/readyz"):
        simulate(port, 500)  # warm-up
        return row(f"service, {workers} worker(s)", simulate(port, events))


def bench_http_ceiling(workers: int, events: int) -> dict[str, Any]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.ceiling_app:app",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with server(command, dict(os.environ), port, "/docs"):
        simulate(port, 500)
        return row(f"HTTP ceiling, {workers} worker(s)", simulate(port, events))


DB_STATEMENTS = [
    """INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict,
       signature, payload, body_encrypted) VALUES ($1, 'mailbox.created', 'processed', $2, 1,
       false, 'valid', $3, $4) ON CONFLICT (event_id, content_hash) DO UPDATE
       SET deliveries = events.deliveries + 1 RETURNING id, xmax = 0""",
    """INSERT INTO subscriptions (subscription_id, domain, user_id, provider, source, status)
       VALUES ($1, $2, $3, 'GOOGLE', 'standard', 'active') ON CONFLICT (subscription_id)
       DO UPDATE SET domain = COALESCE(subscriptions.domain, excluded.domain)""",
    """INSERT INTO mailboxes (mailbox_id, subscription_id, domain, email, first_name,
       app_password_encrypted, source) VALUES ($1, $2, $3, $4, $5, $6, 'standard')
       ON CONFLICT (mailbox_id) DO UPDATE SET email = excluded.email""",
]


async def db_ceiling_run(url: str, events: int, concurrency: int = 32) -> dict[str, Any]:
    """The same rows the service writes for a mailbox.created, straight through asyncpg."""
    vault = Vault([KEY])
    pool = await asyncpg.create_pool(url, min_size=20, max_size=20)
    latencies: list[float] = []
    remaining = [events]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            payload = traffic.mailbox_created()
            data, box = payload["data"], payload["data"]["mailboxDetails"]
            raw = orjson.dumps(payload)
            started = time.perf_counter()
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(
                    DB_STATEMENTS[0],
                    payload["eventId"],
                    hashlib.sha256(canonical(payload)).digest(),
                    orjson.dumps(redact(payload)).decode(),
                    vault.encrypt(raw),
                )
                await conn.execute(
                    DB_STATEMENTS[1], data["subscriptionId"], data["domain"], data["userId"]
                )
                await conn.execute(
                    DB_STATEMENTS[2],
                    box["mailboxId"],
                    data["subscriptionId"],
                    data["domain"],
                    box["email"],
                    box["firstName"],
                    vault.encrypt(box["appPassword"].encode()),
                )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await pool.close()
    ms = sorted(v * 1000 for v in latencies)
    return {
        "events_per_second": round(events / elapsed, 1),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[int(len(ms) * 0.99)], 2),
    }


def bench_db_ceiling(events: int) -> dict[str, Any]:
    url = scratch_database("cmw_bench_db")
    subprocess.run(
        [*CLI, "migrate"], env=service_env(url), check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    return row("DB ceiling (asyncpg, same rows)", asyncio.run(db_ceiling_run(url, events)))


def bench_prewarmup_and_page(memory_events: int) -> list[dict[str, Any]]:
    url = scratch_database("cmw_bench_api")
    port = free_port()
    rows: list[dict[str, Any]] = []
    with server([*CLI, "serve", "--port", str(port)], service_env(url), port, "/readyz") as proc:
        endpoint = f"http://127.0.0.1:{port}/webhooks/cmr"
        timings = []
        for _ in range(6):
            body = orjson.dumps(traffic.prewarmup_success(domains=100, per_domain=10))
            headers = signing.sign(SIGNING_KEY, body) | {"content-type": "application/json"}
            started = time.perf_counter()
            response = httpx.post(
                endpoint, params={"token": TOKEN}, content=body, headers=headers, timeout=60
            )
            timings.append((time.perf_counter() - started) * 1000)
            assert response.json()["status"] == "processed", response.text
        timings = timings[1:]  # the first warms caches
        rows.append(
            {
                "name": "1,000-mailbox prewarmup (p50 of 5)",
                "events_per_second": None,
                "p50_ms": round(statistics.median(timings), 1),
                "p99_ms": round(max(timings), 1),
            }
        )
        asyncio.run(fill_mailboxes(url, 100_000 - 6000))
        headers = {"Authorization": f"Bearer {OPS}"}
        page_ms = []
        with httpx.Client(headers=headers) as client:
            cursor = None
            for i in range(60):
                params: dict[str, Any] = {"limit": 500}
                if i % 3 == 1:
                    params["provider"] = "GOOGLE"
                if cursor and i % 3 == 2:
                    params["cursor"] = cursor
                started = time.perf_counter()
                page = client.get(f"http://127.0.0.1:{port}/api/v1/mailboxes", params=params)
                page_ms.append((time.perf_counter() - started) * 1000)
                assert len(page.json()["items"]) == 500
                cursor = page.json()["nextCursor"]
        page_ms = sorted(page_ms[10:])
        rows.append(
            {
                "name": "500-item mailbox page, 100,000 stored",
                "events_per_second": None,
                "p50_ms": round(statistics.median(page_ms), 2),
                "p99_ms": round(page_ms[int(len(page_ms) * 0.99)], 2),
            }
        )
        if memory_events:
            rows.append(memory_run(proc.pid, port, memory_events))
    return rows


def memory_run(pid: int, port: int, events: int) -> dict[str, Any]:
    peak = [rss_mb(pid)]
    start = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = simulate(port, events)
    done.set()
    sampler.join()
    return {
        "name": f"RSS through {events:,} events (start -> peak MB)",
        "events_per_second": result["events_per_second"],
        "p50_ms": round(start, 1),
        "p99_ms": round(peak[0], 1),
        "rss_start_mb": round(start, 1),
        "rss_peak_mb": round(peak[0], 1),
    }


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


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'measurement':44}{'events/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        eps = "" if r["events_per_second"] is None else f"{r['events_per_second']:.0f}"
        print(f"{r['name']:44}{eps:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--memory-events", type=int, default=100_000)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    random.seed(1)
    started = time.perf_counter()
    rows = [
        bench_service(1, args.events),
        bench_service(2, args.events),
        bench_http_ceiling(1, args.events),
        bench_http_ceiling(2, args.events),
        bench_db_ceiling(args.events),
    ]
    rows += bench_prewarmup_and_page(args.memory_events)
    by_name = {r["name"]: r for r in rows}
    db = by_name["DB ceiling (asyncpg, same rows)"]["events_per_second"]
    ratios: dict[str, dict[str, float]] = {}
    for workers in (1, 2):
        service = by_name[f"service, {workers} worker(s)"]["events_per_second"]
        http = by_name[f"HTTP ceiling, {workers} worker(s)"]["events_per_second"]
        ratios[f"{workers}w"] = {
            "service/http": round(service / http, 2),
            "service/db": round(service / db, 2),
            "service/min(http,db)": round(service / min(http, db), 2),
        }
    print_table(rows)
    for label, ratio in ratios.items():
        print(f"ratios, {label}: " + ", ".join(f"{k} {v}" for k, v in ratio.items()))
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    Path(args.json).write_bytes(
        orjson.dumps({"rows": rows, "ratios": ratios}, option=orjson.OPT_INDENT_2)
    )


if __name__ == "__main__":
    main()
