"""The ops cockpit at scale: `python bench/scale.py [--out DIR] [--keep] [--only TEXT]`.

Generates 1,000,000 mailboxes (5 per subscription, credentials encrypted with the run's
key), 200,000 subscriptions (100 users; every period ends within the next 30 days, as with
monthly billing, so the renewals list holds nearly all of them), 200,000 orders, 10,000
domains with registrar states, and 5,000,000 events over 180 days, straight into the tables
with generate_series. Then, through HTTP against `serve --workers 2`: each dashboard page and
API list (overview, renewals, searches, every list, the detail pages) many times, p50 and
p95 against the 150 ms target; a 10,000-mailbox export against 2 s; /metrics counting the
renewal risks; and deliveries a second, in turns with these tables and with empty ones.
20 to 30 minutes, most of it the filling.

With --keep the filled database (`cmw_bench_scale`) is kept and the next --keep run reuses
it (migrated to head first, so a new index is measured without refilling). With --only,
only the pages whose row name holds one of the given texts are measured: no export,
/metrics or deliveries rows.
"""

import argparse
import asyncio
import base64
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.crypto import Vault  # noqa: E402
from app.operations import search_index  # noqa: E402
from app.simulation import traffic  # noqa: E402
from bench import run as bench  # noqa: E402

SUBSCRIPTIONS, MAILBOXES, EVENTS = 200_000, 1_000_000, 5_000_000
USERS = 100  # so each user has 10,000 mailboxes: one user's export is the 10,000 measured
PAGE_TARGET_MS, EXPORT_TARGET_S = 150.0, 2.0
REQUESTS, WARM_UP = 40, 5
CREDENTIALS = "bench-credentials-token-0001"
KEPT = "cmw_bench_scale"
# a kept database outlives the run, so its credentials' key must too (scratch data only)
KEPT_KEY = base64.urlsafe_b64encode(b"bench-scale: scratch data only!!").decode()

