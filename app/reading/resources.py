"""The read API's wire formats (camelCase), apart from the ORM models: none holds a
credential except `Credentials`, served only to credentials tokens."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer
from pydantic.alias_generators import to_camel

from app.receiving.payloads import assume_utc

# A time the sender gave: its zero date (0001-01-01, Go's and C#'s unset time) is stored as
# -infinity, which asyncpg reads back without an offset; it is UTC like every other.
SenderTime = Annotated[datetime, AfterValidator(assume_utc)]
Money = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]
Provider = Literal["GOOGLE", "MICROSOFT"]
SubscriptionStatus = Literal["ACTIVE", "RENEWING", "PAST_DUE", "EXPIRED", "CANCELLED"]
T = TypeVar("T")


class Resource(BaseModel):
    # Built from database rows as dicts (row._asdict()), by field name: reading a Row's
    # attributes costs five times as much, 9 ms on a page of 500 mailboxes. Serialized by
    # camelCase alias.
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=False,
        serialize_by_alias=True,
    )


class Subscription(Resource):
    subscription_id: str
    domain: str | None
    domain_id: str | None
    user_id: str | None
    user_email: str | None
    provider: Provider | None
    source: Literal["standard", "prewarmed"] | None
    status: Literal["active", "failed"]
    order_id: str | None = Field(description="The subscription's first order")
    expiry_date: SenderTime | None
    price: Money | None
    quantity: int | None = Field(
        description="From subscription.* events when known, else the sum over succeeded orders"
    )
    mailbox_count: int
    subscription_status: SubscriptionStatus | None
    period_start: SenderTime | None
    period_end: SenderTime | None
    auto_renew: bool | None
    lifecycle_source: Literal["event", "reconciliation"] | None = Field(
        description="Whether the lifecycle fields last came from an event or a reconcile"
    )
    domain_status: str | None
    domain_expiry_date: SenderTime | None
    created_at: datetime
    updated_at: datetime


class Mailbox(Resource):
    mailbox_id: str
    subscription_id: str | None
    domain: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    user_name: str | None
    profile_picture: str | None
    is_admin: bool | None
    provider: Provider | None
    source: Literal["standard", "prewarmed"] | None
    user_id: str | None
    order_id: str | None
    creation_time: SenderTime | None
    warming_up_from: SenderTime | None
    expiry_date: SenderTime | None
    price: Money | None
    final_url: str | None
    has_password: bool
    has_app_password: bool
    has_authenticator_secret: bool
    warmup_status: Literal["started", "removed"] | None
    exported_at: datetime | None
    created_at: datetime
    updated_at: datetime


class SubscriptionWithMailboxes(Subscription):
    mailboxes: list[Mailbox]


Risk = Literal[
    "past_due",
    "renewal_failed",
    "auto_renew_off",
    "domain_grace_period",
    "domain_expired",
    "overdue",
    "expired",
    "cancelled",
]


Due = Literal["this_week", "overdue", "lapsed", "later", "ended", "undated"]


class Renewal(Subscription):
    renews_at: SenderTime | None = Field(
        description="When its period ends (its expiryDate); null when never said"
    )
    due: Due = Field(
        description="this_week: ends within 7 days; later: after that; overdue: ended (still "
        "meant to run) within the last 14 days; lapsed: ended longer ago than that, with no "
        "word since; ended: EXPIRED or CANCELLED; undated: no end known"
    )
    risks: list[Risk] = Field(
        description="overdue: its period ended and no renewal was heard; the others as named"
    )
    monthly_cost: Money | None = Field(
        description="price per mailbox x quantity (else the mailboxes stored)"
    )


class RenewalTotal(Resource):
    user_id: str | None
    user_email: str | None
    subscriptions: int
    mailboxes: int = Field(description="Billed for: each subscription's quantity, else its count")
    monthly_cost: Money | None = Field(description="Of those whose price is known")
    unknown_cost: int = Field(0, description="Subscriptions whose price is unknown (not in it)")


class RenewalSum(Resource):
    subscriptions: int
    mailboxes: int = Field(description="Billed for: each subscription's quantity, else its count")
    monthly_cost: Money | None = Field(description="Of those whose price is known")
    unknown_cost: int = Field(description="Subscriptions whose price is unknown (not in it)")


class RenewalPage(Resource):
    items: list[Renewal]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end")
    totals: list[RenewalTotal] = Field(description="Per userId, over the whole list (all pages)")
    totals_at: datetime = Field(description="When the totals were summed (at most a minute ago)")
    total: RenewalSum = Field(description="Over every page the filters choose")
    by_due: dict[str, RenewalSum] = Field(
        description="The same per `due`, with every filter but `due` (its tabs' counts)"
    )
    currency: str = Field(description="Of every price and cost (PRICE_CURRENCY)")


class Credentials(Resource):
    mailbox_id: str
    password: str | None
    app_password: str | None
    authenticator_secret: str | None


class OrderDomain(Resource):
    domain: str
    status: Literal["succeeded", "failed"]
    reason: str | None = Field(
        description="The reported failure reason, kept even if the "
        "domain also succeeded (success wins)."
    )
    subscription_id: str | None
    quantity: int | None
    mailbox_count: int = Field(description="This order's mailboxes only")


class Order(Resource):
    order_id: str
    kind: Literal["mailbox", "prewarmup"]
    user_id: str | None
    user_email: str | None
    provider: Provider | None
    status: Literal["succeeded", "failed", "partially_failed"]
    failure_reason: str | None = Field(description="An order-level failure, if one was reported")
    domains: list[OrderDomain]
    created_at: datetime
    updated_at: datetime


class EventSummary(Resource):
    """An event as listed: everything but its payload."""

    id: int
    event_id: str
    event: str
    status: Literal["processed", "ignored"]
    conflict: bool
    deliveries: int
    first_received_at: datetime
    last_received_at: datetime
    event_time: datetime = Field(
        description="When it happened: the signed cmr-x-timestamp, else the first receipt"
    )
    signature: str = Field(description="valid, invalid, absent, stale, or unchecked (no key)")
    signature_form: str | None = Field(description="Which signed form matched, if any")
    warnings: list[str] = Field(description="What was repaired in a lenient field")
    spooled: bool = Field(description="Whether it waited in the spool for the database")


class Event(EventSummary):
    payload: dict[str, Any] = Field(description="The delivery with credentials redacted")


class Rejected(Resource):
    id: int
    reason: Literal["invalid_json", "invalid_payload", "apply_failed"]
    event: str | None
    event_id: str | None
    errors: list[dict[str, Any]]
    signature: str
    received_at: datetime
    replayed_at: datetime | None
    replayed_event_id: int | None


class CredentialRead(Resource):
    id: int
    mailbox_id: str
    token_fingerprint: str
    client_address: str | None
    read_at: datetime


class Stats(Resource):
    subscriptions: int
    mailboxes: int
    mailboxes_by_provider: dict[str, int]
    mailboxes_by_source: dict[str, int]
    orders_by_status: dict[str, int]
    events_by_status: dict[str, int]
    conflicts: int
    rejected_deliveries: int
    replayable_events: int = Field(
        description="Stored events of types this version applies, still marked ignored: "
        "`coldmail-webhooks replay --all` applies them"
    )
    last_delivery_at: AwareDatetime | None
    signature_forms: list[str] = Field(
        description="The signature forms deliveries are checked against now: those of "
        "CMR_SIGNATURE_FORMS, else the one live traffic pinned, else all four; empty without "
        "CMR_SIGNING_KEY"
    )


# --- outbound (app/outbound/api.py) ---------------------------------------------------


class Destination(Resource):
    """A destination as declared (never its URL's path or query, which may hold a secret:
    only its host) and its state, shared by every replica."""

    name: str
    format: Literal["standard-webhooks", "slack"]
    events: list[str]
    user_ids: list[str] | None
    host: str | None
    circuit: Literal["closed", "open", "disabled"] = Field(
        description="open: failing, only a probe is sent until one succeeds; disabled: it "
        "answered 410 Gone"
    )
    failures: int = Field(description="Failed attempts in a row since the last success")
    backlog: int = Field(description="Messages waiting to be sent")
    oldest_at: datetime | None = Field(description="When the oldest waiting message was written")
    oldest_seconds: float
    dead_letters: int = Field(description="Messages whose retries are exhausted (replayable)")
    opened_at: datetime | None
    disabled_at: datetime | None
    last_attempt_at: datetime | None


class OutboundMessage(Resource):
    id: int
    webhook_id: str = Field(description="The `webhook-id` header, the same on every attempt")
    type: str
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="The next retry (pending messages)")
    last_attempt_at: datetime | None
    last_status: int | None = Field(description="The HTTP status of the last attempt, if any")
    last_error: str | None
    occurred_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class Page(Resource, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end")


class Error(BaseModel):
    """Every error answer: a code; never an echo of what was sent."""

    error: str = Field(description="unauthorized, forbidden, not_found, unavailable, ...")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidRequest(BaseModel):
    error: Literal["invalid_request"]
    detail: list[ErrorDetail]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, with their bodies."""
    described = {
        401: ("No valid bearer token", Error),
        403: ("The token may not read this (or not over plain HTTP: https_required)", Error),
        404: ("No such resource", Error),
        422: ("A filter, cursor or ID that is not valid", InvalidRequest),
        429: ("This token has as many searches under way as allowed; retry (Retry-After)", Error),
        500: ("The database refused the read for a reason of its own (logged)", Error),
        503: ("The database cannot answer now; retry (Retry-After)", Error),
    }
    return {
        status: {"description": described[status][0], "model": described[status][1]}
        for status in statuses
    }
