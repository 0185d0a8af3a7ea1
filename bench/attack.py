"""Attacks from the open internet, measured: what an unauthenticated or hostile client
costs a real `serve` (production mode, one worker, a file limit of 1,024) on this machine;
the bounds are in docs/webhooks.md, "On the open internet".

    python bench/attack.py [--python PYTHON] [--fd-limit N]

Starts `PYTHON -m app.cli serve` (default: this interpreter) on a scratch database of
BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres), runs each
attack, prints one line of figures per attack, and drops the database. --python lets the
same attacks run against another checkout's environment, for a before/after. A request
that should have been answered and was not (a delivery, /healthz) is a failed run: the
run says which and exits 1.
"""

import argparse
import hashlib
import hmac
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.crypto import generate_key  # noqa: E402
from app.simulation import traffic  # noqa: E402

SERVER = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TOKEN, SIGNING_KEY, OPS = "attack-webhook-token", "attack-signing-key", "attack-ops-token-01"
BODY = 5 * 1024 * 1024
PATIENCE = 120
FORM = 100 * 1024 * 1024  # a sign-in post far over its 8 KiB cap
failures: list[str] = []  # requests that went unanswered: the run fails
healthz: dict[str, int] = {}


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]


def server_sockets(port: int) -> list[tuple[int, int]]:
    """(bytes received and not yet read, bytes not yet sent) of each established
    connection to the server on this port, as `ss` sees them."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(int(line.split()[0]), int(line.split()[1])) for line in out.splitlines()]


def established(port: int) -> int:
    return len(server_sockets(port))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit_of(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return int(re.search(r"Max open files\s+(\d+)", limits)[1])  # type: ignore[index]


def healthz_ms(base: str) -> float:
    """How long /healthz takes to answer (a 503 past the connection cap is an answer; none
    within PATIENCE is a failure). Its statuses are tallied in `healthz`."""
    started = time.monotonic()
    try:
        status = str(httpx.get(f"{base}/healthz", timeout=PATIENCE).status_code)
    except httpx.HTTPError as error:
        failures.append(f"/healthz: {error!r}")
        status = "unanswered"
    healthz[status] = healthz.get(status, 0) + 1
    return (time.monotonic() - started) * 1000


def post_form(port: int, size: int, source: str = "127.0.0.1") -> str:
    """POST /ui/login with a `size`-byte form, sent whole unless the server answers first;
    the answer's status line, or what ended the exchange."""
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    sock.settimeout(PATIENCE)
    head = b"POST /ui/login HTTP/1.1\r\nHost: x\r\n"
    head += b"Content-Type: application/x-www-form-urlencoded\r\n"
    head += f"Content-Length: {size}\r\n\r\ntoken=".encode()
    chunk = b"a" * (1024 * 1024)
    try:
        sock.sendall(head)
        for sent in range(6, size, len(chunk)):
            sock.sendall(chunk[: size - sent])
    except OSError:
        pass  # the server answered and closed before the whole body was sent
    try:
        return sock.recv(64).split(b"\r\n")[0].decode() or "closed"
    except OSError as error:
        return type(error).__name__
    finally:
        sock.close()


