"""The service on the open internet, attacked as bench/attack.py attacks it: a real `serve`
process (production mode, one worker) and raw sockets, no ASGI shortcut.

Every wait here is for a condition (an answer, a closed socket, a log line), bounded
generously; nothing depends on how fast this machine is.
"""

import asyncio
import hashlib
import hmac
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from app.simulation import traffic
from bench.attack import established, rss_mib
from tests.conftest import (
    CREDENTIALS_TOKEN,
    OPS_TOKEN,
    SIGNING_KEY,
    WEBHOOK_TOKEN,
    asyncpg_dsn,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.reliability.test_secrets import pg_dump
from tests.servers import CLI, PATIENCE, Server, free_port, read_until_closed, wait_for

TIMEOUT = 2  # REQUEST_TIMEOUT_SECONDS of the server under attack
METRICS_TOKEN = "metrics-token-0123456789abcdef"
REJECTED_MAX = 3_000_000


def env_for(database_url: str, **extra: str) -> dict[str, str]:
    return server_env(database_url) | {
        "CREDENTIALS_API_TOKENS": CREDENTIALS_TOKEN,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        "REQUEST_TIMEOUT_SECONDS": str(TIMEOUT),
        "REJECTED_MAX_BYTES": str(REJECTED_MAX),
        "METRICS_TOKEN": METRICS_TOKEN,
        **extra,
    }


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("edge")
    serve = Server(env_for(database, SPOOL_DIR=str(home / "spool")), home)
    serve.start()
    yield serve
    serve.stop()


def sign(body: bytes, *, with_timestamp: bool = True, at: int | None = None) -> dict[str, str]:
    """The sender's headers, the HMAC computed here, not by the service's own code."""
    ts = str(int(time.time()) if at is None else at)
    message = f"{ts}.".encode() + body if with_timestamp else body
    digest = hmac.new(SIGNING_KEY.encode(), message, hashlib.sha256).hexdigest()
    return {"cmr-x-signature": digest, "cmr-x-timestamp": ts, "content-type": "application/json"}


def post(server: Server, body: bytes, headers: dict[str, str], token: str = WEBHOOK_TOKEN) -> Any:
    return httpx.post(
        f"{server.url}/webhooks/cmr", params={"token": token}, content=body, headers=headers
    )


def connect(server: Server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
    sock.settimeout(PATIENCE)
    return sock


# --- unauthenticated work is bounded ---------------------------------------------------


def test_a_wrong_token_is_answered_401_before_the_body_and_the_connection_closed(server):
    flood = []
    pid = server.proc.pid if server.proc else 0
    rss_before = rss_mib(pid)
    for _ in range(40):
        sock = connect(server)
        sock.sendall(
            b"POST /webhooks/cmr?token=wrong HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5242880\r\n\r\n"
            + b"{"
            * 65536  # the first 64 KiB of the 5 MiB it claims to send
        )
        flood.append(sock)
    answers = [read_until_closed(sock) for sock in flood]
    assert all(answer.startswith(b"HTTP/1.1 401") for answer in answers)
    assert all(b'{"error":"unauthorized"}' in answer for answer in answers)
    wait_for(lambda: established(server.port) == 0, "the 40 connections closed")
    grown = rss_mib(pid) - rss_before
    assert grown < 20, f"RSS grew by {grown:.0f} MiB under 40 unauthenticated 5 MiB posts"
    for sock in flood:
        sock.close()


def test_300_clients_leaving_mid_body_write_one_info_line_each(server):
    before = len(server.output().splitlines())
    for _ in range(300):
        sock = connect(server)
        sock.sendall(
            f"POST /webhooks/cmr?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + b'{"event":'
        )
        sock.close()
    wait_for(lambda: server.output().count('"status": 499') >= 300, "300 disconnects logged")
    new = server.output().splitlines()[before:]
    assert "Traceback" not in "\n".join(new)
    assert all('"level": "INFO"' in line for line in new), [x for x in new if "INFO" not in x]
    assert len(new) <= 300 + 5  # the 300 lines, and nothing else said about them


# --- signatures: the replay window cannot be skipped ------------------------------------


def test_a_body_only_signature_needs_a_fresh_timestamp(server):
    body = orjson.dumps(traffic.mailbox_order_failed())
    signed = sign(body, with_timestamp=False)
    no_timestamp = {k: v for k, v in signed.items() if k != "cmr-x-timestamp"}
    assert post(server, body, no_timestamp).status_code == 401
    stale = sign(body, with_timestamp=False, at=int(time.time()) - 3600)
    assert post(server, body, stale).status_code == 401
    assert post(server, body, signed).status_code == 200


def test_a_captured_timestamped_signature_does_not_sign_the_prefixed_body(server):
    body = orjson.dumps(traffic.mailbox_order_failed())
    captured = sign(body)
    forged_body = captured["cmr-x-timestamp"].encode() + b"." + body
    forged = {**captured, "cmr-x-timestamp": str(int(time.time()))}
    assert post(server, forged_body, forged).status_code == 401


def test_a_timestamp_that_is_not_a_number_is_stale(server):
    body = orjson.dumps(traffic.mailbox_order_failed())
    for ts in ("nan", "inf", "1e9999"):
        headers = sign(body, with_timestamp=False) | {"cmr-x-timestamp": ts}
        assert post(server, body, headers).status_code == 401, ts


# --- credentials only over HTTPS ----------------------------------------------------------


@pytest.fixture(scope="module")
def mailbox(server: Server) -> str:
    payload = traffic.mailbox_created()
    body = orjson.dumps(payload)
    assert post(server, body, sign(body)).status_code == 200
    return str(payload["data"]["mailboxDetails"]["mailboxId"])


def credentials(server: Server, mailbox: str, **headers: str) -> httpx.Response:
    headers["authorization"] = f"Bearer {CREDENTIALS_TOKEN}"
    return httpx.get(f"{server.url}/api/v1/mailboxes/{mailbox}/credentials", headers=headers)


def test_an_untrusted_client_cannot_claim_https(server, mailbox, database):
    """Only FORWARDED_ALLOW_IPS may say the scheme; here the server trusts nobody."""
    # 127.0.0.2 is loopback too, but not the trusted 127.0.0.1: its header means nothing
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as http:
        response = http.get(
            f"{server.url}/api/v1/mailboxes/{mailbox}/credentials",
            headers={
                "authorization": f"Bearer {CREDENTIALS_TOKEN}",
                "x-forwarded-proto": "https",
            },
        )
    assert response.status_code == 403


# --- dashboard sessions ------------------------------------------------------------------


def sign_in(server: Server, token: str = OPS_TOKEN, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/ui/login", data={"token": token}, headers=headers)


def test_sign_out_ends_the_session_even_for_a_saved_cookie(server):
    cookie = sign_in(server).cookies["cmw_session"]
    page = httpx.get(f"{server.url}/ui", cookies={"cmw_session": cookie})
    assert page.status_code == 200
    out = httpx.post(f"{server.url}/ui/logout", cookies={"cmw_session": cookie})
    assert out.status_code == 303
    again = httpx.get(f"{server.url}/ui", cookies={"cmw_session": cookie})
    assert again.status_code == 303 and again.headers["location"] == "/ui/login"


async def test_an_idle_session_ends(server, database):
    cookie = sign_in(server).cookies["cmw_session"]
    conn = await asyncpg.connect(asyncpg_dsn(database))
    try:  # 31 idle minutes pass
        await conn.execute("UPDATE ui_sessions SET last_seen_at = now() - interval '31 minutes'")
    finally:
        await conn.close()
    page = httpx.get(f"{server.url}/ui", cookies={"cmw_session": cookie})
    assert page.status_code == 303


def test_cross_site_sign_in_and_sign_out_are_refused(server):
    forged = sign_in(server, origin="https://evil.example")
    assert forged.status_code == 403 and "cmw_session" not in forged.cookies
    cookie = sign_in(server).cookies["cmw_session"]
    out = httpx.post(
        f"{server.url}/ui/logout",
        cookies={"cmw_session": cookie},
        headers={"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
    )
    assert out.status_code == 403
    assert httpx.get(f"{server.url}/ui", cookies={"cmw_session": cookie}).status_code == 200


def test_guessing_tokens_is_throttled_per_client(server):
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as http:
        answers = [
            http.post(f"{server.url}/ui/login", data={"token": f"guess-{i:012d}"}) for i in range(8)
        ]
    codes = [answer.status_code for answer in answers]
    # back-off after each failure (1 s, 2 s, 4 s...): most guesses are not even weighed
    assert codes[0] == 401 and 429 in codes and codes.count(401) <= 3
    waits = [int(a.headers["retry-after"]) for a in answers if a.status_code == 429]
    assert all(1 <= wait <= 30 for wait in waits)
    assert sign_in(server).status_code == 303  # another client is not held up


# --- reads -------------------------------------------------------------------------------


async def test_a_read_whose_client_left_is_cancelled_in_postgresql(server, database):
    """Not left to run until its statement timeout: PostgreSQL is told at once, and the
    connection goes back to the read pool."""
    db = await asyncpg.connect(asyncpg_dsn(database))
    observer = await asyncpg.connect(asyncpg_dsn(database))
    # the search's statement (it alone reads the API's columns): the search indexer, which
    # runs each second in the server, may wait on the lock too (its BRIN summary), and stays
    # waiting until the lock goes (CI: "still not: ... cancelled", one run)
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'coldmail-webhooks' AND wait_event_type = 'Lock'"
        " AND query LIKE '%mailboxes.mailbox_id AS mailbox_id%'"
    )

    async def until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while not await condition():
            assert time.monotonic() < deadline, f"still not: {what}"
            await asyncio.sleep(0.05)

    def gone_lines() -> list[dict[str, Any]]:
        lines = [orjson.loads(x) for x in server.output().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("path") == "/api/v1/mailboxes" and x["status"] >= 499]

    async def left() -> bool:
        return bool(gone_lines())

    async def searching() -> bool:  # observed outside the locking transaction's snapshot
        return bool(await observer.fetchval(waiting) == 1)

    async def cancelled() -> bool:
        return bool(await observer.fetchval(waiting) == 0)

    try:
        await db.execute("BEGIN; LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")
        with connect(server) as sock:
            sock.sendall(
                b"GET /api/v1/mailboxes?q=okafor HTTP/1.1\r\nHost: edge\r\n"
                + f"Authorization: Bearer {OPS_TOKEN}\r\n\r\n".encode()
            )
            await until(searching, "the search waits in PostgreSQL")
        await until(cancelled, "the search is cancelled while the lock is still held")
        await until(left, "the access line")
        assert [line["status"] for line in gone_lines()] == [499]  # never a 503 of a timeout
        await db.execute("ROLLBACK")
    finally:
        await db.close()
        await observer.close()
    again = httpx.get(
        f"{server.url}/api/v1/mailboxes",
        params={"q": "okafor"},
        headers={"authorization": f"Bearer {OPS_TOKEN}"},
    )
    assert again.status_code == 200


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"OPS_API_TOKENS": "a"}, "OPS_API_TOKENS"),
        ({"CREDENTIALS_API_TOKENS": OPS_TOKEN}, "CREDENTIALS_API_TOKENS"),
        ({"WEBHOOK_TOKENS": OPS_TOKEN}, "OPS_API_TOKENS"),
        ({"CMR_SIGNATURE_FORMS": "body:hex,sha1"}, "CMR_SIGNATURE_FORMS"),
        ({"WEBHOOK_TOKENS": ""}, "WEBHOOK_TOKENS"),
        ({"CMR_SIGNING_KEY": CREDENTIALS_TOKEN}, "CMR_SIGNING_KEY"),
    ],
)
def test_weak_or_shared_tokens_stop_start_up_in_one_line(database, tmp_path, variables, named):
    env = env_for(database) | variables
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=PATIENCE,  # a service that starts anyway would serve for ever
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert OPS_TOKEN not in result.stderr


