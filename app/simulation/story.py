"""`simulate`'s default: a story the dashboard can tell, dated around today.

Five agencies order Google and Microsoft mailboxes on domains of their own. Orders
succeed, fail or partly fail with the sender's reasons; subscriptions renew this week, fall
past due, fail to renew or are cancelled; domains enter their grace period; mailboxes are
warmed up, exported and renamed. Each agency's deliveries go in the order the sender would
send them, with the odd retry. Payload shapes follow app/receiving/payloads.py.
"""

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from app.simulation.traffic import envelope, provider_id

Payload = dict[str, Any]


def when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Agency:
    """One customer of the partner, and the deliveries its story makes, in sending order."""

    name: str
    email: str
    today: datetime
    user_id: str = field(default_factory=provider_id)
    sent: list[Payload] = field(default_factory=list)

    def send(self, event: str, data: dict[str, Any]) -> Payload:
        payload = envelope(event, {"userId": self.user_id, "userEmail": self.email} | data)
        self.sent.append(payload)
        return payload

    def retry_last(self) -> None:
        """The sender retries a delivery whose answer it missed: the same eventId again."""
        self.sent.append(self.sent[-1])

    def days(self, n: float) -> str:
        return when(self.today + timedelta(days=n))


@dataclass
class Subscription:
    """A domain's mailboxes under one subscription, as a standard order made them."""

    agency: Agency
    domain: str
    provider: str
    subscription_id: str = field(default_factory=provider_id)
    mailbox_ids: list[str] = field(default_factory=list)
    quantity: int = 0

    @property
    def domain_id(self) -> str:
        """One domain, one ID, whichever run of the story names it."""
        return hashlib.sha256(self.domain.encode()).hexdigest()[:28].upper()


def mailbox_order(
    agency: Agency,
    domain: str,
    provider: str,
    people: list[str],
    *,
    ends_in: float,
    domain_expires_in: float | None = None,
) -> Subscription:
    """domain.order.success, mailbox.order.success, then one mailbox.created each. The
    domain was registered for a year; by default it has most of that year left."""
    sub = Subscription(agency, domain, provider, quantity=len(people))
    order_id, started = provider_id(), agency.days(ends_in - 30)
    agency.send(
        "domain.order.success",
        {
            "domainId": sub.domain_id,
            "domainName": domain,
            "orderId": order_id,
            "creationTime": started,
            "expiryDate": agency.days(
                ends_in + 335 if domain_expires_in is None else domain_expires_in
            ),
            "price": 12.98,
        },
    )
    agency.send(
        "mailbox.order.success",
        {
            "domainId": sub.domain_id,
            "domainName": domain,
            "subscriptionId": sub.subscription_id,
            "orderId": order_id,
            "workspaceType": provider,
            "creationTime": started,
            "expiryDate": agency.days(ends_in),
            "price": 3.5 if provider == "GOOGLE" else 3.25,
            "quantity": len(people),
        },
    )
    for person in people:
        sub.mailbox_ids.append(created(agency, sub, order_id, person, started, ends_in))
    return sub


def created(
    agency: Agency, sub: Subscription, order_id: str, person: str, started: str, ends_in: float
) -> str:
    first, last = person.split()
    box: dict[str, Any] = {
        "mailboxId": provider_id(),
        "firstName": first,
        "lastName": last,
        "email": f"{first.lower()}.{last.lower()}@{sub.domain}",
        "isAdmin": False,
        "creationTime": started,
        "expiryDate": agency.days(ends_in),
    }
    credential = "appPassword" if sub.provider == "GOOGLE" else "password"
    box[credential] = secrets.token_urlsafe(12)
    data: dict[str, Any] = {
        "domain": sub.domain,
        "subscriptionId": sub.subscription_id,
        "orderId": order_id,
        "workspaceType": sub.provider,
        "mailboxDetails": box,
        "price": 3.5,
    }
    if sub.provider == "MICROSOFT":
        data["finalUrl"] = f"https://login.microsoftonline.com/{sub.domain}/oauth2/authorize"
    agency.send("mailbox.created", data)
    return str(box["mailboxId"])