FILL = [
    """INSERT INTO subscriptions (subscription_id, domain, domain_id, user_id, user_email,
           provider, source, status, order_id, price, quantity, lifecycle_quantity,
           subscription_status, period_start, period_end, expiry_date, auto_renew,
           lifecycle_source)
       SELECT 'SUB' || n, 'dom' || n || '.com', 'DOM' || n, 'U' || n % 100,
           'buyer' || n % 100 || '@agency.example',
           CASE WHEN n % 2 = 0 THEN 'GOOGLE' ELSE 'MICROSOFT' END,
           CASE WHEN n % 3 = 0 THEN 'prewarmed' ELSE 'standard' END,
           CASE WHEN n % 50 = 0 THEN 'failed' ELSE 'active' END,
           'ORD' || n, 8 + n % 5, 5, 5,
           (ARRAY['ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE',
                  'ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE','ACTIVE',
                  'RENEWING','PAST_DUE','EXPIRED','CANCELLED'])[1 + n % 20],
           e - interval '30 days', e, e, n % 10 <> 0, 'event'
       FROM (SELECT n, now() - interval '5 days' + (n % 36) * interval '1 day'
                 + (n % 1440) * interval '1 minute' AS e
             FROM generate_series(1, 200000) n) g""",
    """INSERT INTO domains (domain_id, name, status, expiry_date, version)
       SELECT 'DOM' || n, 'dom' || n || '.com',
           (ARRAY['ACTIVE','ACTIVE','GRACE_PERIOD','RENEWAL_FAILED','EXPIRED'])[1 + n / 20 % 5],
           now() + (n % 300) * interval '1 day', '2026'
       FROM generate_series(20, 200000, 20) n""",
    """INSERT INTO orders (order_id, kind, user_id, user_email, provider, status,
           failure_reason, created_at, updated_at)
       SELECT 'ORD' || n, CASE WHEN n % 3 = 0 THEN 'prewarmup' ELSE 'mailbox' END,
           'U' || n % 100, 'buyer' || n % 100 || '@agency.example',
           CASE WHEN n % 2 = 0 THEN 'GOOGLE' ELSE 'MICROSOFT' END,
           CASE WHEN n % 33 = 0 THEN 'failed' WHEN n % 33 = 1 THEN 'partially_failed'
                ELSE 'succeeded' END,
           CASE WHEN n % 66 = 0 THEN 'Payment declined' END, t, t
       FROM (SELECT n, now() - (n::float / 200000) * interval '180 days' AS t
             FROM generate_series(1, 200000) n) g""",
    # each at its order's time: the failed-domains view's date range reads these
    """INSERT INTO order_domains (order_id, domain, status, reason, subscription_id, quantity,
           price, succeeded_version, created_at, updated_at)
       SELECT 'ORD' || n, 'dom' || n || '.com',
           CASE WHEN n % 33 = 0 THEN 'failed' ELSE 'succeeded' END,
           CASE WHEN n % 33 = 0 THEN 'DNS not verified' END, 'SUB' || n, 5, 8 + n % 5, '2026',
           t, t
       FROM (SELECT n, now() - (n::float / 200000) * interval '180 days' AS t
             FROM generate_series(1, 200000) n) g""",
    """INSERT INTO mailboxes (mailbox_id, subscription_id, domain, email, first_name, last_name,
           provider, source, user_id, user_email, order_id, creation_time,
           password_encrypted, app_password_encrypted)
       SELECT 'MBX' || n, 'SUB' || s, 'dom' || s || '.com',
           lower(f) || '.' || lower(l) || n || '@dom' || s || '.com', f, l,
           CASE WHEN s % 2 = 0 THEN 'GOOGLE' ELSE 'MICROSOFT' END, 'standard',
           'U' || s % 100, 'buyer' || s % 100 || '@agency.example', 'ORD' || s,
           now() - (s::float / 200000) * interval '180 days',
           CASE WHEN s % 2 = 1 THEN $1::bytea END, CASE WHEN s % 2 = 0 THEN $2::bytea END
       FROM (SELECT n, 1 + (n - 1) % 200000 AS s,
                 (ARRAY['Jane','Mike','Olivia','James','Yvonne','Omar'])[1 + n % 6] AS f,
                 (ARRAY['Okafor','King','Smith','Nguyen','Garcia'])[1 + n % 5] AS l
             FROM generate_series(1, 1000000) n) g""",
    """INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict,
           signature, payload, first_received_at, last_received_at, event_time)
       SELECT 'EV' || n, 'mailbox.created', 'processed', sha256(n::text::bytea), 1, false,
           'valid',
           jsonb_build_object('event', 'mailbox.created', 'eventId', 'EV' || n,
               'data', jsonb_build_object('orderId', 'ORD' || s, 'subscriptionId', 'SUB' || s,
                   'mailboxDetails', jsonb_build_object('mailboxId', 'MBX' || m,
                       'password', '[REDACTED]'))), t, t, t
       FROM (SELECT n, 1 + (n - 1) % 1000000 AS m, 1 + (n - 1) % 200000 AS s,
                 now() - ((5000000 - n)::float / 5000000) * interval '180 days' AS t
             FROM generate_series(1, 5000000) n) g""",
    # one event in 1,000 and the oldest and newest keep their bodies (retention expires
    # the others'): /readyz decrypts the oldest and newest stored to tell that FERNET_KEYS
    # reads them, and with no body stored it read all 5M rows twice (8 s: never ready)
    """UPDATE events SET body_encrypted = $1
       WHERE id % 1000 = 0 OR event_id IN ('EV1', 'EV5000000')""",
    """INSERT INTO rejected_deliveries (reason, errors, signature, received_at)
       SELECT 'invalid_payload', '[]'::jsonb, 'valid', now() - n * interval '1 hour'
       FROM generate_series(1, 1000) n""",
    "VACUUM ANALYZE",
]


