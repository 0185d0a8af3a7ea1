"""The wire's bounds (app/receiving/edge.py) as a client meets them: the app under uvicorn
with GuardedHttp, as `serve` runs it, in this process (tests/servers.py, served_in_process)
and raw sockets. Each server gets short deadlines for what a test waits out and long ones
for what it must not; every wait is for a condition (an answer, a closed or reset socket,
another client's deadline passing first), bounded by PATIENCE.
"""

import logging
import re
import resource
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from app.receiving import edge
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    OPS_TOKEN,
    WEBHOOK_TOKEN,
    asyncpg_dsn,
    make_settings,
    sender_signature,
)
from tests.servers import (
    PATIENCE,
    login_head,
    read_until_closed,
    served_in_process,
    wait_for,
    worker_settings,
)

QUICK = 0.5  # REQUEST_TIMEOUT_SECONDS (and RESPONSE_) of a server whose deadline is awaited
TAKEN = 2.0  # RESPONSE_TIMEOUT_SECONDS where a client must take 1.5 MB in time
LONG = 600  # ... of one whose deadline no test may reach
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
LARGE = b"GET /docs/assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n"  # 1.5 MB
NO_DATABASE = "postgresql://127.0.0.1/unused"  # settings for code that reaches none


@contextmanager
def serving(database_url: str, **overrides: Any) -> Iterator[int]:
    settings = {"request_timeout_seconds": LONG, "response_timeout_seconds": LONG} | overrides
    with served_in_process(make_settings(database_url, **settings)) as port:
        yield port


@pytest.fixture
def serve(database: str, caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., Any]]:
    """`serving` on the module's database; afterwards, the server has said nothing went
    wrong (no error, no traceback), whatever the test did to it."""
    caplog.set_level(logging.INFO)
    yield lambda **overrides: serving(database, **overrides)
    said = caplog.get_records("call")  # caplog.records holds only the teardown's here
    wrong = [r.getMessage() for r in said if r.exc_info or r.levelno >= logging.ERROR]
    assert wrong == []


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(PATIENCE)
    return sock


def receive(sock: socket.socket, data: bytes) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, f"closed after {data[:200]!r}"
    return data + chunk