def lifecycle(
    sub: Subscription, event: str, status: str, *, ends_in: float, auto_renew: bool = True
) -> None:
    """A subscription.* event for the period that ends `ends_in` days from today."""
    sub.agency.send(
        event,
        {
            "subscriptionId": sub.subscription_id,
            "domainId": sub.domain_id,
            "domain": sub.domain,
            "workspaceType": sub.provider,
            "quantity": sub.quantity,
            "periodStart": sub.agency.days(ends_in - 30),
            "periodEnd": sub.agency.days(ends_in),
            "autoRenew": auto_renew,
            "subscriptionStatus": status,
        },
    )


def domain_event(sub: Subscription, event: str, status: str, *, expires_in: float) -> None:
    sub.agency.send(
        event,
        {
            "domainId": sub.domain_id,
            "domainName": sub.domain,
            "expiryDate": sub.agency.days(expires_in),
            "domainStatus": status,
        },
    )


def mailbox_state(sub: Subscription, event: str, mailbox_id: str) -> None:
    sub.agency.send(
        event, {"mailboxId": mailbox_id, "domain": sub.domain, "workspaceType": sub.provider}
    )


def failed_mailbox_order(agency: Agency, domain: str, provider: str, reason: str) -> None:
    agency.send(
        "mailbox.order.failed",
        {
            "orderId": provider_id(),
            "domain": domain,
            "workspaceType": provider,
            "mailboxDetails": {"firstName": "Sales", "lastName": "Team", "email": "sales"},
            "price": 3.5,
            "quantity": 3,
            "reason": reason,
        },
    )


def prewarmup(
    agency: Agency, provider: str, succeeded: dict[str, list[str]], failed: dict[str, str]
) -> None:
    """A prewarmup order: each domain its own outcome (success, or failure with reason)."""
    order_id = provider_id()
    if succeeded:
        groups = [
            {
                "domain": domain,
                "subscriptionId": provider_id(),
                "preWarmedUpMailboxes": [prewarmed(agency, domain, p) for p in people],
            }
            for domain, people in succeeded.items()
        ]
        data = {"orderId": order_id, "serviceProvider": provider, "mailboxDetails": groups}
        agency.send("prewarmup.order.success", data)
    if failed:
        failures = [{"domain": d, "reason": r} for d, r in failed.items()]
        data = {"orderId": order_id, "serviceProvider": provider, "failedOrders": failures}
        agency.send("prewarmup.order.failed", data)


def prewarmed(agency: Agency, domain: str, person: str) -> dict[str, Any]:
    first, last = person.split()
    return {
        "mailboxId": provider_id(),
        "email": f"{first.lower()}@{domain}",
        "firstName": first,
        "lastName": last,
        "password": secrets.token_urlsafe(12),
        "appPassword": secrets.token_urlsafe(12),
        "authenticatorSecret": secrets.token_hex(10).upper(),
        "isAdmin": False,
        "warmingUpFrom": agency.days(-21),
        "expiryDate": agency.days(44),
    }


def northwind(today: datetime) -> Agency:
    """Google and Microsoft on separate domains; the Google one renews in three days."""
    agency = Agency("Northwind Outreach", "anna.berg@northwindoutreach.com", today)
    google = mailbox_order(
        agency, "northwind-mail.com", "GOOGLE", ["Anna Berg", "Jonas Holm", "Elin Sand"],
        ends_in=3,
    )  # fmt: skip
    agency.retry_last()
    microsoft = mailbox_order(
        agency, "northwind365.com", "MICROSOFT", ["Anna Berg", "Oskar Lind"], ends_in=19
    )
    lifecycle(google, "subscription.renewing", "RENEWING", ends_in=3)
    lifecycle(microsoft, "subscription.updated", "ACTIVE", ends_in=19)
    for mailbox_id in google.mailbox_ids:
        mailbox_state(google, "mailbox.warmup.started", mailbox_id)
    mailbox_state(google, "mailbox.exported", google.mailbox_ids[0])
    return agency


