"""The sender's payloads, modelled once from its published webhook documentation.

Strict where it protects data, lenient where it would only lose it (docs/webhooks.md):
the provider's IDs and the credentials must be well-formed, else the delivery is refused
with 422; a descriptive field spelled unexpectedly is normalised or left empty, and the
repair is noted in the `warnings` list passed as validation context. Unknown extra fields
are tolerated and kept in the stored body.
"""

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)

from app.hashing import Hasher

# Longest text kept in a column (btree indexes refuse entries over about 2.7 KB).
TEXT_LIMIT = 4096
EMAIL_LIMIT = 320
SUBSCRIPTION_STATES = ("ACTIVE", "RENEWING", "PAST_DUE", "EXPIRED", "CANCELLED")
DOMAIN_STATES = ("ACTIVE", "RENEWAL_FAILED", "GRACE_PERIOD", "EXPIRED", "FAILED")
MAX_DEPTH = 254  # orjson writes no deeper
IGNORED_NO_ID = "stored as ignored: no recognisable {} in the payload"


def warn(info: ValidationInfo, message: str) -> None:
    """Note a repair in the `warnings` list parse_handled passes as context."""
    if isinstance(info.context, dict):
        info.context["warnings"].append(f"{info.field_name}: {message}")


def lenient_provider(value: Any, info: ValidationInfo) -> str | None:
    """workspaceType and serviceProvider spell the same two providers, in many variants."""
    if value is None:
        return None
    squashed = "".join(ch for ch in str(value).upper() if ch.isalnum())
    if squashed.startswith("GOOGLE") or squashed in {"GSUITE", "GWORKSPACE"}:
        return "GOOGLE"
    if squashed.startswith(("MICROSOFT", "OFFICE365", "OUTLOOK")) or squashed in {
        "M365",
        "O365",
        "MS",
        "MS365",
    }:
        return "MICROSOFT"
    warn(info, "not a known provider; left empty")
    return None


def lenient_money(value: Any, info: ValidationInfo) -> Decimal | None:
    """Money as a decimal of at most 4 places; float noise (0.30000000000000004) rounded."""
    if value is None:
        return None
    try:
        amount = Decimal(str(value))  # True reads "True": no amount either
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or not 0 <= amount < 10**10:
        warn(info, "not an amount of money; left empty")
        return None
    rounded = amount.quantize(Decimal("0.0001"))
    if rounded != amount:
        warn(info, "more than 4 decimal places; rounded")
    return rounded


