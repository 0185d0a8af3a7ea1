"""The edge review's attacks, measured: what an unauthenticated or hostile client costs a
real `serve` (production mode, one worker) on this machine.

    python bench/attack.py [--python PYTHON]

Starts `PYTHON -m app.cli serve` (default: this interpreter) on a scratch database of
BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres), runs each
attack, prints one line of figures per attack, and drops the database. --python lets the
same attacks run against another checkout's environment, for a before/after.
"""

import argparse
import hashlib
import hmac
import os
import re
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
    args = parser.parse_args()
    import asyncio

    name = f"cmw_attack_{os.getpid()}"
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
        print(rejected(base, url), flush=True)
        print(rejected(base, url, vacuum=True), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
        asyncio.run(_admin(SERVER, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