def answer(sock: socket.socket) -> bytes:
    """One whole answer on a kept-alive connection (its head and content-length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data = receive(sock, data)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body = receive(sock, body)
    return head + b"\r\n\r\n" + body


def served(port: int) -> bool:
    """Another client is answered: everything sent before it has been read by the server."""
    with connect(port) as sock:
        sock.sendall(HEALTH)
        return sock.recv(12) == b"HTTP/1.1 200"


def lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def access_statuses(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [r.status for r in caplog.records if r.name == "coldmail.access"]  # type: ignore[attr-defined]


def test_the_server_as_serve_runs_it_is_ready_with_its_database_and_spool(serve):
    """The bounds pass the app's start-up through: under uvicorn it opens its database
    and spool and answers /readyz 200 (not only the routes that need neither)."""
    with serve() as port, connect(port) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    ready = orjson.loads(body)
    assert ready["database"] == "up" and ready["spool"]["depth"] == 0


# --- a request must arrive within REQUEST_TIMEOUT_SECONDS --------------------------------


@pytest.mark.parametrize(
    "sent",
    [b"", b"POS", b"POST /webhooks/cmr HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"],
    ids=["nothing", "half a request line", "a request line", "headers never ended"],
)
def test_a_request_that_does_not_arrive_in_time_is_dropped_and_said_once(serve, caplog, sent):
    with serve(request_timeout_seconds=QUICK) as port, connect(port) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""
        said = lines(caplog, "connection dropped")
        assert said == [f"connection dropped: no complete request within {QUICK}s"]
        assert access_statuses(caplog) == []  # the app never had the request


def test_a_client_sending_one_header_line_at_a_time_is_dropped(serve):
    with serve(request_timeout_seconds=QUICK) as port, connect(port) as sock:
        sock.sendall(b"POST /webhooks/cmr HTTP/1.1\r\n")
        sock.settimeout(QUICK / 4)
        closed = False
        for _ in range(int(PATIENCE / QUICK * 4)):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed, "a header line at a time kept the connection open"


def test_a_body_sent_too_slowly_is_dropped_and_its_request_logged_499(serve, caplog):
    with serve(request_timeout_seconds=QUICK) as port, connect(port) as sock:
        sock.sendall(
            f"POST /webhooks/cmr?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n{"
        )
        assert read_until_closed(sock) == b""
        wait_for(lambda: access_statuses(caplog), "the dropped request's access line")
    assert access_statuses(caplog) == [499]
    assert lines(caplog, "connection dropped") == []  # the access line is the one line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_each_request_of_a_kept_connection_gets_its_own_deadline(serve):
    """A connection that asked in time is not dropped at its first request's deadline while
    it waits, kept alive, for its next: it is dropped when that next one is late."""
    with serve(request_timeout_seconds=QUICK) as port:
        with connect(port) as kept:
            kept.sendall(HEALTH)
            assert answer(kept).startswith(b"HTTP/1.1 200")
            with connect(port) as later:  # connected after `kept`: its deadline falls later
                assert read_until_closed(later) == b""
            kept.sendall(HEALTH)  # `kept`'s first deadline has passed: still served
            assert answer(kept).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the next one late is dropped
            assert read_until_closed(kept) == b""


# --- request headers stay under 64 KiB -------------------------------------------------------


def head_of(size: int, start: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ") -> bytes:
    """A request line and headers `size` bytes long, unfinished (no blank line)."""
    return start + b"a" * (size - len(start) - 2) + b"\r\n"


def test_request_headers_past_64_kib_are_refused_400_and_closed(serve):
    with serve(request_timeout_seconds=QUICK) as port:
        with connect(port) as first:  # in two parts, read apart
            first.sendall(head_of(40 * 1024))
            assert served(port)
            first.sendall(head_of(24 * 1024 + 1, b"X-More: "))
            replies = [read_until_closed(first)]
        with connect(port) as kept:  # the second request of a connection
            kept.sendall(HEALTH)
            assert answer(kept).startswith(b"HTTP/1.1 200")
            kept.sendall(head_of(64 * 1024 + 1))
            replies.append(read_until_closed(kept))
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 400") and reply.endswith(b"Request headers too large.")
        assert b"connection: close" in reply.lower()


def test_request_headers_of_64_kib_are_waited_for_and_served(serve):
    with serve(request_timeout_seconds=QUICK) as port:
        with connect(port) as first:  # the whole 64 KiB, unfinished: waited for
            first.sendall(head_of(64 * 1024))
            assert read_until_closed(first) == b""  # dropped at the deadline, not refused
        with connect(port) as kept:  # and so on a kept connection
            kept.sendall(HEALTH)
            assert answer(kept).startswith(b"HTTP/1.1 200")
            kept.sendall(head_of(64 * 1024))
            assert read_until_closed(kept) == b""
        with connect(port) as sock:  # 60 KiB of headers twice on one connection
            for _ in range(2):
                sock.sendall(head_of(60 * 1024) + b"\r\n")
                assert answer(sock).startswith(b"HTTP/1.1 200")


def test_a_body_past_64_kib_is_not_counted_as_headers(serve):
    payload = traffic.mailbox_created()
    payload["data"]["note"] = "x" * 1_000_000
    body = orjson.dumps(payload)
    with serve() as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        sent = http.post(
            "/webhooks/cmr", params={"token": WEBHOOK_TOKEN}, content=body,
            headers=sender_signature(body) | {"content-type": "application/json"},
        )  # fmt: skip
    assert sent.status_code == 200, sent.text


# --- bodies: no more than a route needs ------------------------------------------------


def refused_413(reply: bytes) -> bool:
    return (
        reply.startswith(b"HTTP/1.1 413")
        and reply.endswith(b'{"error":"payload_too_large"}')
        and b"connection: close" in reply.lower()
    )


@pytest.mark.parametrize("length", [edge.FORM_MAX_BYTES, edge.FORM_MAX_BYTES + 1])
def test_a_sign_in_form_past_8_kib_is_refused_413_unread(serve, length):
    with serve(request_timeout_seconds=QUICK) as port, connect(port) as sock:
        sock.sendall(login_head(length))  # and no body yet
        if length > 8 * 1024:  # answered before a byte of it, and closed
            assert refused_413(read_until_closed(sock))
        else:
            sock.sendall(b"token=" + b"a" * (length - 6))
            assert answer(sock).startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("size", [8 * 1024, 8 * 1024 + 1])
def test_a_streamed_sign_in_form_is_stopped_as_it_passes_8_kib(serve, size):
    chunks = [b"token=" + b"a" * 4090, b"a" * (size - 4096)]
    with serve() as port, connect(port) as sock:
        sock.sendall(login_head(None))
        for chunk in chunks:  # each read by the app before the next is sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert served(port)
        sock.sendall(b"0\r\n\r\n")
        if size > 8 * 1024:
            assert refused_413(read_until_closed(sock))
        else:
            assert answer(sock).startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("extra", [0, 1])
def test_a_webhook_body_is_capped_at_max_body_bytes(serve, extra):
    limit = 2048
    body = b'{"event":"x","pad":"' + b"a" * (limit + extra - 22) + b'"}'
    request = (
        b"POST /webhooks/cmr?token=wrong HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with serve(max_body_bytes=limit) as port, connect(port) as sock:
        sock.sendall(request + body)
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 413" if extra else b"HTTP/1.1 401"), reply[:200]


@pytest.mark.parametrize(
    ("sent", "source"),
    [
        (b"token=abc", b""),
        (b"", b""),  # left before the body's first byte
        (b"token=abc", b"X-Forwarded-Proto: https\r\n"),  # through a TLS proxy
    ],
    ids=["mid-body", "before the body", "over https"],
)
def test_a_client_leaving_mid_body_is_one_499_access_line(serve, caplog, sent, source):
    with serve() as port:
        with connect(port) as sock:
            sock.sendall(login_head(4000, source) + sent)
        wait_for(lambda: access_statuses(caplog), "the access line")
        assert served(port)  # and the server serves on
    assert access_statuses(caplog)[:1] == [499]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- answers must be taken within RESPONSE_TIMEOUT_SECONDS --------------------------------


def windowed(port: int, window: int) -> socket.socket:
    """A client whose kernel takes at most `window` bytes it has not read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(PATIENCE)
    return sock


