"""Reconciliation with the sender's REST API (docs/operations.md, "Reconciliation").

The sender has no "list events" call, so this compares state: its `GET /subscriptions`
against ours. What it says of a subscription's status, period and auto-renew is applied
through the same lifecycle rule as `subscription.*` events (merge.SUBSCRIPTION_LIFECYCLE),
recorded as coming from reconciliation, so a run racing the webhooks ends as either order
would; mailboxes are never invented. What remains
different is the drift report. Only the response shape the sender documents is relied on
(tests/fake_sender.py serves its example): change `SUBSCRIPTIONS_PATH` and `remote_row` if
it changes.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
from pydantic.alias_generators import to_camel
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from app import metrics
from app.db import raw_connection
from app.operations import leases
from app.receiving.payloads import SUBSCRIPTION_STATES, known_state, parse_time
from app.recording import merge
from app.recording.effects import version
from app.recording.record import Outbox, upsert

log = logging.getLogger("coldmail.reconcile")
SUBSCRIPTIONS_PATH = "/subscriptions"
PAGE_SIZE = 100
REQUESTS_PER_SECOND = 5
# One periodic runner at a time across workers and replicas: a lease (not a session
# advisory lock, which PgBouncer's transaction pooling would strand: leases.py).
LEASE = "reconcile"


class ReconcileError(Exception):
    """A one-line reason the run could not be made; never holds the API key."""


class Retryable(Exception):
    """429 or 5xx, or no answer: tried again with back-off."""


@dataclass
class Report:
    started_at: str
    finished_at: str = ""
    dry_run: bool = False
    pages: int = 0
    subscriptions: int = 0
    applied: int = 0
    unknown: list[dict[str, Any]] = field(default_factory=list)
    missing_mailboxes: list[dict[str, Any]] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drift(self) -> int:
        return len(self.unknown) + len(self.missing_mailboxes) + len(self.differences)

    def as_json(self) -> dict[str, Any]:
        """As served at GET /api/v1/reconciliation: camelCase, like the rest of the API."""
        fields = asdict(self) | {"drift": self.drift}
        return {to_camel(name): value for name, value in fields.items()}


class SenderApi:
    """GET calls on the sender's API: timeouts, at most 5 requests a second, and back-off on
    429, 5xx and transport errors (tenacity)."""

    def __init__(self, base_url: str, api_key: str, *, attempts: int = 6) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"cmr-x-api-key": api_key, "accept": "application/json"},
            timeout=httpx.Timeout(20, connect=5),
        )
        self._attempts = attempts
        self._next_slot = 0.0

    async def close(self) -> None:
        await self._client.aclose()

    async def _pace(self) -> None:
        wait = self._next_slot - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def get(self, path: str, params: dict[str, Any]) -> Any:
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, Retryable)),
            wait=wait_exponential_jitter(multiplier=0.5, max=30),
            stop=stop_after_attempt(self._attempts),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._get_once(path, params)
        except Retryable as error:
            raise ReconcileError(f"the sender's API kept failing: {error}") from None
        raise AssertionError("unreachable")

    async def _get_once(self, path: str, params: dict[str, Any]) -> Any:
        await self._pace()
        try:
            response = await self._client.get(path, params=params)
        except httpx.TransportError as error:
            raise Retryable(type(error).__name__) from None
        finally:
            # The next request starts a fifth of a second (and 5%) after this one ended: a
            # slow first connection cannot bunch the next ones into the sender's second.
            self._next_slot = time.monotonic() + 1.05 / REQUESTS_PER_SECOND
        if response.status_code in (401, 403):
            raise ReconcileError(
                f"the sender refused CMR_API_KEY ({response.status_code}): check the key"
            )
        if response.status_code == 429 or response.status_code >= 500:
            log.warning("the sender's API answered %s; backing off", response.status_code)
            raise Retryable(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise ReconcileError(f"the sender's API answered HTTP {response.status_code}")
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ReconcileError("the sender's API answered with something not JSON") from None

    async def subscriptions(self) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
        """Each page in turn; stops at currentPage >= totalPages (`nextPage` is always set)."""
        page = 1
        while True:
            body = await self.get(SUBSCRIPTIONS_PATH, {"page": page, "limit": PAGE_SIZE})
            try:
                data = body["data"]
                items, paging = data["subscriptions"], data["pagination"]
                current, total = int(paging["currentPage"]), int(paging["totalPages"])
            except (KeyError, TypeError, ValueError):
                raise ReconcileError(
                    f"page {page} of /subscriptions is not in the documented shape"
                ) from None
            yield page, [item for item in items if isinstance(item, dict)]
            if current >= total or not items:
                return
            page = current + 1


def remote_row(item: dict[str, Any]) -> dict[str, Any]:
    """The sender's subscription, in our columns (its names differ from the webhooks')."""
    return {
        "subscription_id": str(item.get("subscriptionId") or ""),
        "subscription_status": known_state(item.get("subscriptionStatus"), SUBSCRIPTION_STATES),
        "period_start": parse_time(item.get("periodStart")),
        "period_end": parse_time(item.get("periodEnd")),
        "auto_renew": item.get("autoRenew") if isinstance(item.get("autoRenew"), bool) else None,
        "lifecycle_quantity": _count(item.get("totalMailboxQuantity")),
        "domain": item.get("domain") if isinstance(item.get("domain"), str) else None,
        "user_id": item.get("userId") if isinstance(item.get("userId"), str) else None,
    }


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


LOCAL = """
SELECT s.subscription_id, s.subscription_status, s.period_end,
    s.source IS NULL AND s.order_id IS NULL AND s.lifecycle_source = 'reconciliation'
        AS only_reconciled,
    (SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id) AS mailboxes
