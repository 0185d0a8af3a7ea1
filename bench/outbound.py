"""Outbound rows of the benchmark (bench/run.py runs them; alone: python bench/outbound.py):

- ingest with two destinations against none: wrk's mailbox.created deliveries at two
  `serve` processes on one database, one with DESTINATIONS_FILE (every event forwarded
  to one, derived events checked for the other, in each delivery's transaction) and one
  without, in alternating turns (the box is noisy); the medians side by side, with the
  CPU a delivery took (the server and the database's backends). Their own dispatcher is
  off: what a delivery pays is writing its messages; sending is the next row.
- dispatch: a backlog of outbound messages (100,000 by default) written as the service
  writes them, drained by `coldmail-webhooks outbound dispatch` to a local receiver that
  counts each webhook-id; every message delivered once, no attempt failed.
"""

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.crypto import redact  # noqa: E402
from app.simulation import traffic  # noqa: E402
from bench import run as bench  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"bench-outbound-secret-0123456789").decode()
TURNS = 3
BACKLOG = 100_000
DRAIN_PATIENCE = 1800  # seconds a backlog may take to drain before the row fails
DISPATCH_WORKERS = 4


def destinations_file(folder: Path, url: str) -> Path:
    """Two destinations: `crm` takes every event (forwarded and derived), `ops-slack` the
    derived ones ops act on. Both at `url`, on loopback (allowed here)."""
    crm: dict[str, Any] = {"name": "crm", "format": "standard-webhooks", "events": ["*"]}
    crm["secretEnv"] = "CRM_SECRET"
    slack: dict[str, Any] = {"name": "ops-slack", "format": "slack"}
    slack["events"] = ["order.*", "mailboxes.ready", "subscription.at_risk", "spool.*"]
    declared = [d | {"url": url, "allowPrivateNetwork": True} for d in (crm, slack)]
    path = folder / "destinations.json"
    path.write_text(orjson.dumps({"destinations": declared}).decode())
    return path


def outbound_env(url: str, folder: Path, receiver: str, **extra: str) -> dict[str, str]:
    path = destinations_file(folder, receiver)
    return bench.service_env(url, DESTINATIONS_FILE=str(path), CRM_SECRET=SECRET, **extra)


# --- ingest with and without destinations -----------------------------------------------


def bench_ingest(run: bench.Run, turns: int = TURNS) -> None:
    port = {"none": bench.free_port(), "two": bench.free_port()}
    folder = Path(tempfile.mkdtemp(prefix="outbound-", dir=run.out))
    dead_end = f"http://127.0.0.1:{bench.free_port()}/hook"  # never sent: dispatch is off
    with bench.scratch_database("outbound_ingest", migrated=True) as url:
        env = {
            "none": bench.service_env(url),
            "two": outbound_env(url, folder, dead_end, OUTBOUND_DISPATCH="false"),
        }
        with (
            serve(run, "none", port["none"], env["none"]) as none,
            serve(run, "two", port["two"], env["two"]) as two,
        ):
            for name in port:
                bench.simulate(run, port[name], 500)  # warm-up
            figures, failures = ingest_turns(
                run, port, turns, {"none": none.pid, "two": two.pid}, url
            )
            written = asyncio.run(count(url, "SELECT count(*) FROM outbound_messages"))
    # crm takes each delivery (forwarded); nothing derived: no order or subscription state
    answered = sum(f["requests"] for f in figures["two"])
    if written < answered:
        failures.append(f"{answered} deliveries with destinations, {written} messages written")
    for name, label in (("none", "no destination"), ("two", "two destinations")):
        row = median_row(figures[name])
        if name == "two":
            base = median_row(figures["none"])
            row["vs_none"] = round(row["events_per_second"] / base["events_per_second"], 3)
            row["p99_vs_none"] = round(row["p99_ms"] / base["p99_ms"], 3)
            row["cpu_vs_none"] = round(row["cpu_us"] / base["cpu_us"], 3)
        run.add(f"ingest, {label}, wrk, median of {turns} turns", row, failures)
        failures = []


@contextmanager
def serve(run: bench.Run, name: str, port: int, env: dict[str, str]) -> Any:
    command = [*bench.CLI, "serve", "--port", str(port), "--no-migrate"]
    with bench.server(command, env, port, "/readyz", run.out / f"outbound-{name}.log") as proc:
        yield proc