def brightline(today: datetime) -> Agency:
    """A prewarmup order with one domain failed; a renewal that failed; a domain in grace."""
    agency = Agency("Brightline Growth", "marcus.lee@brightlinegrowth.io", today)
    prewarmup(
        agency,
        "GOOGLE",
        {
            "brightline-reach.com": ["Marcus Lee", "Dana Ortiz"],
            "getbrightline.net": ["Marcus Lee", "Sam Patel"],
        },
        {"brightlinehq.co": "Pre-warmed mailboxes not available"},
    )
    sub = mailbox_order(
        agency, "brightline-mail.com", "GOOGLE", ["Dana Ortiz"], ends_in=-2, domain_expires_in=-1
    )
    lifecycle(sub, "subscription.renewing", "RENEWING", ends_in=-2)
    lifecycle(sub, "subscription.renewal.failed", "PAST_DUE", ends_in=-2)
    agency.retry_last()
    domain_event(sub, "domain.grace_period", "GRACE_PERIOD", expires_in=-1)
    return agency


def kestrel(today: datetime) -> Agency:
    """An order refused for an unverified domain; a subscription cancelled."""
    agency = Agency("Kestrel Leads", "priya.nair@kestrelleads.co", today)
    failed_mailbox_order(agency, "kestrel-leads.net", "GOOGLE", "Domain not verified")
    sub = mailbox_order(
        agency,
        "kestrelmail.co",
        "MICROSOFT",
        ["Priya Nair", "Ravi Shah"],
        ends_in=9,
        domain_expires_in=9,
    )
    lifecycle(sub, "subscription.cancelled", "CANCELLED", ends_in=9, auto_renew=False)
    domain_event(sub, "domain.renewal.failed", "RENEWAL_FAILED", expires_in=9)
    return agency


def harbor(today: datetime) -> Agency:
    """A prewarmup order failed as a whole; a renewal that went through; warmup edits."""
    agency = Agency("Harbor & Pine", "tom.walsh@harborandpine.com", today)
    agency.send(
        "prewarmup.order.failed",
        {
            "orderId": provider_id(),
            "serviceProvider": "MICROSOFT",
            "reason": "Insufficient wallet balance",
        },
    )
    sub = mailbox_order(
        agency, "harborpine-outreach.com", "GOOGLE", ["Tom Walsh", "Mia Chen", "Leo Park"],
        ends_in=1,
    )  # fmt: skip
    lifecycle(sub, "subscription.renewing", "RENEWING", ends_in=1)
    lifecycle(sub, "subscription.renewal.success", "ACTIVE", ends_in=31)
    agency.send(
        "mailbox.updated",
        {
            "mailboxId": sub.mailbox_ids[1],
            "domain": sub.domain,
            "email": f"mia.chen@{sub.domain}",
            "workspaceType": "GOOGLE",
            "updatedFields": {"firstName": "Mia", "lastName": "Chen-Walsh"},
        },
    )
    mailbox_state(sub, "mailbox.warmup.started", sub.mailbox_ids[0])
    mailbox_state(sub, "mailbox.warmup.removed", sub.mailbox_ids[2])
    return agency


def summit(today: datetime) -> Agency:
    """Auto-renew switched off, ending in five days; a subscription already past due."""
    agency = Agency("Summit Sales Co", "leah.kim@summitsales.co", today)
    sub = mailbox_order(
        agency, "summitsales-team.com", "MICROSOFT", ["Leah Kim", "Noah Reed"], ends_in=5
    )
    lifecycle(sub, "subscription.updated", "ACTIVE", ends_in=5, auto_renew=False)
    late = mailbox_order(agency, "trysummit.io", "GOOGLE", ["Leah Kim"], ends_in=-4)
    lifecycle(late, "subscription.past_due", "PAST_DUE", ends_in=-4)
    prewarmup(agency, "MICROSOFT", {"summit-warm.com": ["Ava Stone", "Eli Ward"]}, {})
    return agency


CHAPTERS = (northwind, brightline, kestrel, harbor, summit)


def story(today: datetime | None = None) -> list[Agency]:
    """Every agency with its deliveries, dated around `today` (now, by default)."""
    moment = today or datetime.now(UTC)
    return [chapter(moment) for chapter in CHAPTERS]


WHAT_TO_SEE = (
    "renewals at risk: renewing in 1 to 5 days, two past due (one renewal failed), one\n"
    "  cancelled, one with auto-renew off, a domain in its grace period\n"
    "orders: one prewarmup partially failed, one failed as a whole, one standard order\n"
    "  refused (Domain not verified)\n"
    "mailboxes: warmup started and removed, an export, a rename"
)