FROM subscriptions s WHERE s.subscription_id = ANY($1::text[])
"""


async def reconcile_page(
    conn: asyncpg.Connection, items: list[dict[str, Any]], report: Report, *, lifecycle_version: str
) -> None:
    """Apply the sender's lifecycle to every subscription on the page (one first heard of
    this way is created, as by a subscription.* event; mailboxes never are), then compare."""
    rows = [r for r in map(remote_row, items) if r["subscription_id"]]
    if not report.dry_run and rows:
        source = {
            "status": "active",
            "lifecycle_version": lifecycle_version,
            "lifecycle_source": "reconciliation",
        }
        lifecycle = [r | source | {"expiry_date": r["period_end"]} for r in rows]
        await upsert(conn, merge.SUBSCRIPTION_LIFECYCLE, lifecycle)
    report.applied += len(rows)
    local = await conn.fetch(LOCAL, [r["subscription_id"] for r in rows])
    known = {r["subscription_id"]: r for r in local}
    report.subscriptions += len(rows)
    for remote in rows:
        compare(remote, known.get(remote["subscription_id"]), report)


def compare(remote: dict[str, Any], local: Any, report: Report) -> None:
    sid = remote["subscription_id"]
    if local is None or local["only_reconciled"]:
        report.unknown.append({"subscriptionId": sid, "domain": remote["domain"]})
        return
    expected = remote["lifecycle_quantity"]
    if expected is not None and local["mailboxes"] < expected:
        report.missing_mailboxes.append(
            {"subscriptionId": sid, "mailboxes": local["mailboxes"], "expected": expected}
        )
    status_differs = remote["subscription_status"] not in (None, local["subscription_status"])
    period_differs = remote["period_end"] not in (None, local["period_end"])
    if status_differs or period_differs:
        report.differences.append(
            {
                "subscriptionId": sid,
                "ours": {
                    "status": local["subscription_status"],
                    "periodEnd": _iso(local["period_end"]),
                },
                "theirs": {
                    "status": remote["subscription_status"],
                    "periodEnd": _iso(remote["period_end"]),
                },
            }
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def reconcile(
    engine: AsyncEngine,
    api: SenderApi,
    *,
    dry_run: bool,
    outbox: Outbox | None = None,
    holder: str | None = None,
) -> Report:
    """One run: page through the sender's subscriptions, apply, report, store the report
    (and, in its transaction, what the drift causes to be told: `outbox`). A run that holds
    the lease (`holder`) renews it with each page, and stops (leases.LeaseLost) where it
    has lost it."""
    started = datetime.now(UTC)
    report = Report(started_at=started.isoformat(), dry_run=dry_run)
    lifecycle_version = version(started, "reconciliation")
    async for page, items in api.subscriptions():
        report.pages = page
        async with raw_connection(engine) as conn, conn.transaction():
            if holder is not None:
                await leases.renew(conn, LEASE, holder)
            await reconcile_page(conn, items, report, lifecycle_version=lifecycle_version)
    report.finished_at = datetime.now(UTC).isoformat()
    if not dry_run:
        await save_report(engine, report, outbox)
    observe(report)
    return report


async def save_report(engine: AsyncEngine, report: Report, outbox: Outbox | None = None) -> None:
    async with raw_connection(engine) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO reconciliations (report) VALUES ($1::jsonb)",
            orjson.dumps(report.as_json()).decode(),
        )
        if outbox is not None and outbox.telling:
            await outbox.reconciled(conn, report.as_json())


def observe(report: Report) -> None:
    metrics.RECONCILE_LAST.set(time.time())
    metrics.RECONCILE_DRIFT.labels("unknown").set(len(report.unknown))
    metrics.RECONCILE_DRIFT.labels("missing_mailboxes").set(len(report.missing_mailboxes))
    metrics.RECONCILE_DRIFT.labels("differences").set(len(report.differences))


async def run_periodically(
    engine: AsyncEngine, make_api: Any, interval: float, outbox: Outbox | None = None
) -> None:
    """Inside `serve`: every `interval` seconds, if no other worker or replica is running
    one (the lease), reconcile. A failed run is logged and tried next time."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_leased(engine, make_api, outbox)
        except ReconcileError as error:
            log.error("reconcile failed: %s", error)
        except Exception as error:  # the database away, say: try again next time
            log.error("reconcile failed: %s", type(error).__name__)


async def run_leased(engine: AsyncEngine, make_api: Any, outbox: Outbox | None = None) -> None:
    """One run, unless another worker or replica holds the lease; released at its end
    (should this process die first, the lease expires)."""
    holder = leases.new_holder()
    async with raw_connection(engine) as conn:
        if not await leases.take(conn, LEASE, holder):
            return
    try:
        api = make_api()
        try:
            report = await reconcile(engine, api, dry_run=False, outbox=outbox, holder=holder)
        finally:
            await api.close()
        log.info("reconciled: drift %s", report.drift)
    finally:
        async with raw_connection(engine) as conn:
            await leases.release(conn, LEASE, holder)