async def index_searches(conn: asyncpg.Connection) -> None:
    """The search indexer's walk over the rows just filled, as `serve`'s first would do."""
    began = time.perf_counter()
    print("  search indexer...", end="", flush=True)
    await search_index.index_once(conn, margin=0)
    await conn.execute("VACUUM ANALYZE mailbox_search, subscription_search")
    print(f" {time.perf_counter() - began:.0f} s", flush=True)


async def fill(url: str, vault: Vault) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '512MB'")
        for statement in FILL:
            print(f"  {' '.join(statement.split()[:3])}...", end="", flush=True)
            began = time.perf_counter()
            if "$1" in statement:
                given = {"password": traffic.canary("pw"), "app_password": traffic.canary("app")}
                sealed = vault.seal(given)  # one token in both columns, as the service seals
                tokens = (sealed["password"], sealed["app_password"])
                await conn.execute(statement, *tokens[: statement.count("$")])
            else:
                await conn.execute(statement)
            print(f" {time.perf_counter() - began:.0f} s", flush=True)
        await index_searches(conn)
    finally:
        await conn.close()
    return time.perf_counter() - started


def targets() -> list[tuple[str, list[str]]]:
    """(name, paths): each row requests its paths in turn."""
    ui = [
        ("overview /ui", ["/ui"]),
        ("renewals /ui/renewals", ["/ui/renewals"]),
        ("renewals API, 30 days", ["/api/v1/renewals?withinDays=30"]),
        ("renewals API, 7 days, page 2", ["/api/v1/renewals?withinDays=7&cursor=PAGE2"]),
        *queue_targets(),
    ]
    searches = [
        ("search mailboxes (API)", [f"/api/v1/mailboxes?q={q}" for q in SEARCHES]),
        ("search mailboxes /ui/mailboxes", [f"/ui/mailboxes?q={q}" for q in SEARCHES]),
        ("search subscriptions (API)", [f"/api/v1/subscriptions?q={q}" for q in SUB_SEARCHES]),
    ]
    lists = [
        (f"list {name}", [path, oldest(path)])
        for name, path in (
            ("/ui/orders", "/ui/orders"),
            ("/ui/subscriptions", "/ui/subscriptions"),
            ("/ui/mailboxes", "/ui/mailboxes"),
            ("/ui/events", "/ui/events"),
            ("/ui/rejected", "/ui/rejected"),
            ("API events", "/api/v1/events?order=newest"),
            ("API mailboxes", "/api/v1/mailboxes?order=newest"),
            ("API subscriptions", "/api/v1/subscriptions?order=newest"),
            ("API orders", "/api/v1/orders?order=newest"),
        )
    ]
    details = [
        ("detail /ui/orders/{id}", [f"/ui/orders/ORD{n}" for n in (7, 70_001, 199_999)]),
        ("detail /ui/subscriptions/{id}", [f"/ui/subscriptions/SUB{n}" for n in (7, 123_456)]),
        ("detail /ui/mailboxes/{id}", [f"/ui/mailboxes/MBX{n}" for n in (7, 654_321)]),
    ]
    day = str(date.today() - timedelta(days=1))
    week = f"from={date.today() - timedelta(days=7)}&to={date.today()}"
    dashboard = [
        ("failed domains /ui/failed-domains", ["/ui/failed-domains"]),
        (
            "failed prewarmup domains, yesterday",
            [f"/ui/failed-domains?kind=prewarmup&from={day}&to={day}"],
        ),
        ("failed domains CSV, yesterday", [f"/ui/failed-domains.csv?from={day}&to={day}"]),
        ("failed domains CSV, all (whole file)", ["/ui/failed-domains.csv"]),
        ("failed domains CSV, all (first byte)", ["/ui/failed-domains.csv"]),
        ("incomplete orders /ui/incomplete-orders", ["/ui/incomplete-orders"]),
        ("orders placed yesterday /ui/orders", [f"/ui/orders?from={day}&to={day}"]),
        (
            "orders by status /ui/orders",
            ["/ui/orders?status=failed", f"/ui/orders?status=partially_failed&{week}"],
        ),
        ("event search, default window (6 h)", [f"/ui/events?q={q}" for q in EVENT_SEARCHES]),
        ("events of a day /ui/events", [f"/ui/events?since={day}T00:00&until={day}T23:59"]),
        (
            "event search in a day /ui/events",
            [f"/ui/events?q={q}&since={day}T00:00&until={day}T23:59" for q in EVENT_SEARCHES],
        ),
        ("charts /ui/deliveries", [f"/ui/deliveries?range={r}" for r in ("24h", "7d", "30d")]),
    ]
    return ui + searches + lists + details + dashboard