def test_a_client_that_never_reads_its_answers_is_aborted(serve, caplog):
    def dropped(count: int) -> None:
        wait_for(lambda: len(lines(caplog, "answer not taken")) == count, f"{count} dropped")

    with serve(response_timeout_seconds=TAKEN) as port:
        with windowed(port, 4096) as sock:  # four asked at once, never read
            sock.sendall(LARGE * 4)
            dropped(1)
            assert len(read_until_closed(sock)) < 1_500_000  # the answer's rest thrown away
        assert lines(caplog, "answer not taken") == [
            f"connection dropped: answer not taken within {TAKEN}s"
        ]
        with windowed(port, 65536) as reader, windowed(port, 65536) as stops:
            reader.sendall(LARGE)  # one that reads takes the whole answer
            assert len(answer(reader)) > 1_500_000
            stops.sendall(LARGE)  # so does this one, and then it stops reading
            assert len(answer(stops)) > 1_500_000
            stops.sendall(LARGE)
            dropped(2)
            reader.sendall(HEALTH)  # the reader's deadline has passed: it is served on
            assert answer(reader).startswith(b"HTTP/1.1 200")


def test_a_client_that_took_large_answers_and_then_stops_reading_is_aborted(serve, caplog):
    """Each answer gets its own deadline, also after an answer that left the server only
    once the client read it (its deadline then still set when the next request began)."""
    with serve(response_timeout_seconds=TAKEN) as port:
        with windowed(port, 16384) as sock:  # a slow reader: many answers end still queued
            for _ in range(5):
                sock.sendall(LARGE)
                assert len(answer(sock)) > 1_500_000
            sock.sendall(LARGE)  # and this one it never reads
            wait_for(lambda: lines(caplog, "answer not taken") != [], "dropped")
            assert len(read_until_closed(sock)) < 1_500_000
        assert lines(caplog, "answer not taken") == [
            f"connection dropped: answer not taken within {TAKEN}s"
        ]


async def test_an_answer_not_ready_within_the_response_timeout_is_aborted(serve, caplog, database):
    """A search stuck behind a lock: the client is not kept waiting past the deadline."""
    locker = await asyncpg.connect(asyncpg_dsn(database))
    try:
        await locker.execute("BEGIN; LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")
        with serve(response_timeout_seconds=QUICK) as port, connect(port) as sock:
            sock.sendall(
                b"GET /api/v1/mailboxes?q=okafor HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {OPS_TOKEN}\r\n\r\n".encode()
            )
            assert read_until_closed(sock) == b""
            assert lines(caplog, "answer not taken") == [
                f"connection dropped: answer not taken within {QUICK}s"
            ]
            await locker.execute("ROLLBACK")
            assert served(port)
    finally:
        await locker.close()


