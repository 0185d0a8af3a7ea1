"""What `serve` does before it serves: wait for the database, migrate, set up metrics."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import asyncpg
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from app.config import ConfigError
from app.crypto import Vault
from app.db import asyncpg_dsn, make_engine
from app.hashing import KEYS_DO_NOT_FIT, keys_fit

log = logging.getLogger("coldmail.startup")

# Errors that mean "not up yet": refused, unreachable, still starting (57P03), or the
# network stalled. A wrong password or database name is final and fails at once.
NOT_YET = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


def log_attempt(state: RetryCallState, seconds: float) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "database not reachable yet (%s); retrying, for up to %.0f s in all",
        describe(error),
        seconds,
    )


def describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0] if error else "unknown"


async def wait_for_database(url: str, seconds: float) -> None:
    """Back off until PostgreSQL accepts a connection, rather than crash-looping while a
    first boot (or a failover) is still under way."""
    dsn = asyncpg_dsn(url)

    @retry(
        retry=retry_if_exception_type(NOT_YET),
        wait=wait_exponential(multiplier=0.25, max=5),
        stop=stop_after_delay(seconds),
        before_sleep=lambda state: log_attempt(state, seconds),
        reraise=True,
    )
    async def attempt() -> None:
        connection = await asyncpg.connect(dsn, timeout=5)
        await connection.close()

    try:
        await attempt()
    except NOT_YET as error:
        raise ConfigError(
            f"the database did not answer within {seconds:.0f} s ({describe(error)}); "
            "check DATABASE_URL, or raise DATABASE_WAIT_SECONDS"
        ) from None
    except asyncpg.PostgresError as error:
        raise ConfigError(f"the database refused the connection: {describe(error)}") from None


def prepare_multiprocess_metrics(workers: int) -> None:
    """Several workers share their Prometheus figures through files in one folder, which
    must start empty (prometheus-client's multiprocess mode); one worker needs none."""
    if workers < 2:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="coldmail-metrics-")


def check_spool_writable(directory: Path) -> None:
    """Refuse to serve with a spool that cannot take a delivery: better one line at start
    than a 503 on the first outage."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"SPOOL_DIR {directory} is not writable by uid {os.getuid()} ({error.strerror}): "
            "mount a volume this user can write there, or run as the image's user"
        ) from None


async def check_keys(url: str, keys: list[str]) -> None:
    """Refuse to serve with keys that cannot read what is stored: every delivery would need
    the hashing key they cannot decrypt."""
    engine = make_engine(url, pool_size=1)
    try:
        fit = await keys_fit(engine, Vault(keys))
    finally:
        await engine.dispose()
    if not fit:
        raise ConfigError(KEYS_DO_NOT_FIT)
