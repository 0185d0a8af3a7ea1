"""The sender's payloads, modelled once from its documentation (provider-docs/).

Unknown extra fields are tolerated and kept in the stored body. Only the provider's IDs
are required: everything descriptive is optional, since the docs' examples disagree.
"""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
)

GOOGLE_NAMES = {"GOOGLE", "GOOGLE WORKSPACE", "GSUITE", "G SUITE", "GOOGLEWORKSPACE"}
MICROSOFT_NAMES = {"MICROSOFT", "MICROSOFT 365", "MICROSOFT365", "M365", "O365", "OFFICE365", "MS"}


def normalize_provider(value: object) -> object:
    """workspaceType and serviceProvider spell the same two providers; accept their variants."""
    if not isinstance(value, str):
        return value
    upper = value.strip().upper()
    if upper in GOOGLE_NAMES:
        return "GOOGLE"
    if upper in MICROSOFT_NAMES:
        return "MICROSOFT"
    return upper


def assume_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4096)]
Provider = Annotated[Literal["GOOGLE", "MICROSOFT"], BeforeValidator(normalize_provider)]
Timestamp = Annotated[datetime, AfterValidator(assume_utc)]
Money = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=4, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=1_000_000)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class MailboxOrderSuccessData(Wire):
    subscriptionId: Id
    orderId: Id
    domainName: Id = Field(validation_alias=AliasChoices("domainName", "domain"))
    domainId: Id | None = None
    userId: Id | None = None
    userEmail: Text | None = None
    workspaceType: Provider | None = None
    creationTime: Timestamp | None = None
    expiryDate: Timestamp | None = None
    price: Money | None = None
    quantity: Count | None = None


class FailedMailboxSample(Wire):
    firstName: Text | None = None
    lastName: Text | None = None
    email: Text | None = None


class MailboxOrderFailedData(Wire):
    orderId: Id
    domain: Id = Field(validation_alias=AliasChoices("domain", "domainName"))
    subscriptionId: Id | None = None
    userId: Id | None = None
    userEmail: Text | None = None
    workspaceType: Provider | None = None
    mailboxDetails: FailedMailboxSample | None = None
    price: Money | None = None
    quantity: Count | None = None
    reason: Text | None = None


class CreatedMailbox(Wire):
    mailboxId: Id
    email: Text | None = None
    firstName: Text | None = None
    lastName: Text | None = None
    userName: Text | None = None
    profilePicture: Text | None = None
    password: Text | None = None
    appPassword: Text | None = None
    authenticatorSecret: Text | None = None
    isAdmin: bool | None = None
    creationTime: Timestamp | None = None
    expiryDate: Timestamp | None = None


class MailboxCreatedData(Wire):
    subscriptionId: Id
    domain: Id = Field(validation_alias=AliasChoices("domain", "domainName"))
    mailboxDetails: CreatedMailbox
    orderId: Id | None = None
    userId: Id | None = None
    userEmail: Text | None = None
    workspaceType: Provider | None = None
    finalUrl: Text | None = None
    price: Money | None = None


class UpdatedFields(Wire):
    firstName: Text | None = None
    lastName: Text | None = None
    userName: Text | None = None
    profilePicture: Text | None = None


class MailboxUpdatedData(Wire):
    mailboxId: Id
    updatedFields: UpdatedFields
    domain: Id | None = None
    email: Text | None = None
    userId: Id | None = None
    userEmail: Text | None = None
    workspaceType: Provider | None = None


class PrewarmedMailbox(Wire):
    mailboxId: Id
    email: Text | None = None
    firstName: Text | None = None
    lastName: Text | None = None
    profilePicture: Text | None = None
    password: Text | None = None
    appPassword: Text | None = None
    authenticatorSecret: Text | None = None
    isAdmin: bool | None = None
    warmingUpFrom: Timestamp | None = None
    expiryDate: Timestamp | None = None


class PrewarmedDomain(Wire):
    domain: Id
    subscriptionId: Id
    preWarmedUpMailboxes: list[PrewarmedMailbox] = Field(max_length=10_000)


class PrewarmupOrderSuccessData(Wire):
    orderId: Id
    mailboxDetails: list[PrewarmedDomain] = Field(min_length=1, max_length=1_000)
    userId: Id | None = None
    userEmail: Text | None = None
    serviceProvider: Provider | None = None


class FailedDomain(Wire):
    domain: Id
    reason: Text | None = None


class PrewarmupOrderFailedData(Wire):
    orderId: Id
    failedOrders: list[FailedDomain] = Field(min_length=1, max_length=1_000)
    userId: Id | None = None
    userEmail: Text | None = None
    serviceProvider: Provider | None = None


class MailboxOrderSuccess(Wire):
    event: Literal["mailbox.order.success"]
    eventId: Id
    data: MailboxOrderSuccessData


class MailboxOrderFailed(Wire):
    event: Literal["mailbox.order.failed"]
    eventId: Id
    data: MailboxOrderFailedData


class MailboxCreated(Wire):
    event: Literal["mailbox.created"]
    eventId: Id
    data: MailboxCreatedData


class MailboxUpdated(Wire):
    event: Literal["mailbox.updated"]
    eventId: Id
    data: MailboxUpdatedData


class PrewarmupOrderSuccess(Wire):
    event: Literal["prewarmup.order.success"]
    eventId: Id
    data: PrewarmupOrderSuccessData


class PrewarmupOrderFailed(Wire):
    event: Literal["prewarmup.order.failed"]
    eventId: Id
    data: PrewarmupOrderFailedData


HandledEvent = Annotated[
    MailboxOrderSuccess
    | MailboxOrderFailed
    | MailboxCreated
    | MailboxUpdated
    | PrewarmupOrderSuccess
    | PrewarmupOrderFailed,
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
    }
)
handled_event_adapter: TypeAdapter[HandledEvent] = TypeAdapter(HandledEvent)


def parse_handled(envelope: dict[str, Any]) -> HandledEvent:
    """Validate a handled event; raises pydantic.ValidationError."""
    return handled_event_adapter.validate_python(envelope)
