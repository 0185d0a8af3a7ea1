"""What each event does, as rows for the upserts declared in app/recording/merge.py.

The credentials of a mailbox.created or mailbox state event are sealed here, as one token
(`credentials`), into its row. A prewarmup order's mailboxes (a thousand at a time) are
the exception: they are carried with their credentials as given (`Effects.mailboxes`) and
sealed only when written (app/recording/record.py), each part while the database runs the
part before.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from app.crypto import Vault
from app.models import CREDENTIAL_COLUMNS
from app.receiving import payloads
from app.recording import merge
from app.recording.merge import Upsert

Row = dict[str, Any]
Unsealed = tuple[Row, payloads.SentCredentials]  # a mailbox row, its credentials not yet encrypted


def version(when: datetime, event_id: str, content: bytes = b"") -> str:
    """Sorts as text (C collation) by time, then eventId, then content (a keyed hash, for
    two contents of one eventId sent at one time): 'the later event wins', and a tie is
    decided the same way whatever the order the two were applied in."""
    tiebreak = f"|{content[:8].hex()}" if content else ""
    return f"{round(when.timestamp() * 1_000_000):020d}|{event_id}{tiebreak}"


@dataclass
class Effects:
    """What one event does: rows for upserts (each table once), mailbox snapshots whose
    credentials are still to be encrypted (merge.PREWARMED_SNAPSHOT, written after the
    upserts), then, for an order, its derived values recomputed (merge.DERIVE_ORDER)."""

    upserts: list[tuple[Upsert, list[Row]]] = field(default_factory=list)
    mailboxes: list[Unsealed] = field(default_factory=list)
    order_id: str | None = None
    subscriptions: list[str] = field(default_factory=list)

    def add(self, statement: Upsert, rows: list[Row]) -> None:
        if rows:
            self.upserts.append((statement, rows))


def owner_row(user_id: str | None, user_email: str | None, provider: str | None) -> Row:
    """Whose it is, as every order and mailbox event says."""
    return {"user_id": user_id, "user_email": user_email, "provider": provider}


def order_row(order_id: str, kind: str, owner: Row) -> Row:
    # The status is derived from the order's domains right after (merge.DERIVE_ORDER).
    return {"order_id": order_id, "kind": kind, "status": "succeeded"} | owner


def credentials(vault: Vault, given: payloads.SentCredentials) -> dict[str, bytes | None]:
    """The credentials an event carries sealed as one token, in each carried one's column."""
    sealed = vault.seal(
        {
            "password": given.password,
            "app_password": given.appPassword,
            "authenticator_secret": given.authenticatorSecret,
        }
    )
    return {CREDENTIAL_COLUMNS[name]: token for name, token in sealed.items()}


# --- standard mailbox orders ----------------------------------------------------------


def effects_of_mailbox_order(
    effects: Effects,
    model: payloads.MailboxOrderSuccess | payloads.MailboxOrderFailed,
    version: str,
) -> None:
    data = model.data
    succeeded = isinstance(data, payloads.MailboxOrderSuccessData)
    domain = data.domainName if isinstance(data, payloads.MailboxOrderSuccessData) else data.domain
    owner = owner_row(data.userId, data.userEmail, data.workspaceType)
    if data.subscriptionId:
        sub: Row = {"subscription_id": data.subscriptionId, "domain": domain, "source": "standard"}
        sub |= owner | {"order_id": data.orderId, "status": "active" if succeeded else "failed"}
        if isinstance(data, payloads.MailboxOrderSuccessData):
            sub |= {"domain_id": data.domainId, "expiry_date": data.expiryDate}
            sub |= {"quantity": data.quantity, "price": data.price}  # a new one's, as derived
            effects.add(merge.SUBSCRIPTION_ORDER_SUCCEEDED, [sub])
        else:
            effects.add(merge.SUBSCRIPTION_ORDER_FAILED, [sub])
    effects.add(merge.ORDER, [order_row(data.orderId, "mailbox", owner)])
    outcome: dict[str, Any] = {
        "order_id": data.orderId,
        "domain": domain,
        "subscription_id": data.subscriptionId,
        "status": "succeeded" if succeeded else "failed",
    }
    if isinstance(data, payloads.MailboxOrderSuccessData):
        outcome |= {"quantity": data.quantity, "price": data.price}
        outcome["succeeded_version"] = version
    else:
        outcome["reason"] = data.reason
    effects.add(merge.ORDER_DOMAIN, [outcome])
    effects.order_id = data.orderId
    if succeeded and data.subscriptionId:
        effects.subscriptions = [data.subscriptionId]


