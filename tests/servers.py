"""Real `coldmail-webhooks serve` processes for tests that need a server to kill or share."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "app.cli"]


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