# --- what is stored -------------------------------------------------------------------


def test_rejected_bodies_stay_within_their_bound(server, database):
    padding = "x" * 900_000
    for _ in range(6):  # 422: a mailbox.created without its mailboxId
        payload = traffic.mailbox_created()
        del payload["data"]["mailboxDetails"]["mailboxId"]
        payload["data"]["note"] = padding
        body = orjson.dumps(payload)
        assert post(server, body, sign(body)).status_code == 422

    async def sizes() -> tuple[int, int, int]:
        conn = await asyncpg.connect(asyncpg_dsn(database))
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(body_encrypted) AS kept,"
                " coalesce(sum(octet_length(body_encrypted)), 0) AS bytes"
                " FROM rejected_deliveries WHERE errors::text LIKE '%mailboxId%'"
            )
        finally:
            await conn.close()
        return row["n"], row["kept"], row["bytes"]

    import asyncio

    count, kept, stored = asyncio.run(sizes())
    assert count == 6 and 0 < kept < 6 and stored <= REJECTED_MAX
    metrics = httpx.get(
        f"{server.url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
    ).text
    dropped = re.search(r"^cmr_rejected_bodies_dropped_total (\S+)", metrics, re.M)
    assert dropped and float(dropped[1]) >= 6 - kept
    listed = httpx.get(
        f"{server.url}/api/v1/rejected", headers={"authorization": f"Bearer {OPS_TOKEN}"}
    ).json()["items"]
    assert sum(1 for item in listed if item["reason"] == "invalid_payload") >= 6