def watch(pid: int, base: str, running: threading.Event) -> tuple[float, float]:
    """Peak RSS (MiB, sampled every 10 ms) and slowest /healthz (ms) while `running` is
    set."""
    peak_rss = [rss_mib(pid)]

    def sample_rss() -> None:
        while running.is_set():
            peak_rss[0] = max(peak_rss[0], rss_mib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    slowest = 0.0
    while running.is_set():
        slowest = max(slowest, healthz_ms(base))
        time.sleep(0.02)
    sampler.join(PATIENCE)
    return peak_rss[0], slowest


def big_sign_ins(port: int, pid: int, base: str, *, at_once: int) -> str:
    """`at_once` 100 MB sign-in posts from one address, all at the same time."""
    before = rss_mib(pid)
    statuses: list[str] = []
    posts = [
        threading.Thread(target=lambda: statuses.append(post_form(port, FORM, "127.0.0.5")))
        for _ in range(at_once)
    ]
    running = threading.Event()
    running.set()
    figures: list[tuple[float, float]] = []
    watcher = threading.Thread(target=lambda: figures.append(watch(pid, base, running)))
    watcher.start()
    for post in posts:
        post.start()
    for post in posts:
        post.join(PATIENCE)
    running.clear()
    watcher.join(PATIENCE)
    peak, slowest = figures[0]
    return (
        f"{at_once} x 100 MB sign-in post(s) from one address: {sorted(statuses)}, RSS"
        f" {before:.0f} -> peak {peak:.0f} MiB (+{peak - before:.0f}), slowest /healthz"
        f" {slowest:.0f} ms"
    )


def sign_ins_left_mid_body(port: int, log: Path) -> str:
    """300 clients (60 addresses, so that the throttle does not answer them first) each
    leave a sign-in post after 9 of its 4,000 bytes."""
    before = log.stat().st_size
    logged = log.read_text().count('"path": "/ui/login"')
    for n in range(300):
        sock = socket.create_connection(
            ("127.0.0.1", port), source_address=(f"127.0.1.{n % 60 + 1}", 0)
        )
        sock.sendall(b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\ntoken=abc")
        sock.close()
    deadline = time.monotonic() + PATIENCE  # each is logged once the server sees it gone
    while log.read_text().count('"path": "/ui/login"') < logged + 300:
        if time.monotonic() > deadline:
            failures.append("300 sign-ins left mid-body: not all logged")
            break
        time.sleep(0.1)
    text = log.read_text()[before:]
    errors = text.count('"level": "ERROR"')
    statuses = sorted(set(re.findall(r'"status": (\d+)', text)))
    return (
        f"300 clients leaving a sign-in mid-body: {log.stat().st_size - before:,} log bytes,"
        f" {text.count('Traceback')} tracebacks, {errors} ERROR lines, statuses {statuses}"
    )


def non_reader(port: int) -> socket.socket | None:
    """A client with a 4 KiB receive window that pipelines four requests for a 1.5 MB static
    asset and never reads; None if the server would not take the connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /docs/assets/swagger-ui-bundle.js.map HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    except OSError:
        sock.close()
        return None
    return sock


def deliveries(base: str, running: threading.Event, answers: dict[str, int]) -> None:
    """A sender delivering one event after another, each on a new connection, until
    `running` is cleared: a 503 is retried (CMR waits 30 s; here 0.1 s), no answer is a
    failure."""
    while running.is_set():
        body = orjson.dumps(traffic.mailbox_created())
        status = 503
        while status == 503:
            ts = str(int(time.time()))
            signature = hmac.new(SIGNING_KEY.encode(), f"{ts}.".encode() + body, hashlib.sha256)
            headers = {"cmr-x-signature": signature.hexdigest(), "cmr-x-timestamp": ts}
            try:
                status = httpx.post(
                    f"{base}/webhooks/cmr",
                    params={"token": TOKEN},
                    content=body,
                    headers=headers,
                    timeout=60,  # how long CMR waits for an answer
                ).status_code
            except httpx.HTTPError as error:
                failures.append(f"a delivery: {error!r}")
                answers["unanswered"] += 1
                break
            answers[str(status)] = answers.get(str(status), 0) + 1
            if status == 503:
                time.sleep(0.1)


def non_readers(port: int, pid: int, base: str, *, count: int) -> str:
    """`count` clients that never read their answers, while a sender keeps delivering."""
    fds_before, peak_fds = open_fds(pid), [0]
    healthz.clear()
    answers = {"unanswered": 0}
    running = threading.Event()
    running.set()

    def sample_fds() -> None:
        while running.is_set():
            peak_fds[0] = max(peak_fds[0], open_fds(pid))
            time.sleep(0.01)

    helpers = [
        threading.Thread(target=deliveries, args=(base, running, answers)),
        threading.Thread(target=sample_fds),
    ]
    for helper in helpers:
        helper.start()
    started = time.monotonic()
    sockets = [sock for _ in range(count) if (sock := non_reader(port))]
    open_at_end = established(port)
    while open_at_end > 2 and time.monotonic() - started < PATIENCE:  # 2: the sender's
        healthz_ms(base)
        time.sleep(0.2)
        open_at_end = established(port)
    cleared = time.monotonic() - started
    time.sleep(1)  # a second of deliveries after the attack
    running.clear()
    for helper in helpers:
        helper.join(PATIENCE)
    for sock in sockets:
        sock.close()
    return (
        f"{count} non-reading clients ({len(sockets)} connected), worker's fd limit"
        f" {fd_limit_of(pid)}: its fds {fds_before} -> peak {peak_fds[0]}; {open_at_end}"
        f" still open {cleared:.0f} s in; deliveries answered meanwhile {answers}, /healthz"
        f" {healthz}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flood(port: int, pid: int) -> str:
    """40 sockets post ?token=wrong, each claiming and sending 5 MiB."""
    before = rss_mib(pid)
    peak = before

    def send_all() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(PATIENCE)
        head = b"POST /webhooks/cmr?token=wrong HTTP/1.1\r\nHost: x\r\n"
        head += f"Content-Length: {BODY}\r\n\r\n".encode()
        try:
            sock.sendall(head + b"x" * BODY)
            sock.recv(1)
        except OSError:
            pass
        finally:
            sockets.append(sock)

    sockets: list[socket.socket] = []
    threads = [threading.Thread(target=send_all) for _ in range(40)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while any(t.is_alive() for t in threads) and time.monotonic() - started < 15:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)
    still_open = established(port)
    for sock in sockets:
        sock.close()
    for thread in threads:
        thread.join(PATIENCE)
    return (
        f"40 x 5 MiB, wrong token: RSS {before:.0f} -> peak {peak:.0f} MiB (+{peak - before:.0f}),"
        f" {still_open} connections open {min(15, time.monotonic() - started):.1f} s in"
    )


def slow_headers(port: int) -> str:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /webhooks/cmr HTTP/1.1\r\n")
    started = time.monotonic()
    sock.settimeout(1)
    while time.monotonic() - started < PATIENCE:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(1) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    else:
        return f"a header line a second: still open after {PATIENCE} s"
    return f"a header line a second: dropped after {time.monotonic() - started:.1f} s"


def disconnects(port: int, log: Path) -> str:
    before = log.stat().st_size
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            f"POST /webhooks/cmr?token={TOKEN} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + b'{"event":'
        )
        sock.close()
    time.sleep(3)  # a figure, not a check: what was written in the 3 s after
    grown = log.stat().st_size - before
    tracebacks = log.read_text()[before:].count("Traceback")
    return f"300 clients leaving mid-body: {grown:,} log bytes, {tracebacks} tracebacks"


async def stored_bytes(url: str, *, vacuum: bool = False) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        if vacuum:  # what autovacuum does in its own time: dropped bodies' space reusable
            await conn.execute("VACUUM rejected_deliveries")
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        kept = await conn.fetchval(
            "SELECT coalesce(sum(octet_length(body_encrypted)), 0) FROM rejected_deliveries"
        )
    finally:
        await conn.close()
    return size, kept


def rejected(base: str, url: str, *, vacuum: bool = False) -> str:
    import asyncio

    size_before, _ = asyncio.run(stored_bytes(url, vacuum=vacuum))
    started = time.monotonic()
    for _ in range(20):
        payload = traffic.mailbox_created()
        del payload["data"]["mailboxDetails"]["mailboxId"]  # a 422
        payload["data"]["note"] = "x" * (BODY - 2000)
        body = orjson.dumps(payload)
        ts = str(int(time.time()))
        signature = hmac.new(SIGNING_KEY.encode(), f"{ts}.".encode() + body, hashlib.sha256)
        headers = {"cmr-x-signature": signature.hexdigest(), "cmr-x-timestamp": ts}
        status = httpx.post(
            f"{base}/webhooks/cmr", params={"token": TOKEN}, content=body, headers=headers
        ).status_code
        assert status == 422, status
    size_after, kept = asyncio.run(stored_bytes(url))
    return (
        f"20 rejected 5 MB bodies{' more, after a VACUUM' if vacuum else ''} in"
        f" {time.monotonic() - started:.1f} s: database"
        f" +{(size_after - size_before) / 1e6:.0f} MB, rejected bodies kept {kept / 1e6:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that serves")
    parser.add_argument("--rejected-max-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--fd-limit", type=int, default=1024, help="the worker's ulimit -n")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds 1,000 sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import asyncio

    # bench/run.py's scratch names: this run's own, found by its --drop-leftovers
    name = f"cmw_bench_attack_{os.getpid()}_{secrets.token_hex(3)}"
    admin = SERVER.rsplit("/", 1)[0]
    asyncio.run(_admin(SERVER, f"CREATE DATABASE {name}"))
    url, port = f"{admin}/{name}", free_port()
    home = Path(tempfile.mkdtemp(prefix="cmw-attack-"))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")} | {
        "DATABASE_URL": url,
        "FERNET_KEYS": generate_key(),
        "WEBHOOK_TOKENS": TOKEN,
        "CMR_SIGNING_KEY": SIGNING_KEY,
        "OPS_API_TOKENS": OPS,
        "LOG_LEVEL": "INFO",
        "SPOOL_DIR": str(home / "spool"),
        "REJECTED_MAX_BYTES": str(args.rejected_max_bytes),
    }
    log = home / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [args.python, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            cwd=home,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit)
            ),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        print(flood(port, proc.pid), flush=True)
        print(slow_headers(port), flush=True)
        print(disconnects(port, log), flush=True)
        print(big_sign_ins(port, proc.pid, base, at_once=1), flush=True)
        print(big_sign_ins(port, proc.pid, base, at_once=3), flush=True)
        print(sign_ins_left_mid_body(port, log), flush=True)
        print(non_readers(port, proc.pid, base, count=1000), flush=True)
        print(rejected(base, url), flush=True)
        print(rejected(base, url, vacuum=True), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
        asyncio.run(_admin(SERVER, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    if failures:
        print(f"FAILED: {len(failures)} request(s) unanswered, e.g. {failures[:3]}")
        sys.exit(1)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