def effects_of_mailbox_created(
    effects: Effects, model: payloads.MailboxCreated, vault: Vault
) -> None:
    data, box = model.data, model.data.mailboxDetails
    owner = owner_row(data.userId, data.userEmail, data.workspaceType)
    common: Row = {
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "source": "standard",
    }
    common |= owner | {"order_id": data.orderId, "expiry_date": box.expiryDate}
    effects.add(merge.SUBSCRIPTION_MAILBOX_CREATED, [common | {"status": "active"}])
    mailbox = common | {
        "mailbox_id": box.mailboxId,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "user_name": box.userName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "creation_time": box.creationTime,
        "price": data.price,
        "final_url": data.finalUrl,
    }
    effects.add(merge.MAILBOX_SNAPSHOT, [mailbox | credentials(vault, box)])


def effects_of_mailbox_updated(
    effects: Effects, model: payloads.MailboxUpdated, version: str
) -> None:
    data = model.data
    given = data.updatedFields.model_fields_set & set(UPDATED_FIELDS)
    edits = {UPDATED_FIELDS[f]: getattr(data.updatedFields, f) for f in sorted(given)}
    row = {
        "mailbox_id": data.mailboxId,
        "domain": data.domain,
        "email": data.email,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        "field_versions": orjson.dumps({c: version for c in edits}).decode(),
    }
    effects.add(merge.mailbox_edit(tuple(edits)), [row | edits])


UPDATED_FIELDS = dict(zip(payloads.UpdatedFields.model_fields, merge.EDITABLE, strict=True))


def effects_of_mailbox_state(
    effects: Effects,
    model: payloads.MailboxStateEvent,
    vault: Vault,
    version: str,
    when: datetime,
) -> None:
    """mailbox.exported and mailbox.warmup.*: the warmup status and any credentials carried."""
    data = model.data
    given = credentials(vault, data.credentials)
    edits: dict[str, Any] = {c: v for c, v in given.items() if v is not None}
    warmup = payloads.MAILBOX_STATE_EVENTS[model.event]
    if warmup:
        edits["warmup_status"] = warmup
    row = {
        "mailbox_id": data.mailbox_id,
        "exported_at": when if model.event == "mailbox.exported" else None,
        "field_versions": orjson.dumps({c: version for c in edits}).decode(),
    }
    effects.add(merge.mailbox_edit(tuple(sorted(edits))), [row | edits])


# --- prewarmup orders -----------------------------------------------------------------


def effects_of_prewarmup_success(
    effects: Effects, model: payloads.PrewarmupOrderSuccess, version: str
) -> None:
    data = model.data
    owner = owner_row(data.userId, data.userEmail, data.serviceProvider)
    effects.add(merge.ORDER, [order_row(data.orderId, "prewarmup", owner)])
    subs, outcomes = [], []
    for group in data.mailboxDetails:
        common: Row = {"subscription_id": group.subscriptionId, "domain": group.domain}
        common |= owner | {"source": "prewarmed", "order_id": data.orderId}
        expiries = [b.expiryDate for b in group.preWarmedUpMailboxes if b.expiryDate]
        subs.append(
            common
            | {"status": "active", "expiry_date": max(expiries, default=None)}
            | {"quantity": len(group.preWarmedUpMailboxes)}  # a new one's, as derived
        )
        effects.mailboxes += [(_prewarmed(common, box), box) for box in group.preWarmedUpMailboxes]
        outcomes.append(
            {
                "order_id": data.orderId,
                "domain": group.domain,
                "subscription_id": group.subscriptionId,
                "status": "succeeded",
                "quantity": len(group.preWarmedUpMailboxes),
                "succeeded_version": version,
            }
        )
    effects.add(merge.SUBSCRIPTION_ORDER_SUCCEEDED, subs)
    effects.add(merge.ORDER_DOMAIN, outcomes)
    effects.order_id = data.orderId
    effects.subscriptions = sorted({g.subscriptionId for g in data.mailboxDetails})