def test_each_connection_holds_at_most_256_kib_of_unsent_answer_in_the_kernel(serve):
    """SEND_BUFFER_BYTES, as `ss -m` shows it (tb, which Linux doubles), not the megabytes
    Linux would grow it to."""
    with serve() as port, connect(port) as sock:
        sock.sendall(HEALTH)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        shown = subprocess.run(
            ["ss", "-Htnm", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    assert re.findall(r"tb(\d+)", shown) == [str(2 * edge.SEND_BUFFER_BYTES)]


# --- pipelining ends the connection after the first answer -------------------------------


def test_pipelined_requests_get_one_answer_and_the_connection_ends(serve):
    with serve() as port:
        with connect(port) as sock:
            sock.sendall(HEALTH * 3)
            reply = read_until_closed(sock)
        assert reply.count(b"HTTP/1.1 200") == 1 and b"connection: close" in reply.lower()
        with connect(port) as sock:  # one at a time, the connection is kept
            for _ in range(3):
                sock.sendall(HEALTH)
                reply = answer(sock)
                assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" not in reply


# --- a worker holds at most connection_cap() connections ---------------------------------


def test_connections_past_the_cap_are_answered_503_and_logged_when_it_starts_and_ends(
    serve, caplog
):
    cap = 3
    refusals: list[int] = []

    def held(port: int) -> socket.socket:
        sock = connect(port)
        sock.sendall(HEALTH)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        return sock

    def room(port: int) -> bool:
        """A connection is served, not refused (once the server has seen one close)."""
        with connect(port) as sock:
            sock.sendall(HEALTH)
            reply = sock.recv(65536)
            if reply == edge.UNAVAILABLE[: len(reply)]:
                refusals[-1] += 1
                return False
            return reply.startswith(b"HTTP/1.1 200")

    with serve(max_connections=cap) as port:
        holders = [held(port) for _ in range(cap)]  # each keeps its connection open
        for times in (5, 1):
            refusals.append(times)
            for _ in range(times):
                with connect(port) as refused:
                    assert read_until_closed(refused) == edge.UNAVAILABLE
            holders.pop().close()
            wait_for(lambda: room(port), "room again")
            assert room(port)  # and the next, without a word
            holders.append(held(port))
        for sock in holders:
            sock.close()
    assert b"retry-after: " in edge.UNAVAILABLE
    assert edge.UNAVAILABLE.endswith(b'{"error":"unavailable"}')
    began = f"connection cap reached ({cap} open): refusing connections with 503"
    assert lines(caplog, "cap") == [
        began,
        f"connections under the cap again, {refusals[0]} refused",
        began,
        f"connections under the cap again, {refusals[1]} refused",
    ]


@pytest.mark.parametrize(
    ("wanted", "pool", "cap"),
    [(1000, 20, 110), (100, 20, 100), (110, 20, 110), (111, 20, 110), (1000, 200, 20)],
)
def test_the_cap_is_lowered_to_what_the_file_limit_leaves(caplog, wanted, pool, cap):
    """(400 - FD_RESERVE - the pool) // 2 descriptors' worth of connections, each may hold
    two (its socket and a file it is sent): 110 for a pool of 20 under `ulimit -n 400`."""
    settings = make_settings(NO_DATABASE, max_connections=wanted, db_pool_size=pool)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))
    try:
        with worker_settings(settings):
            assert edge.connection_cap() == cap
            edge.say_if_capped()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    said = [
        f"MAX_CONNECTIONS={wanted} lowered to {cap} per worker: the file limit (ulimit -n 400) "
        "leaves no more"
    ]
    assert lines(caplog, "MAX_CONNECTIONS") == (said if cap < wanted else [])


def test_a_file_limit_that_leaves_no_room_still_lets_one_connection_in():
    settings = make_settings(NO_DATABASE, max_connections=1000, db_pool_size=200)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))  # 300 - 160 - 200 < 0
    try:
        with worker_settings(settings):
            assert edge.connection_cap() == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_without_a_file_limit_the_cap_is_max_connections(monkeypatch):
    settings = make_settings(NO_DATABASE, max_connections=1234)
    infinite = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    monkeypatch.setattr(resource, "getrlimit", lambda which: infinite)
    with worker_settings(settings):
        assert edge.fd_limit() is None and edge.connection_cap() == 1234


# --- credentials only over HTTPS, HSTS on every HTTPS answer ----------------------------


def test_credentials_over_the_wire_need_https_or_a_loopback_client_and_https_gets_hsts(
    database,
):
    payload = traffic.mailbox_created()
    body = orjson.dumps(payload)
    mailbox = payload["data"]["mailboxDetails"]["mailboxId"]
    with serving(database) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        sent = http.post(
            "/webhooks/cmr", params={"token": WEBHOOK_TOKEN}, content=body,
            headers=sender_signature(body) | {"content-type": "application/json"},
        )  # fmt: skip
        assert sent.status_code == 200
        path = f"/api/v1/mailboxes/{mailbox}/credentials"
        creds = {"authorization": f"Bearer {CREDENTIALS_TOKEN}"}
        loopback = http.get(path, headers=creds)
        assert loopback.status_code == 200 and loopback.json()["appPassword"]
        assert "strict-transport-security" not in loopback.headers
        over_tls = http.get(path, headers=creds | {"x-forwarded-proto": "https"})
        assert over_tls.status_code == 200 and over_tls.json()["appPassword"]
        assert over_tls.headers["strict-transport-security"] == "max-age=31536000"
        assert (
            http.get("/healthz", headers={"x-forwarded-proto": "https"}).headers[
                "strict-transport-security"
            ]
            == "max-age=31536000"
        )
        for said in ({"x-forwarded-proto": "http"}, {"x-forwarded-for": "10.1.2.3"}):
            refused = http.get(path, headers=creds | said)
            assert (refused.status_code, refused.json()) == (403, {"error": "https_required"})
            assert "strict-transport-security" not in refused.headers
