"""The local spool: deliveries wait here, encrypted and fsynced, while PostgreSQL is away.

SQLite (WAL, synchronous=FULL) is the store: crash safety, atomic deletes and concurrent
writers from several worker processes come proven. Every call runs on one thread of its
own, off the event loop. A row holds the raw body as a Fernet token (the current key),
what the delivery's checks found, and a checksum that sets a torn row aside instead of
letting it block the drainer. The spool is bounded by SPOOL_MAX_BYTES.
"""

import asyncio
import fcntl
import hashlib
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

log = logging.getLogger("coldmail.spool")
T = TypeVar("T")
SPOOL_FILE = "spool.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    body BLOB NOT NULL,        -- the raw body, Fernet-encrypted
    meta BLOB NOT NULL,        -- JSON: kind, signature, warnings, reason, errors (no values)
    checksum BLOB NOT NULL,    -- sha256(body || meta)
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY, received_at REAL, body BLOB, meta BLOB, why TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (bytes INTEGER NOT NULL);
INSERT INTO usage SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM usage);
"""


class SpoolFull(Exception):
    """The spool is at SPOOL_MAX_BYTES (or cannot be written): nothing was added."""


@dataclass(frozen=True)
class Entry:
    id: int
    received_at: float
    body: bytes
    meta: dict[str, Any]


@dataclass(frozen=True)
class TornEntry:
    """A row that fails its checksum or cannot be read: set aside, never drained."""

    id: int
    why: str


def checksum(body: bytes, meta: bytes) -> bytes:
    return hashlib.sha256(body + meta).digest()


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.max_bytes = max_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._lock_file: Any = None
        self._pending: list[tuple[tuple[float, bytes, bytes], asyncio.Future[None]]] = []
        self._writer: asyncio.Future[None] | None = None

    async def _run(self, job: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, job, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    # --- writing ----------------------------------------------------------------------

    async def put(self, *, body: bytes, meta: dict[str, Any], received_at: float) -> None:
        """Durable on return (the WAL is fsynced); SpoolFull if it would exceed the bound.

        Group commit: puts that arrive while a write is under way wait together and are
        written by the next one, in one transaction and one fsync."""
        waiter = asyncio.get_running_loop().create_future()
        self._pending.append(((received_at, body, orjson.dumps(meta)), waiter))
        if self._writer is None or self._writer.done():
            # a task of its own: a caller cancelled mid-write cannot strand the others
            self._writer = asyncio.ensure_future(self._write_pending())
        await waiter

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                stored = await self._run(self._put_many, [row for row, _ in batch])
            except sqlite3.Error as error:
                log.error("the spool cannot be written: %s", error)
                stored = [False] * len(batch)
            for ok, (_, waiter) in zip(stored, batch, strict=True):
                if not waiter.done():
                    waiter.set_result(None) if ok else waiter.set_exception(SpoolFull())

    def _put_many(self, rows: list[tuple[float, bytes, bytes]]) -> list[bool]:
        """One transaction: each row that fits under the bound is added."""
        db = self._connect()
        stored = []
        db.execute("BEGIN IMMEDIATE")
        try:
            (used,) = db.execute("SELECT bytes FROM usage").fetchone()
            for received_at, body, meta in rows:
                size = len(body) + len(meta)
                stored.append(used + size <= self.max_bytes)
                if stored[-1]:
                    used += size
                    db.execute(
                        "INSERT INTO deliveries (received_at, body, meta, checksum, size) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (received_at, body, meta, checksum(body, meta), size),
                    )
            db.execute("UPDATE usage SET bytes = ?", (used,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return stored

    # --- draining ---------------------------------------------------------------------

    async def oldest(self, limit: int) -> list[Entry | TornEntry]:
        rows = await self._run(self._oldest, limit)
        return [self._decode(*row) for row in rows]

    def _oldest(self, limit: int) -> list[tuple[Any, ...]]:
        return (
            self._connect()
            .execute(
                "SELECT id, received_at, body, meta, checksum FROM deliveries ORDER BY id LIMIT ?",
                (limit,),
            )
            .fetchall()
        )

    @staticmethod
    def _decode(
        row_id: int, received_at: float, body: bytes, meta: bytes, digest: bytes
    ) -> Entry | TornEntry:
        try:
            if checksum(body, meta) != digest:
                raise ValueError("checksum mismatch")
            return Entry(row_id, received_at, body, orjson.loads(meta))
        except (ValueError, TypeError) as error:
            return TornEntry(row_id, str(error))

    async def delete_many(self, row_ids: list[int]) -> None:
        """Take applied rows out, in one transaction (one fsync for a drained batch)."""
        if row_ids:
            await self._run(self._delete_many, row_ids)

    def _delete_many(self, row_ids: list[int]) -> None:
        db = self._connect()
        ids = [(row_id,) for row_id in row_ids]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "UPDATE usage SET bytes = bytes - "
                "coalesce((SELECT size FROM deliveries WHERE id = ?), 0)",
                ids,
            )
            db.executemany("DELETE FROM deliveries WHERE id = ?", ids)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def set_aside(self, row_id: int, why: str) -> None:
        """Keep an unreadable row apart (for an operator to inspect), out of the drain."""
        await self._run(self._move, row_id, why)

    def _move(self, row_id: int, why: str) -> None:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO set_aside SELECT id, received_at, body, meta, ? "
                "FROM deliveries WHERE id = ?",
                (why, row_id),
            )
            db.execute(
                "UPDATE usage SET bytes = bytes - "
                "coalesce((SELECT size FROM deliveries WHERE id = ?), 0)",
                (row_id,),
            )
            db.execute("DELETE FROM deliveries WHERE id = ?", (row_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- state --------------------------------------------------------------------------

    async def depth(self) -> tuple[int, float | None, bool]:
        """(rows waiting, age of the oldest in seconds, whether there is room)."""
        return await self._run(self._depth)  # type: ignore[no-any-return]

    def _depth(self) -> tuple[int, float | None, bool]:
        db = self._connect()
        count, oldest = db.execute("SELECT count(*), min(received_at) FROM deliveries").fetchone()
        (used,) = db.execute("SELECT bytes FROM usage").fetchone()
        age = None if oldest is None else max(0.0, time.time() - oldest)
        return count, age, used < self.max_bytes

    async def rewrite_bodies(self, rewrite: Any) -> int:
        """Re-encrypt every waiting body (rotate-keys); returns how many were rewritten."""
        return await self._run(self._rewrite, rewrite)  # type: ignore[no-any-return]

    def _rewrite(self, rewrite: Any) -> int:
        db = self._connect()
        count = 0
        for row_id, body, meta in db.execute("SELECT id, body, meta FROM deliveries").fetchall():
            new = rewrite(body)
            if new != body:
                db.execute(
                    "UPDATE deliveries SET body = ?, checksum = ? WHERE id = ?",
                    (new, checksum(new, meta), row_id),
                )
                count += 1
        return count

    def try_become_drainer(self) -> bool:
        """One drainer per spool file among the processes sharing it: whoever holds the
        lock file. The lock dies with its process, so another worker takes over."""
        if self._lock_file is not None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = (self.directory / "drainer.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._db is not None:
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()
