"""The spool's drain: how fast `serve` applies deliveries that waited out an outage.

    python bench/drain.py [--deliveries 50000]

Fills a spool with single-mailbox deliveries (as `serve` writes them while PostgreSQL is
away), starts `serve` on a scratch database with that spool, and times the drain from
its first committed batch to an empty spool. Fails unless every delivery is processed.
bench/run.py runs it as one of its rows.
"""

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.crypto import Vault  # noqa: E402
from app.receiving.spool import SPOOL_FILE, Spool  # noqa: E402
from app.simulation import traffic  # noqa: E402
from bench.run import (  # noqa: E402
    CLI,
    KEY,
    Run,
    count_events,
    free_port,
    print_table,
    scratch_database,
    service_env,
)

DELIVERIES = 50_000
CHUNK = 1000


def fill_spool(directory: Path, deliveries: int) -> None:
    """What `serve` spools while the database is away: encrypted bodies and their checks."""
    vault, spool = Vault([KEY]), Spool(directory, max_bytes=2**40)
    try:
        for start in range(0, deliveries, CHUNK):
            rows = []
            for _ in range(min(CHUNK, deliveries - start)):
                meta: dict[str, Any] = {"kind": "delivery", "signature": "valid"}
                meta |= {"form": "timestamp.body:hex", "signedAt": time.time(), "warnings": []}
                body = vault.encrypt(orjson.dumps(traffic.mailbox_created()))
                rows.append((time.time(), body, orjson.dumps(meta)))
            spool._put_many(rows)
    finally:
        spool.close()


def depth(path: Path) -> int:
    with sqlite3.connect(path, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM deliveries").fetchone()[0])


def timed_drain(path: Path, deliveries: int, proc: subprocess.Popen[bytes]) -> float:
    """Deliveries a second, from the first batch out of the spool to the last (those of
    the first batch not counted)."""
    while (first := depth(path)) == deliveries:
        if proc.poll() is not None:
            raise RuntimeError("serve exited before draining")
        time.sleep(0.05)
    started = time.perf_counter()
    while depth(path):
        if proc.poll() is not None:
            raise RuntimeError("serve exited while draining")
        time.sleep(0.05)
    return first / (time.perf_counter() - started)


def bench_drain(run: Run, deliveries: int = DELIVERIES) -> None:
    spool = Path(tempfile.mkdtemp(prefix="drain-", dir=run.out))
    fill_spool(spool, deliveries)
    port, failures, figures = free_port(), [], {}
    log = run.out / "drain.log"
    with scratch_database("cmw_bench_drain", migrated=True) as url, log.open("wb") as output:
        env = service_env(url, SPOOL_DIR=str(spool))
        command = [*CLI, "serve", "--port", str(port), "--no-migrate"]
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=output, cwd=ROOT)
        try:
            rate = timed_drain(spool / SPOOL_FILE, deliveries, proc)
            figures = {"events_per_second": round(rate, 1)}
        except RuntimeError as error:
            failures.append(f"{error} (see {log})")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        processed = asyncio.run(count_events(url))
    if processed != deliveries:
        failures.append(f"{deliveries} spooled, {processed} processed")
    run.add(f"drain: {deliveries:,} spooled deliveries", figures, failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=DELIVERIES)
    args = parser.parse_args()
    run = Run(Path(tempfile.mkdtemp(prefix="cmw-drain-")), 0)
    bench_drain(run, args.deliveries)
    print_table(run.rows)
    for failure in run.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
