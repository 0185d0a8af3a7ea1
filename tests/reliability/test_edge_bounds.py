"""Attacks on a real `serve`: bodies read before authentication, answers nobody
reads, and more connections than a worker has file descriptors.

Each server here is configured with small timeouts for what a test waits out, and generous
ones for what it must not; every wait is for a condition, bounded by PATIENCE.
"""

import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson
import pytest

from app.simulation import traffic
from bench.attack import established, rss_mib
from tests.conftest import WEBHOOK_TOKEN
from tests.reliability.test_edge import connect, env_for, sign
from tests.servers import PATIENCE, Server, login_head, read_until_closed, wait_for

SLOW = "600"  # REQUEST_TIMEOUT_SECONDS where a test holds a connection on purpose
LARGE = b"/docs/assets/swagger-ui-bundle.js"  # 1.5 MB (the .map is not shipped: a 404)


@contextmanager
def serving(database: str, home: object, **settings: str) -> Iterator[Server]:
    serve = Server(env_for(database, **settings), home)  # type: ignore[arg-type]
    serve.start()
    try:
        yield serve
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("bounds")
    with serving(
        database,
        home,
        SPOOL_DIR=str(home / "spool"),
        REQUEST_TIMEOUT_SECONDS=SLOW,
        RESPONSE_TIMEOUT_SECONDS="1",
    ) as serve:
        yield serve


# --- bodies: read no more than a route needs, before it authenticates ------------------


def test_a_streamed_100_mb_sign_in_post_is_stopped_at_a_few_kb(server):
    pid = server.proc.pid if server.proc else 0
    before = rss_mib(pid)
    sock = connect(server)
    sock.sendall(login_head(None))
    chunk = b"%x\r\n" % (1024 * 1024) + b"token=" + b"a" * (1024 * 1024 - 6) + b"\r\n"

    def send_100_mb() -> None:
        try:
            for _ in range(100):
                sock.sendall(chunk)
        except OSError:
            pass  # refused: the server closed the connection

    sender = threading.Thread(target=send_100_mb)
    sender.start()
    reply = read_until_closed(sock)
    sender.join(PATIENCE)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    grown = rss_mib(pid) - before
    assert grown < 20, f"RSS grew by {grown:.0f} MiB under one streamed 100 MB sign-in post"


def test_300_clients_leaving_a_sign_in_post_mid_body_write_one_info_line_each(server):
    before = len(server.output().splitlines())
    for n in range(300):  # each from an address of its own, so the throttle weighs each one
        sock = connect(server, f"127.0.{n // 200 + 1}.{n % 200 + 1}")
        sock.sendall(login_head(4000) + b"token=abc")
        sock.close()
    wait_for(
        lambda: "\n".join(server.output().splitlines()[before:]).count('"status": 499') >= 300,
        "300 disconnects logged",
    )
    new = server.output().splitlines()[before:]
    assert "Traceback" not in "\n".join(new)
    assert all('"level": "INFO"' in line for line in new), [x for x in new if "INFO" not in x]
    assert len(new) <= 300 + 5


# --- connections: bounded both ways -------------------------------------------------------


@contextmanager
def non_readers(server: Server, count: int) -> Iterator[list[socket.socket]]:
    """Clients with a 4 KiB receive window that pipeline four requests for a 1.5 MB document,
    more than the kernel buffers, and never read a byte of the answers."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % LARGE * 4)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_clients_that_never_read_their_answers_are_dropped(server):
    before = len(server.output().splitlines())
    with non_readers(server, 300):
        wait_for(lambda: established(server.port) == 0, "every non-reading client dropped")
    new = "\n".join(server.output().splitlines()[before:])
    assert "Traceback" not in new and '"level": "ERROR"' not in new
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def deliver(http: httpx.Client, server: Server, body: bytes) -> int:
    """The status of one delivery, retried on 503 as CMR retries (without its pauses)."""
    deadline = time.monotonic() + PATIENCE
    while True:
        status = http.post(
            f"{server.url}/webhooks/cmr",
            params={"token": WEBHOOK_TOKEN},
            content=body,
            headers=sign(body),
        ).status_code
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@contextmanager
def fd_limit(limit: int) -> Iterator[None]:
    """Processes started inside may open at most `limit` files (this one keeps its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_at_its_file_limit_still_answers_every_delivery(database, tmp_path):
    with fd_limit(256):
        serve = Server(
            env_for(database, SPOOL_DIR=str(tmp_path / "spool"), RESPONSE_TIMEOUT_SECONDS="1"),
            tmp_path,
        )
        serve.start()
    try:
        with non_readers(serve, 250), httpx.Client(timeout=PATIENCE) as http:
            answers = []
            for _ in range(20):
                body = orjson.dumps(traffic.mailbox_created())
                answers.append(deliver(http, serve, body))
            assert http.get(f"{serve.url}/healthz").status_code == 200
        assert answers == [200] * 20
        log = serve.output()
        assert "Too many open files" not in log and "Traceback" not in log
    finally:
        serve.stop()
