"""A scratch PostgreSQL cluster that takes only TLS connections with a SCRAM password, as a
managed PostgreSQL service does: Debian's server binaries, a self-signed certificate."""

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.servers import free_port

BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
USER = "postgres"


@dataclass
class Cluster:
    port: int
    socket_dir: Path

    def url(self, role: str, password: str, database: str, query: str = "") -> str:
        auth = f"{quote(role, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}{query}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """As the superuser, over the Unix socket (trusted): for setting up and inspecting."""
        return run_as_postgres(
            [str(BIN[-1] / "psql"), "-h", str(self.socket_dir), "-p", str(self.port)]
            + ["-U", USER, "-d", database, "-Atc", sql]
        )


def run_as_postgres(command: list[str]) -> str:
    prefix = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
    result = subprocess.run(prefix + command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def make_certificate(folder: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"]
        + ["/CN=127.0.0.1", "-keyout", str(folder / "server.key")]
        + ["-out", str(folder / "server.crt")],
        capture_output=True,
        check=True,
    )


@contextmanager
def tls_cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="cmw-tls-pg-", dir="/tmp"))
    data, port = root / "data", free_port()
    try:
        make_certificate(root)
        if os.geteuid() == 0:
            shutil.chown(root, USER, USER)
            for name in ("server.key", "server.crt"):
                shutil.chown(root / name, USER, USER)
        (root / "server.key").chmod(0o600)
        run_as_postgres([str(BIN[-1] / "initdb"), "-D", str(data), "-U", USER, "-A", "trust"])
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        options = (
            f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}"
            f" -c ssl=on -c ssl_cert_file={root}/server.crt -c ssl_key_file={root}/server.key"
        )
        run_as_postgres(
            [str(BIN[-1] / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l"]
            + [str(root / "log"), "start"]
        )
        yield Cluster(port, root)
    finally:
        if (data / "postmaster.pid").exists():
            run_as_postgres([str(BIN[-1] / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"])
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)
