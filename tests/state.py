"""The stored state as ops read it through the API, for comparing two runs."""

from typing import Any

import httpx

from tests.conftest import OPS_TOKEN

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
VOLATILE = {"createdAt", "updatedAt", "id"}
KEYS = {"subscriptions": "subscriptionId", "mailboxes": "mailboxId", "orders": "orderId"}


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


async def read_all(client: httpx.AsyncClient, resource: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = (await client.get(f"/api/v1/{resource}", params=params, headers=OPS)).json()
        items += page["items"]
        if not (cursor := page["nextCursor"]):
            return items


async def read_state(client: httpx.AsyncClient) -> dict[str, list[dict[str, Any]]]:
    """Subscriptions, mailboxes and orders, each sorted by its provider ID."""
    state = {}
    for resource, key in KEYS.items():
        items = strip(await read_all(client, resource))
        state[resource] = sorted(items, key=lambda item: item[key])
    return state