def oldest(path: str) -> str:
    """The list oldest first: the API refuses `order` given twice."""
    if "order=newest" in path:
        return path.replace("order=newest", "order=oldest")
    return f"{path}{'&' if '?' in path else '?'}order=oldest"


def queue_targets() -> list[tuple[str, list[str]]]:
    """The renewals queue's parts and filters, a customer's page, a search for a customer;
    and the queue's sums uncached (a new date range each request: what a filter costs the
    first time it is asked within a minute)."""
    today = datetime.now(UTC).date()
    ranges = [
        f"renewsFrom={today + timedelta(days=n % 7)}&renewsBefore={today + timedelta(days=7 + n)}"
        for n in range(REQUESTS + WARM_UP)
    ]
    return [
        (
            "renewals /ui/renewals, overdue + a risk",
            [
                "/ui/renewals?due=overdue&risk=renewal_failed",
                "/ui/renewals?due=all&risk=auto_renew_off",
            ],
        ),
        (
            "renewals /ui/renewals, a customer",
            [
                "/ui/renewals?due=all&customer=U7",
                "/ui/renewals?customer=buyer42%40agency.example",
            ],
        ),
        (
            "renewals API, this week / a customer",
            [
                "/api/v1/renewals?due=this_week",
                "/api/v1/renewals?userId=U7&risk=past_due",
            ],
        ),
        ("renewals API, a new date range each time", [f"/api/v1/renewals?{r}" for r in ranges]),
        ("renewals /ui/renewals, a date range", [f"/ui/renewals?{r}" for r in ranges]),
        (
            # a customer's queue: the whole week's (35,000 rows here) is a download of seconds
            "renewals CSV /ui/renewals.csv, a customer",
            ["/ui/renewals.csv?due=this_week&customer=U7", "/ui/renewals.csv?due=all&customer=U7"],
        ),
        ("customer /ui/customers/{id}", ["/ui/customers/U7", "/ui/customers/U42"]),
        (
            "search mailboxes for a customer /ui",
            [
                "/ui/mailboxes?q=buyer42%40agency",
                "/ui/mailboxes?q=U42",
            ],
        ),
    ]


SEARCHES = ["OKAFOR7777", "dom4242.com", "MBX98765", "yvonne.smith"]
SUB_SEARCHES = ["DOM1234.COM", "sub77777", "buyer42@agency"]
EVENT_SEARCHES = ["MBX999998", "ORD199999", "no-such-text"]