def assume_utc(value: datetime) -> datetime:
    """A time without an offset means UTC, never the server's local time zone."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """A date or time as the sender writes them (with or without milliseconds), in UTC when
    no offset is given; None when it is empty or not a date."""
    try:
        parsed = _datetime.validate_python(value)
    except ValidationError:
        return None
    return assume_utc(parsed)


def lenient_time(value: Any, info: ValidationInfo) -> datetime | None:
    parsed = parse_time(value)
    if parsed is None and value is not None:
        warn(info, "empty or not a date; left empty")
    return parsed


# The validators below are module-level functions given their parameters by `partial`
# (not closures made at import), so that mutation testing reaches them.


def lenient(value: Any, info: ValidationInfo, *, adapter: TypeAdapter[Any], message: str) -> Any:
    """Take the value as `adapter` reads it; anything else is left empty, with a warning."""
    if value is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError:
        warn(info, message)
        return None


def lenient_text(value: Any, info: ValidationInfo, *, limit: int) -> str | None:
    if value is None or isinstance(value, str):
        text = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        warn(info, "a number where text was expected; kept as text")
        text = str(value)
    else:
        warn(info, "not text; left empty")
        return None
    if text is not None and len(text) > limit:
        warn(info, f"longer than {limit} characters; cut")
        return text[:limit]
    return text


def known_state(value: Any, states: tuple[str, ...]) -> str | None:
    """`past-due`, `Past Due` and `PAST_DUE` are one state; None when it is none of them."""
    if value is None:
        return None
    state = str(value).strip().upper().replace(" ", "_").replace("-", "_")
    return state if state in states else None


def lenient_state(value: Any, info: ValidationInfo, *, states: tuple[str, ...]) -> str | None:
    state = known_state(value, states)
    if state is None and value is not None:
        warn(info, "not a known state; the event's name decides")
    return state


_datetime: TypeAdapter[datetime] = TypeAdapter(datetime)
_count: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(ge=0, le=1_000_000)])
_flag: TypeAdapter[bool] = TypeAdapter(bool)

# Strict: the provider's IDs and the credentials.
Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Secret = Annotated[str, StringConstraints(max_length=TEXT_LIMIT)]
# Lenient: everything descriptive.
Text = Annotated[str | None, BeforeValidator(partial(lenient_text, limit=TEXT_LIMIT))]
Email = Annotated[str | None, BeforeValidator(partial(lenient_text, limit=EMAIL_LIMIT))]
Provider = Annotated[Literal["GOOGLE", "MICROSOFT"] | None, BeforeValidator(lenient_provider)]
Timestamp = Annotated[datetime | None, BeforeValidator(lenient_time)]
Money = Annotated[Decimal | None, BeforeValidator(lenient_money)]
Count = Annotated[
    int | None,
    BeforeValidator(partial(lenient, adapter=_count, message="not a count; left empty")),
]
Flag = Annotated[
    bool | None,
    BeforeValidator(partial(lenient, adapter=_flag, message="not true or false; left empty")),
]
SubscriptionState = Annotated[
    str | None, BeforeValidator(partial(lenient_state, states=SUBSCRIPTION_STATES))
]
DomainState = Annotated[str | None, BeforeValidator(partial(lenient_state, states=DOMAIN_STATES))]


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Owner(Wire):
    """Who placed the order: present on most events."""

    userId: Id | None = None
    userEmail: Email = None


class MailboxOrderSuccessData(Owner):
    subscriptionId: Id
    orderId: Id
    domainName: Id = Field(validation_alias=AliasChoices("domainName", "domain"))
    domainId: Id | None = None
    workspaceType: Provider = None
    creationTime: Timestamp = None
    expiryDate: Timestamp = None
    price: Money = None
    quantity: Count = None


class FailedMailboxSample(Wire):
    firstName: Text = None
    lastName: Text = None
    email: Email = None


class MailboxOrderFailedData(Owner):
    orderId: Id
    domain: Id = Field(validation_alias=AliasChoices("domain", "domainName"))
    subscriptionId: Id | None = None
    workspaceType: Provider = None
    mailboxDetails: FailedMailboxSample | None = None
    price: Money = None
    quantity: Count = None
    reason: Text = None


class SentCredentials(Wire):
    password: Secret | None = None
    appPassword: Secret | None = None
    authenticatorSecret: Secret | None = None


class CreatedMailbox(SentCredentials):
    mailboxId: Id
    email: Email = None
    firstName: Text = None
    lastName: Text = None
    userName: Text = None
    profilePicture: Text = None
    isAdmin: Flag = None
    creationTime: Timestamp = None
    expiryDate: Timestamp = None


class MailboxCreatedData(Owner):
    subscriptionId: Id
    domain: Id = Field(validation_alias=AliasChoices("domain", "domainName"))
    mailboxDetails: CreatedMailbox
    orderId: Id | None = None
    workspaceType: Provider = None
    finalUrl: Text = None
    price: Money = None


class UpdatedFields(Wire):
    firstName: Text = None
    lastName: Text = None
    userName: Text = None
    profilePicture: Text = None


class MailboxUpdatedData(Owner):
    mailboxId: Id
    updatedFields: UpdatedFields
    domain: Id | None = None
    email: Email = None
    workspaceType: Provider = None


class PrewarmedMailbox(SentCredentials):
    mailboxId: Id
    email: Email = None
    firstName: Text = None
    lastName: Text = None
    profilePicture: Text = None
    isAdmin: Flag = None
    warmingUpFrom: Timestamp = None
    expiryDate: Timestamp = None


class PrewarmedDomain(Wire):
    domain: Id
    subscriptionId: Id
    preWarmedUpMailboxes: list[PrewarmedMailbox] = Field(max_length=10_000)


class PrewarmupOrderSuccessData(Owner):
    orderId: Id
    mailboxDetails: list[PrewarmedDomain] = Field(min_length=1, max_length=1_000)
    serviceProvider: Provider = None


class FailedDomain(Wire):
    domain: Id
    reason: Text = None


class PrewarmupOrderFailedData(Owner):
    """Either per-domain `failedOrders`, or an order-level failure with only a `reason`."""

    orderId: Id
    failedOrders: list[FailedDomain] = Field(default=[], max_length=1_000)
    reason: Text = None
    serviceProvider: Provider = None


class SubscriptionData(Owner):
    """subscription.*: the sender documents these only in part, so every field may be missing."""

    subscriptionId: Id | None = None
    domainId: Id | None = None
    domain: Id | None = Field(None, validation_alias=AliasChoices("domain", "domainName"))
    workspaceType: Provider = None
    quantity: Count = None
    periodStart: Timestamp = None
    periodEnd: Timestamp = None
    autoRenew: Flag = None
    subscriptionStatus: SubscriptionState = None


class DomainData(Owner):
    """domain.*: only domain.order.success is documented; the rest is read by the same names."""

    domainId: Id | None = None
    domainName: Id | None = Field(None, validation_alias=AliasChoices("domainName", "domain"))
    orderId: Id | None = None
    creationTime: Timestamp = None
    expiryDate: Timestamp = None
    price: Money = None
    domainStatus: DomainState = Field(None, validation_alias=AliasChoices("domainStatus", "status"))


class MailboxStateData(SentCredentials):
    """mailbox.exported and mailbox.warmup.*: undocumented; the mailbox ID is looked for
    where the documented mailbox events keep it."""

    mailboxId: Id | None = None
    mailboxDetails: CreatedMailbox | None = None

    @property
    def mailbox_id(self) -> str | None:
        return self.mailboxId or (self.mailboxDetails.mailboxId if self.mailboxDetails else None)

    @property
    def credentials(self) -> SentCredentials:
        given = self.model_fields_set & {"password", "appPassword", "authenticatorSecret"}
        return self if given else (self.mailboxDetails or self)


class Envelope(Wire):
    # None only while the database is away: normalize_envelope derives it once it is back
    eventId: Id | None


class MailboxOrderSuccess(Envelope):
    event: Literal["mailbox.order.success"]
    data: MailboxOrderSuccessData


class MailboxOrderFailed(Envelope):
    event: Literal["mailbox.order.failed"]
    data: MailboxOrderFailedData


class MailboxCreated(Envelope):
    event: Literal["mailbox.created"]
    data: MailboxCreatedData


class MailboxUpdated(Envelope):
    event: Literal["mailbox.updated"]
    data: MailboxUpdatedData


class PrewarmupOrderSuccess(Envelope):
    event: Literal["prewarmup.order.success"]
    data: PrewarmupOrderSuccessData


class PrewarmupOrderFailed(Envelope):
    event: Literal["prewarmup.order.failed"]
    data: PrewarmupOrderFailedData


SUBSCRIPTION_EVENTS = {
    # event: the state it implies when data.subscriptionStatus is absent
    "subscription.renewing": "RENEWING",
    "subscription.renewal.success": "ACTIVE",
    "subscription.renewal.failed": "PAST_DUE",
    "subscription.past_due": "PAST_DUE",
    "subscription.expired": "EXPIRED",
    "subscription.cancelled": "CANCELLED",
    "subscription.updated": None,
}
DOMAIN_EVENTS = {
    "domain.order.success": "ACTIVE",
    "domain.order.failed": "FAILED",
    "domain.renewal.success": "ACTIVE",
    "domain.renewal.failed": "RENEWAL_FAILED",
    "domain.grace_period": "GRACE_PERIOD",
    "domain.expired": "EXPIRED",
}
MAILBOX_STATE_EVENTS = {
    # event: the warmup status it sets
    "mailbox.exported": None,
    "mailbox.warmup.started": "started",
    "mailbox.warmup.removed": "removed",
}


class SubscriptionEvent(Envelope):
    event: Literal[
        "subscription.renewing",
        "subscription.renewal.success",
        "subscription.renewal.failed",
        "subscription.past_due",
        "subscription.expired",
        "subscription.cancelled",
        "subscription.updated",
    ]
    data: SubscriptionData

    @property
    def state(self) -> str | None:
        return self.data.subscriptionStatus or SUBSCRIPTION_EVENTS[self.event]


class DomainEvent(Envelope):
    event: Literal[
        "domain.order.success",
        "domain.order.failed",
        "domain.renewal.success",
        "domain.renewal.failed",
        "domain.grace_period",
        "domain.expired",
    ]
    data: DomainData

    @property
    def state(self) -> str:
        return self.data.domainStatus or DOMAIN_EVENTS[self.event]


class MailboxStateEvent(Envelope):
    event: Literal["mailbox.exported", "mailbox.warmup.started", "mailbox.warmup.removed"]
    data: MailboxStateData


HandledEvent = Annotated[
    MailboxOrderSuccess
    | MailboxOrderFailed
    | MailboxCreated
    | MailboxUpdated
    | PrewarmupOrderSuccess
    | PrewarmupOrderFailed
    | SubscriptionEvent
    | DomainEvent
    | MailboxStateEvent,
    Field(discriminator="event"),
]
HANDLED_EVENTS = frozenset(
    {
        "mailbox.order.success",
        "mailbox.order.failed",
        "mailbox.created",
        "mailbox.updated",
        "prewarmup.order.success",
        "prewarmup.order.failed",
        *SUBSCRIPTION_EVENTS,
        *DOMAIN_EVENTS,
        *MAILBOX_STATE_EVENTS,
    }
)
handled_event_adapter: TypeAdapter[HandledEvent] = TypeAdapter(HandledEvent)


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def normalize_envelope(value: dict[str, Any], hasher: Hasher | None) -> dict[str, Any]:
    """`eventType` is a synonym of `event`; with no `eventId`, a stable one is derived from
    the content (keyed: app/hashing.py), so the sender's retries still dedupe. Without the
    hasher (the database away) it stays None until the spool's drainer applies it. Raises
    ValueError (a safe message)."""
    event = value.get("event", value.get("eventType"))
    if not isinstance(event, str) or not event.strip() or len(event) > 256:
        raise ValueError("'event' (or 'eventType') must be a non-empty string of at most 256")
    event_id = value.get("eventId")
    if event_id is None:
        if hasher is None:
            return value | {"event": event, "eventId": None}
        event_id = hasher.event_id(canonical(value))
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > 256:
        raise ValueError("'eventId' must be a non-empty string of at most 256 characters")
    return value | {"event": event, "eventId": event_id}


def writable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def parse_envelope(raw: bytes, hasher: Hasher | None) -> dict[str, Any]:
    """The envelope every event shares, normalised; raises ValueError with a message safe
    to send back (it never quotes the body)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON (UTF-8)") from None
    if not isinstance(value, dict):
        raise ValueError("body must be a JSON object")
    # The parser takes 1,024 levels, but what is stored must be written again (canonical
    # form, redacted copy), which orjson stops at 254: refuse that up front, not as a 500
    # later. Only a body with that many brackets can be that deep; most skip the check.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and not writable(value):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    # JSON can only carry a NUL as the escape \u0000: without one, no walk is needed
    if b"\\u0000" in raw and _has_nul(value):
        raise ValueError("strings must not contain NUL characters")
    return normalize_envelope(value, hasher)


def parse_handled(envelope: dict[str, Any], warnings: list[str]) -> HandledEvent | None:
    """Validate a handled event (raises pydantic.ValidationError); None for an event type
    not handled, or one that names no resource this service keeps (either is stored as
    ignored)."""
    if envelope["event"] not in HANDLED_EVENTS:
        return None
    model = handled_event_adapter.validate_python(envelope, context={"warnings": warnings})
    missing = None
    if isinstance(model, SubscriptionEvent) and not model.data.subscriptionId:
        missing = "subscriptionId"
    elif isinstance(model, DomainEvent) and not (model.data.domainId or model.data.domainName):
        missing = "domainId or domainName"
    elif isinstance(model, MailboxStateEvent) and not model.data.mailbox_id:
        missing = "mailboxId"
    if missing:
        warnings.append(IGNORED_NO_ID.format(missing))
        return None
    return model


def validation_details(error: ValidationError) -> list[dict[str, Any]]:
    """loc/msg/type only: pydantic's `input` and `ctx` would echo what was sent."""
    return [
        {"loc": list(item["loc"][1:]), "msg": item["msg"], "type": item["type"]}
        for item in error.errors()
    ]
