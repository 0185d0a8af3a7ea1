"""Realistic sender payloads with fresh IDs and unique, searchable secret values.

Used by `simulate` to load a deployment and by the tests to build their deliveries.
"""

import random
import secrets
import string
from typing import Any

ALPHABET = string.ascii_uppercase + string.digits
CANARY_PREFIX = "canary-"


def provider_id() -> str:
    return "".join(random.choices(ALPHABET, k=28))


def canary(kind: str) -> str:
    """A credential value no code path could produce by chance: easy to search for."""
    return f"{CANARY_PREFIX}{kind}-{secrets.token_hex(6)}"


def iso(day: int = 8, *, millis: bool = False) -> str:
    return f"2025-03-{day:02d}T23:59:59.641Z" if millis else f"2025-03-{day:02d}T23:59:59Z"


def mailbox_order_success(**data: Any) -> dict[str, Any]:
    body = {
        "domainId": provider_id(),
        "domainName": f"{provider_id().lower()[:10]}.com",
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "subscriptionId": provider_id(),
        "orderId": provider_id(),
        "workspaceType": "GOOGLE",
        "creationTime": "2024-03-08T23:59:59Z",
        "expiryDate": "2025-03-08T23:59:59Z",
        "price": 11,
        "quantity": 3,
    }
    return envelope("mailbox.order.success", body | data)


def mailbox_order_failed(**data: Any) -> dict[str, Any]:
    body = {
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "subscriptionId": provider_id(),
        "orderId": provider_id(),
        "domain": "company.com",
        "mailboxDetails": {"firstName": "John", "lastName": "Doe", "email": "john"},
        "workspaceType": "GOOGLE",
        "price": 11,
        "quantity": 2,
        "reason": "Domain not verified",
    }
    return envelope("mailbox.order.failed", body | data)


def mailbox_created(
    *, provider: str = "GOOGLE", details: dict[str, Any] | None = None, **data: Any
) -> dict[str, Any]:
    domain = data.get("domain", "coldmailseller.com")
    box: dict[str, Any] = {
        "mailboxId": provider_id(),
        "firstName": "John",
        "lastName": "Doe",
        "email": f"john.{secrets.token_hex(3)}@{domain}",
        "isAdmin": True,
        "creationTime": "2024-03-08T23:59:59Z",
        "expiryDate": "2025-03-08T23:59:59.294Z",
    }
    if provider == "GOOGLE":
        box["appPassword"] = canary("app")
    else:
        box["password"] = canary("pw")
    body: dict[str, Any] = {
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "domain": domain,
        "subscriptionId": provider_id(),
        "orderId": provider_id(),
        "workspaceType": provider,
        "mailboxDetails": box | (details or {}),
        "price": 8.16,
    }
    if provider == "MICROSOFT":
        body["finalUrl"] = "https://example.com/oauth-callback"
    return envelope("mailbox.created", body | data)


def mailbox_updated(mailbox_id: str, fields: dict[str, Any], **data: Any) -> dict[str, Any]:
    body = {
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "mailboxId": mailbox_id,
        "domain": "demo.biz",
        "email": "alice.y@demo.biz",
        "workspaceType": "GOOGLE",
        "updatedFields": fields,
    }
    return envelope("mailbox.updated", body | data)


def prewarmed_mailbox(domain: str) -> dict[str, Any]:
    first = random.choice(["Yasmeen", "Mike", "Yvonne", "Olivia", "James"])
    return {
        "mailboxId": provider_id(),
        "email": f"{first.lower()}.{secrets.token_hex(3)}@{domain}",
        "firstName": first,
        "lastName": "King",
        "profilePicture": "https://cdn.zapmail.ai/mailboxes/James-Carter-SelectAll.jpg",
        "password": canary("pw"),
        "appPassword": canary("app"),
        "authenticatorSecret": canary("totp"),
        "isAdmin": random.random() < 0.2,
        "warmingUpFrom": "2025-09-26T08:53:51.641Z",
        "expiryDate": "2025-11-27T19:59:17.294Z",
    }


def prewarmup_success(
    *,
    domains: int = 2,
    per_domain: int = 2,
    order_id: str | None = None,
    domain_names: list[str] | None = None,
    provider: str = "GOOGLE",
) -> dict[str, Any]:
    names = domain_names or [f"{provider_id().lower()[:12]}.com" for _ in range(domains)]
    groups = [
        {
            "domain": name,
            "subscriptionId": provider_id(),
            "preWarmedUpMailboxes": [prewarmed_mailbox(name) for _ in range(per_domain)],
        }
        for name in names
    ]
    body = {
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "orderId": order_id or provider_id(),
        "serviceProvider": provider,
        "mailboxDetails": groups,
    }
    return envelope("prewarmup.order.success", body)


def prewarmup_failed(*, order_id: str, failures: dict[str, str]) -> dict[str, Any]:
    body = {
        "userId": provider_id(),
        "userEmail": "johndoe@company.com",
        "orderId": order_id,
        "serviceProvider": "GOOGLE",
        "failedOrders": [{"domain": d, "reason": r} for d, r in failures.items()],
    }
    return envelope("prewarmup.order.failed", body)


def envelope(event: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {"event": event, "eventId": event_id or provider_id(), "data": data}