def test_json_deeper_than_the_service_can_store_is_a_400(server):
    body = b'{"event":"mailbox.updated","eventId":"deep-1","data":'
    body += b'{"x":' * 300 + b"{}" + b"}" * 300 + b"}"  # too deep for orjson to write
    response = post(server, body, sign(body))
    assert response.status_code == 400 and response.json()["error"] == "invalid_json"
    shallow: dict[str, Any] = {"event": "dns-record.updated", "eventId": "deep-2", "data": {}}
    node: dict[str, Any] = shallow["data"]
    for _ in range(240):
        node["x"] = {}
        node = node["x"]
    body = orjson.dumps(shallow)
    assert post(server, body, sign(body)).json()["status"] == "ignored"


def test_an_unforeseen_credential_field_is_redacted_everywhere_it_is_shown(server):
    payload = traffic.mailbox_created()
    payload["data"]["mailboxDetails"]["pwd"] = "canary-pwd-4af1"
    payload["data"]["mailboxDetails"]["smtp"] = {"pass": "canary-smtp-77b2"}
    body = orjson.dumps(payload)
    assert post(server, body, sign(body)).status_code == 200
    ops = {"authorization": f"Bearer {OPS_TOKEN}"}
    found = httpx.get(
        f"{server.url}/api/v1/events", params={"eventId": payload["eventId"]}, headers=ops
    ).json()["items"][0]
    event = httpx.get(f"{server.url}/api/v1/events/{found['id']}", headers=ops)
    assert "canary" not in event.text
    shown = event.json()["payload"]["data"]["mailboxDetails"]
    assert shown["pwd"] == "[REDACTED]" and shown["smtp"] == "[REDACTED]"
    assert shown["appPassword"] == "[REDACTED]"
    assert shown["email"] == payload["data"]["mailboxDetails"]["email"]  # still readable
    cookie = sign_in(server).cookies["cmw_session"]
    page = httpx.get(f"{server.url}/ui/events/{found['id']}", cookies={"cmw_session": cookie})
    assert page.status_code == 200 and "canary" not in page.text


