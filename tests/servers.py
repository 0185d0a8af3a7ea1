"""Real `coldmail-webhooks serve` processes for tests that need a server to kill or share,
and the app under uvicorn in-process (`served_in_process`) for tests of the wire's bounds."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import httpx
import uvicorn

from app.cli import uvicorn_options
from app.config import Settings
from app.main import create_app
from app.receiving import edge

CLI = [sys.executable, "-m", "app.cli"]
PATIENCE = 60  # the longest any condition is waited for
FORM = b"application/x-www-form-urlencoded"


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"still not: {what}"
        time.sleep(0.05)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def login_head(length: int | None, extra: bytes = b"") -> bytes:
    """The head of a sign-in form POST, its body framed by Content-Length (None: chunked),
    `extra` header lines after the framing."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + FORM
        + b"\r\n"
        + (framing.encode() + b"\r\n" + extra + b"\r\n")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**values: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return keep | values


def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> str:
    """Run a CLI command to completion; its standard output."""
    result = subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout


def serve_to_its_end(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to refuse to start: its exit and its one line."""
    return subprocess.run(
        [*CLI, "serve", "--port", "0"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Server:
    """One `serve` process; its output (logs included) is kept in a file for inspection."""

    def __init__(
        self, env: dict[str, str], cwd: Path, *, port: int | None = None, workers: int = 1
    ) -> None:
        self.env, self.cwd, self.workers = env, cwd, workers
        self.port = port or free_port()
        self.log = cwd / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.options: list[str] = []  # e.g. --no-migrate, for a restart while the db is away

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 60) -> None:
        command = [*CLI, "serve", "--port", str(self.port), "--workers", str(self.workers)]
        command += self.options
        with self.log.open("a") as sink:
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                cwd=self.cwd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def kill(self) -> None:
        """kill -9, workers and all: no shutdown code runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text()


@contextmanager
def serving(env: dict[str, str], cwd: Path, **options: int) -> Iterator[Server]:
    server = Server(env, cwd, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def served_in_process(settings: Settings) -> Iterator[int]:
    """The app under uvicorn as `serve` runs it (app.cli.uvicorn_options: GuardedHttp, the
    proxy headers, the keep-alive), on 127.0.0.1, in a thread of this process, so that
    mutmut's mutants are switched on; its port. GuardedHttp reads the worker's settings
    (get_settings): these, while it runs."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    root = logging.getLogger()
    capturing = root.handlers[:]
    application = create_app(settings)  # which sets the root logger's handler: pytest's kept
    root.handlers[:] = [*root.handlers, *capturing]
    server = uvicorn.Server(uvicorn.Config(application, **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]})
    with worker_settings(settings):
        thread.start()
        try:
            wait_for(lambda: server.started or not thread.is_alive(), "uvicorn started")
            assert server.started, "uvicorn did not start"
            yield int(listening.getsockname()[1])
        finally:
            server.should_exit = True
            thread.join(PATIENCE)
            listening.close()


@contextmanager
def worker_settings(settings: Settings) -> Iterator[None]:
    """`settings` as the worker's own (what get_settings gives app/receiving/edge.py)."""
    with patch.object(edge, "get_settings", lambda: settings):
        edge.connection_cap.cache_clear()
        try:
            yield
        finally:
            edge.connection_cap.cache_clear()