def _prewarmed(common: dict[str, Any], box: payloads.PrewarmedMailbox) -> dict[str, Any]:
    return common | {
        "mailbox_id": box.mailboxId,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "warming_up_from": box.warmingUpFrom,
        "expiry_date": box.expiryDate,
    }


def effects_of_prewarmup_failed(effects: Effects, model: payloads.PrewarmupOrderFailed) -> None:
    data = model.data
    owner = owner_row(data.userId, data.userEmail, data.serviceProvider)
    order = order_row(data.orderId, "prewarmup", owner)
    if not data.failedOrders:  # an order-level failure
        order["failure_reason"] = data.reason or "order failed"
    effects.add(merge.ORDER, [order])
    outcomes = [
        {"order_id": data.orderId, "domain": f.domain, "status": "failed", "reason": f.reason}
        for f in data.failedOrders
    ]
    effects.add(merge.ORDER_DOMAIN, outcomes)
    effects.order_id = data.orderId


# --- subscription and domain lifecycles -----------------------------------------------


def effects_of_subscription(
    effects: Effects, model: payloads.SubscriptionEvent, version: str, when: datetime
) -> None:
    data = model.data
    failed = model.event == "subscription.renewal.failed"
    succeeded = model.event == "subscription.renewal.success"
    row = {
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "domain_id": data.domainId,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        "status": "active",
        "subscription_status": model.state,
        "period_start": data.periodStart,
        "period_end": data.periodEnd,
        "auto_renew": data.autoRenew,
        "lifecycle_quantity": data.quantity,
        "lifecycle_version": version,
        "lifecycle_source": "event",
        "expiry_date": data.periodEnd,
        "renewal_failed_at": when if failed else None,
        "renewal_failed_period_end": data.periodEnd if failed else None,
        "renewal_succeeded_at": when if succeeded else None,
    }
    effects.add(merge.SUBSCRIPTION_LIFECYCLE, [row])


def effects_of_domain(effects: Effects, model: payloads.DomainEvent, version: str) -> None:
    data = model.data
    row = {
        "domain_id": data.domainId,
        "name": data.domainName,
        "status": model.state,
        "expiry_date": data.expiryDate,
        "version": version,
    }
    statement = merge.DOMAIN_BY_ID if data.domainId else merge.DOMAIN_BY_NAME
    effects.add(statement, [row])


def of(model: payloads.HandledEvent, *, vault: Vault, when: datetime, version: str) -> Effects:
    """What one validated event does, as rows for the merge rules' upserts: `when` is its
    time, `version` its place among events (see version)."""
    result = Effects()
    match model:
        case payloads.MailboxOrderSuccess() | payloads.MailboxOrderFailed():
            effects_of_mailbox_order(result, model, version)
        case payloads.MailboxCreated():
            effects_of_mailbox_created(result, model, vault)
        case payloads.MailboxUpdated():
            effects_of_mailbox_updated(result, model, version)
        case payloads.MailboxStateEvent():
            effects_of_mailbox_state(result, model, vault, version, when)
        case payloads.PrewarmupOrderSuccess():
            effects_of_prewarmup_success(result, model, version)
        case payloads.PrewarmupOrderFailed():
            effects_of_prewarmup_failed(result, model)
        case payloads.SubscriptionEvent():
            effects_of_subscription(result, model, version, when)
        case payloads.DomainEvent():
            effects_of_domain(result, model, version)
    return result