def ingest_turns(
    run: bench.Run, port: dict[str, int], turns: int, pid: dict[str, int], url: str
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """wrk at each server in turn, the order swapped every turn (none, two; two, none...).
    Each turn also gives the CPU a delivery took (`cpu_us`: the server's process and the
    database's backends, from /proc): it too rises with a shared box's load, but moves
    less between turns than deliveries/s."""
    figures: dict[str, list[dict[str, Any]]] = {"none": [], "two": []}
    failures: list[str] = []
    for turn in range(turns):
        for name in ("none", "two") if turn % 2 == 0 else ("two", "none"):
            lines = 8000 * run.seconds
            bench.signed_lines(run.out / f"bodies-{port[name]}.tsv", lines)
            before = cpu_seconds([pid[name], *asyncio.run(backends(url))])
            report = bench.wrk(run, port[name], lines=lines, bodies=f"bodies-{port[name]}.tsv")
            spent = cpu_seconds([pid[name], *asyncio.run(backends(url))], before)
            shown, failed = bench.wrk_figures(report)
            shown["cpu_us"] = round(spent / max(report["requests"], 1) * 1e6)
            figures[name].append(shown | {"requests": report["requests"]})
            failures += [f"{name}, turn {turn + 1}: {f}" for f in failed]
            print(f"  ingest turn {turn + 1} {name}: {shown}", flush=True)
    return figures, failures


def median_row(turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: round(statistics.median(t[key] for t in turns), 2)
        for key in ("events_per_second", "p50_ms", "p99_ms", "cpu_us")
    }


def cpu_seconds(pids: list[int], before: dict[int, float] | None = None) -> Any:
    """Each process's CPU seconds so far (user and system); with `before`, the sum spent
    since then (a process begun meanwhile counts from its start)."""
    now = {pid: bench.process_cpu(pid) for pid in pids if Path(f"/proc/{pid}").exists()}
    if before is None:
        return now
    return sum(spent - before.get(pid, 0.0) for pid, spent in now.items())


async def backends(url: str) -> list[int]:
    """The database's backends but this one: a turn's server's connections (the other
    server is idle meanwhile)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [row["pid"] for row in rows]
    finally:
        await conn.close()


async def count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


# --- dispatching a backlog --------------------------------------------------------------

# A backlog as the service writes it: stored mailbox.created events (their redacted copy),
# each forwarded by a message that names it (the dispatcher builds its data when it sends).
FILL = """
WITH stored AS (
    INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict, signature,
        payload, event_time)
    SELECT 'bench-' || n, 'mailbox.created', 'processed', int8send(n), 1, false, 'valid',
        $1::jsonb, now()
    FROM generate_series(1, $2) AS n
    RETURNING id, payload -> 'data' ->> 'userId' AS user_id, event_time)
INSERT INTO outbound_messages (destination, type, event_id, user_id, occurred_at)
SELECT 'crm', 'mailbox.created', id, user_id, event_time FROM stored ORDER BY id
"""
# What the drain did: messages still waiting, delivered, attempts that failed, latencies.
OUTCOME = """
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE status = 'delivered') AS delivered,
    (SELECT count(*) FROM outbound_attempts
        WHERE status_code IS NULL OR status_code NOT BETWEEN 200 AND 299) AS failed,
    (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FROM outbound_attempts)
        AS p50_ms,
    (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) FROM outbound_attempts)
        AS p99_ms
FROM outbound_messages
"""


async def fill(url: str, backlog: int) -> None:
    stored = redact(traffic.mailbox_created())
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FILL, orjson.dumps(stored).decode(), backlog)
        await conn.execute("ANALYZE events")
        await conn.execute("ANALYZE outbound_messages")
    finally:
        await conn.close()


async def outcome(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetchrow(OUTCOME))
    finally:
        await conn.close()


def bench_dispatch(run: bench.Run, backlog: int = BACKLOG) -> None:
    receiver_port = bench.free_port()
    receiver = [sys.executable, "-m", "uvicorn", "bench.receiver_app:app"]
    receiver += ["--port", str(receiver_port), "--no-access-log", "--log-level", "warning"]
    folder = Path(tempfile.mkdtemp(prefix="dispatch-", dir=run.out))
    hook = f"http://127.0.0.1:{receiver_port}/hook"
    failures: list[str] = []
    with (
        bench.scratch_database("outbound_dispatch", migrated=True) as url,
        bench.server(receiver, dict(os.environ), receiver_port, "/count", folder / "rx.log"),
    ):
        asyncio.run(fill(url, backlog))
        seconds = drain(run, outbound_env(url, folder, hook), url, failures)
        result = asyncio.run(outcome(url))
        heard = httpx.get(f"http://127.0.0.1:{receiver_port}/count").json()
    if result["delivered"] != backlog:
        failures.append(f"{result['delivered']} of {backlog} delivered")
    if result["failed"]:
        failures.append(f"{result['failed']} attempts failed")
    if heard["unique"] != backlog or heard["requests"] != backlog:
        failures.append(f"the receiver heard {heard['requests']} requests, {heard['unique']} ids")
    figures = {
        "events_per_second": round(backlog / seconds, 1),
        "p50_ms": round(float(result["p50_ms"] or 0), 2),
        "p99_ms": round(float(result["p99_ms"] or 0), 2),
        "seconds": round(seconds, 1),
    }
    run.add(f"dispatch, {backlog:,} backlog to a local receiver", figures, failures)


def drain(run: bench.Run, env: dict[str, str], url: str, failures: list[str]) -> float:
    """Run `outbound dispatch` until nothing is pending; the seconds it took."""
    command = [*bench.CLI, "outbound", "dispatch", "--workers", str(DISPATCH_WORKERS)]
    with (run.out / "dispatch.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=ROOT)
        started = time.perf_counter()
        try:
            while asyncio.run(count(url, PENDING)) > 0:
                if proc.poll() is not None:
                    failures.append(f"the dispatcher exited with {proc.returncode}")
                    break
                if time.perf_counter() - started > DRAIN_PATIENCE:
                    failures.append(f"not drained in {DRAIN_PATIENCE} s")
                    break
                time.sleep(0.5)
            return time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(timeout=60)


PENDING = "SELECT count(*) FROM outbound_messages WHERE status = 'pending'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--backlog", type=int, default=BACKLOG)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bench.stop_on_sigterm()
    out = args.out or Path(tempfile.mkdtemp(prefix="cmw-bench-outbound-"))
    out.mkdir(parents=True, exist_ok=True)
    run = bench.Run(out, args.seconds)
    started = time.perf_counter()
    bench_ingest(run, args.turns)
    bench_dispatch(run, args.backlog)
    bench.print_table(run.rows)
    return bench.report(run, bench.ratios(run.rows), started)


if __name__ == "__main__":
    sys.exit(main())
