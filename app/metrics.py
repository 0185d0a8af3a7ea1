"""Prometheus metrics. Labels use a fixed vocabulary so senders cannot blow up cardinality."""

from prometheus_client import Counter, Gauge, Histogram

from app.schemas import HANDLED_EVENTS

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
SIGNATURES = Counter("cmr_webhook_signatures_total", "Signature check results", ["result"])
POOL_IN_USE = Gauge("cmr_db_pool_connections_in_use", "Database connections checked out")
SPOOL_DEPTH = Gauge("cmr_spool_depth", "Deliveries waiting in the spool for the database")
SPOOL_OLDEST = Gauge("cmr_spool_oldest_seconds", "Age of the oldest delivery in the spool")
RECONCILE_LAST = Gauge("cmr_reconcile_last_run_timestamp", "When the last reconcile finished")
RECONCILE_DRIFT = Gauge(
    "cmr_reconcile_drift", "Drift found by the last reconcile, by kind", ["kind"]
)
SPOOL_SET_ASIDE = Counter(
    "cmr_spool_set_aside_total", "Spool rows set aside as unreadable (torn or undecryptable)"
)


def event_label(event: str | None) -> str:
    if event in HANDLED_EVENTS:
        return str(event)
    if event and event.split(".", 1)[0] in {"domain", "subscription", "mailbox", "prewarmup"}:
        return event.split(".", 1)[0] + ".other"
    return "other"