# --- no password oracle ------------------------------------------------------------------

GUESSES = ["letmein", "Summer2026!", "hunter2", "correct-horse-7", "password1"]


def test_no_unkeyed_hash_lets_a_reader_test_password_guesses(server, database, tmp_path):
    """An attack: an ops token reads a redacted event without eventId, puts each
    guess where the password was, hashes, and looks for the hash anywhere."""
    payload = traffic.mailbox_created()
    del payload["eventId"]
    details = payload["data"]["mailboxDetails"]
    for other in ("appPassword", "authenticatorSecret"):  # the password the one secret
        details.pop(other, None)
    details["password"] = "correct-horse-7"
    body = orjson.dumps(payload)
    answer = post(server, body, sign(body))
    assert answer.status_code == 200
    ops = {"authorization": f"Bearer {OPS_TOKEN}"}
    event_id = answer.json()["eventId"]
    found = httpx.get(
        f"{server.url}/api/v1/events", params={"eventId": event_id}, headers=ops
    ).json()["items"][0]
    redacted = httpx.get(f"{server.url}/api/v1/events/{found['id']}", headers=ops).json()
    candidates = set()
    for guess in GUESSES:
        envelope = orjson.loads(orjson.dumps(redacted["payload"]))
        envelope["data"]["mailboxDetails"]["password"] = guess
        for shape in (envelope, {k: v for k, v in envelope.items() if k != "eventId"}):
            canonical = orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)
            candidates.add(hashlib.sha256(canonical).hexdigest())
        candidates.add(hashlib.sha256(body.replace(b"correct-horse-7", guess.encode())).hexdigest())
    dump = pg_dump(database)
    seen = "\n".join([dump, server.output(), answer.text, str(redacted), str(found)])
    hexes = set(re.findall(r"[0-9a-f]{64}", seen))
    assert hexes, "the dump holds no 64-hex value at all: the search looked in the wrong place"
    assert not hexes & candidates, "a password guess was confirmed by a stored hash"


# --- docs and metrics ---------------------------------------------------------------------


def test_docs_load_nothing_from_another_host(server):
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(src.startswith("/") for src in sources), sources
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for src in sources:
        assert httpx.get(f"{server.url}{src}").status_code == 200, src


def test_metrics_need_their_token_when_one_is_set(server):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    wrong = httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = httpx.get(f"{server.url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert right.status_code == 200 and "cmr_webhook_deliveries_total" in right.text
