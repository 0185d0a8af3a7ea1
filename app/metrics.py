"""Prometheus metrics. Labels use a fixed vocabulary so senders cannot blow up cardinality.

Under `serve --workers N` each worker writes its figures to PROMETHEUS_MULTIPROC_DIR and
whichever worker answers /metrics adds them up; each gauge says how (multiprocess_mode).
"""

import os
from typing import Any, TypeVar, cast

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

Metric = TypeVar("Metric", bound=MetricWrapperBase)

DELIVERIES = Counter(
    "cmr_webhook_deliveries_total", "Webhook deliveries by event and outcome", ["event", "outcome"]
)
LATENCY = Histogram(
    "cmr_webhook_processing_seconds",
    "Time from request to committed answer",
    ["outcome"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONFLICTS = Counter(
    "cmr_webhook_conflicts_total", "Deliveries reusing an eventId with other content"
)
REJECTIONS = Counter("cmr_webhook_rejections_total", "Deliveries refused, by reason", ["reason"])
REJECTED_BODIES_DROPPED = Counter(
    "cmr_rejected_bodies_dropped_total",
    "Stored bodies of rejected deliveries dropped to stay within REJECTED_MAX_BYTES",
)
CONNECTIONS_REFUSED = Counter(
    "cmr_connections_refused_total", "Connections answered 503 past the connection cap"
)
SIGNATURES = Counter("cmr_webhook_signatures_total", "Signature check results", ["result"])
POOL_IN_USE = Gauge(
    "cmr_db_pool_connections_in_use",
    "Database connections checked out",
    multiprocess_mode="livesum",
)
SPOOL_DEPTH = Gauge(
    "cmr_spool_depth",
    "Deliveries waiting in the spool for the database",
    multiprocess_mode="livemax",
)
SPOOL_OLDEST = Gauge(
    "cmr_spool_oldest_seconds",
    "Age of the oldest delivery in the spool",
    multiprocess_mode="livemax",
)
RECONCILE_LAST = Gauge(
    "cmr_reconcile_last_run_timestamp",
    "When the last reconcile finished",
    multiprocess_mode="max",
)
RECONCILE_DRIFT = Gauge(
    "cmr_reconcile_drift",
    "Drift found by the last reconcile, by kind",
    ["kind"],
    multiprocess_mode="mostrecent",
)
SPOOL_SET_ASIDE = Counter(
    "cmr_spool_set_aside_total", "Spool rows set aside as unreadable (torn or undecryptable)"
)
RENEWAL_RISKS = Gauge(
    "cmr_subscriptions_at_risk",
    "Subscriptions on the renewals list (within 30 days or overdue) by risk, and risk=due "
    "for all of them; counted when /metrics is scraped, at most once a minute",
    ["risk"],
    multiprocess_mode="mostrecent",
)
# Outbound (app/outbound), per destination (the names in DESTINATIONS_FILE: a fixed set).
# Attempts are counted by the dispatcher that made them; the backlog, dead letters and
# circuit are read from PostgreSQL when /metrics is scraped, so every replica reports the
# same values (alert on max by destination, not sum).
OUTBOUND_SENT = Counter(
    "cmr_outbound_sent_total", "Outbound messages delivered (2xx)", ["destination"]
)
OUTBOUND_FAILED = Counter(
    "cmr_outbound_failed_total",
    "Outbound attempts that failed (no answer, or not 2xx)",
    ["destination"],
)
OUTBOUND_BACKLOG = Gauge(
    "cmr_outbound_backlog",
    "Outbound messages waiting to be sent (pending), read from PostgreSQL at scrape",
    ["destination"],
    multiprocess_mode="mostrecent",
)
OUTBOUND_OLDEST = Gauge(
    "cmr_outbound_backlog_oldest_seconds",
    "Age of the oldest outbound message waiting to be sent, read from PostgreSQL at scrape",
    ["destination"],
    multiprocess_mode="mostrecent",
)
OUTBOUND_DEAD = Gauge(
    "cmr_outbound_dead_letters",
    "Outbound messages that exhausted their retries (replayable), read at scrape",
    ["destination"],
    multiprocess_mode="mostrecent",
)
OUTBOUND_CIRCUIT = Gauge(
    "cmr_outbound_circuit_state",
    "A destination's circuit, shared by every replica: 0 closed, 1 open, 2 disabled (410)",
    ["destination"],
    multiprocess_mode="mostrecent",
)
# Every series an alert or a dashboard names exists from the start, at 0.
for reason in ("invalid_json", "invalid_payload", "apply_failed"):
    REJECTIONS.labels(reason)
for result in ("valid", "invalid", "absent", "stale", "unchecked"):
    SIGNATURES.labels(result)
for kind in ("unknown", "missing_mailboxes", "differences"):
    RECONCILE_DRIFT.labels(kind).set(0)


_SERIES: dict[tuple[int, tuple[str, ...]], Any] = {}


def series(metric: Metric, *labels: str) -> Metric:
    """`metric.labels(*labels)`, looked up once: labels() checks its arguments and takes a
    lock on every call (about 1 us; three of them per delivery). The same child object
    labels() returns, so nothing else changes; for the fixed vocabularies only."""
    key = (id(metric), labels)
    found = _SERIES.get(key)
    if found is None:
        found = _SERIES[key] = metric.labels(*labels)
    return cast(Metric, found)


def multiprocess_mode() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def exposition() -> bytes:
    """The figures of this process, or of every worker in multiprocess mode."""
    if not multiprocess_mode():
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def worker_exited() -> None:
    """Drop a stopped worker's live gauges (its counters keep counting in the totals)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