def measure(client: httpx.Client, name: str, paths: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The whole answer's time; a row named "(first byte)" times a streamed download's first
    bytes (the rest is read after the clock stops). A "(whole file)" row, a download of
    every row there is, is held to the export's target, as the mailbox export is; its first
    byte has a row of its own, held to the page's."""
    timings, failures = [], []
    for i in range(WARM_UP + REQUESTS):
        path = paths[i % len(paths)]
        started = time.perf_counter()
        with client.stream("GET", path) as response:
            if name.endswith("(first byte)"):
                chunks = response.iter_raw()
                next(chunks, b"")
                elapsed = (time.perf_counter() - started) * 1000
                for _ in chunks:
                    pass
            else:
                response.read()
                elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            failures.append(f"{path} answered {response.status_code}")
        elif i >= WARM_UP:
            timings.append(elapsed)
    timings.sort()
    figures = {
        "p50_ms": round(statistics.median(timings), 1) if timings else None,
        "p95_ms": round(timings[int(len(timings) * 0.95) - 1], 1) if timings else None,
        "requests": len(timings),
    }
    target = EXPORT_TARGET_S * 1000 if name.endswith("(whole file)") else PAGE_TARGET_MS
    figures["target_ms"] = target
    if figures["p95_ms"] is not None and figures["p95_ms"] > target:
        figures["over_target"] = True
    return figures, failures


def second_page(client: httpx.Client) -> str:
    first = client.get("/api/v1/renewals?withinDays=7&limit=50").json()
    return str(first["nextCursor"])


def export(client: httpx.Client) -> tuple[dict[str, Any], list[str]]:
    """One user's 10,000 mailboxes as Instantly's CSV, five times: the whole download."""
    timings, failures = [], []
    for _ in range(5):
        started = time.perf_counter()
        with client.stream(
            "GET",
            "/api/v1/exports/mailboxes",
            params={"format": "instantly", "userId": "U7"},
            headers={"authorization": f"Bearer {CREDENTIALS}"},
        ) as response:
            rows = sum(1 for _ in response.iter_lines())
        timings.append(time.perf_counter() - started)
        if response.status_code != 200 or rows != 10_001:
            failures.append(f"export answered {response.status_code} with {rows} lines")
    return {
        "seconds_max": round(max(timings), 2),
        "seconds_median": round(statistics.median(timings), 2),
    }, failures


def deliveries(run: bench.Run, url: str, label: str) -> None:
    port = bench.free_port()
    command = [*bench.CLI, "serve", "--port", str(port), "--workers", "2"]
    log = run.out / f"scale-deliveries-{label}.log"
    with bench.server(command, bench.service_env(url), port, "/readyz", log):
        bench.simulate(run, port, 300)
        report, failures = bench.simulate(run, port, 4000)
    figures = {k: report[k] for k in ("events_per_second", "p50_ms", "p99_ms")}
    run.add(f"deliveries, 2 workers, {label}", figures, failures)


@contextmanager
def kept_database() -> Iterator[str]:
    """`cmw_bench_scale`, created anew unless it was filled to the end, migrated to head,
    and not dropped."""
    url = bench.SERVER.rsplit("/", 1)[0] + "/" + KEPT
    try:
        asyncio.run(bench.admin(f"CREATE DATABASE {KEPT}"))
    except asyncpg.DuplicateDatabaseError:
        if not asyncio.run(filled(url)):  # a fill cut short: its rows would clash
            asyncio.run(bench.admin(f"DROP DATABASE {KEPT} WITH (FORCE)"))
            asyncio.run(bench.admin(f"CREATE DATABASE {KEPT}"))
    subprocess.run([*bench.CLI, "migrate"], env=bench.service_env(url), check=True, cwd=bench.ROOT)
    yield url


async def filled(url: str) -> bool:
    """Whether the last FILL statement ran to its end (the rejected deliveries come last)."""
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval("SELECT to_regclass('rejected_deliveries') IS NOT NULL")
        return bool(found and await conn.fetchval("SELECT count(*) FROM rejected_deliveries"))
    finally:
        await conn.close()


def main(run: bench.Run, *, keep: bool, only: list[str]) -> list[dict[str, Any]]:
    vault = Vault([bench.KEY])
    rows: list[dict[str, Any]] = []
    with (
        bench.scratch_database("empty", migrated=True) as empty,
        kept_database() if keep else bench.scratch_database("scale", migrated=True) as url,
    ):
        if not (keep and asyncio.run(filled(url))):
            seconds = asyncio.run(fill(url, vault))
            print(f"generated the tables in {seconds:.0f} s", flush=True)
        port = bench.free_port()
        command = [*bench.CLI, "serve", "--port", str(port), "--workers", "2"]
        # no retention run: it would expire the old bodies (see FILL) of a kept database
        env = bench.service_env(url, CREDENTIALS_API_TOKENS=CREDENTIALS, BODY_RETENTION_DAYS="0")
        with (
            # a loaded box took over a minute to start both workers beside these tables
            bench.server(command, env, port, "/readyz", run.out / "scale-serve.log", wait=300),
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
        ):
            signed = client.post("/ui/login", data={"token": bench.OPS})
            assert signed.status_code == 303, signed.text
            client.headers["authorization"] = f"Bearer {bench.OPS}"
            cursor = second_page(client)
            for name, paths in targets():
                if only and not any(text in name for text in only):
                    continue
                paths = [p.replace("PAGE2", cursor) for p in paths]
                figures, failures = measure(client, name, paths)
                rows.append(run.add(name, figures, failures))
                print(f"  {name}: {figures}", flush=True)
            if only:
                return rows
            figures, failures = export(client)
            if figures["seconds_max"] > EXPORT_TARGET_S:
                figures["over_target"] = True
            rows.append(run.add("export 10,000 mailboxes (Instantly CSV)", figures, failures))
            rows.append(metrics(run, client))
        for round_ in (1, 2):  # in turns, so neither side has the quieter minutes
            deliveries(run, empty, f"empty tables, round {round_}")
            deliveries(run, url, f"1M mailboxes, 5M events, round {round_}")
    return rows


def metrics(run: bench.Run, client: httpx.Client) -> dict[str, Any]:
    scrapes, failures = [], []
    for _ in range(4):  # each worker counts the renewal risks on its first scrape
        started = time.perf_counter()
        answer = client.get("/metrics")
        scrapes.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 200 or "cmr_subscriptions_at_risk" not in answer.text:
            failures.append(f"/metrics answered {answer.status_code}")
    figures = {"slowest_ms": round(max(scrapes), 1), "fastest_ms": round(min(scrapes), 1)}
    return run.add("/metrics, counting the renewal risks", figures, failures)


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'measurement (scale)':44}{'p50 ms':>9}{'p95 ms':>9}{'target':>10}{'failed':>8}")
    for r in rows:
        if "seconds_max" in r:
            target, mark = f"{EXPORT_TARGET_S:.0f} s", " OVER" if r.get("over_target") else ""
            median, slowest = f"{r['seconds_median']}s", f"{r['seconds_max']}s"
            print(f"{r['name']:44}{median:>9}{slowest:>9}{target:>10}{r['failed']:>8}{mark}")
        elif "slowest_ms" in r:
            print(
                f"{r['name']:44}{r['fastest_ms']:>9}{r['slowest_ms']:>9}{'none':>10}{r['failed']:>8}"
            )
        elif "p95_ms" in r:
            mark = " OVER" if r.get("over_target") else ""
            print(
                f"{r['name']:44}{r['p50_ms']:>9}{r['p95_ms']:>9}"
                f"{r.get('target_ms', PAGE_TARGET_MS):>7.0f} ms{r['failed']:>8}{mark}"
            )


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="folder for the reports (default: temporary)")
    parser.add_argument("--keep", action="store_true", help=f"keep (and reuse) {KEPT}")
    parser.add_argument(
        "--only", action="append", default=[], help="measure only pages whose name holds this"
    )
    args = parser.parse_args()
    bench.stop_on_sigterm()
    if args.keep:
        bench.KEY = KEPT_KEY
    out = args.out or Path(tempfile.mkdtemp(prefix="cmw-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    run = bench.Run(out, seconds=0)  # no wrk run here
    random.seed(1)
    started = time.perf_counter()
    print_rows(main(run, keep=args.keep, only=args.only))
    bench.print_table([r for r in run.rows if r["events_per_second"] is not None])
    return bench.report(run, {}, started)


if __name__ == "__main__":
    sys.exit(cli())
