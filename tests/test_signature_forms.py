"""Once live traffic has shown the sender's signature form, the others are refused (unless
CMR_SIGNATURE_FORMS chooses), in every replica: a body-only signature, whose timestamp is
not signed, can no longer be replayed with a fresh `cmr-x-timestamp`."""

import hashlib
import hmac
import time

import orjson
import pytest

from app.config import ConfigError, load_settings
from app.receiving import pinning
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    OPS_TOKEN,
    SIGNING_KEY,
    app_client,
    deliver,
    make_settings,
)
from tests.state import OPS
from tests.streams import SENT_AT

ENOUGH = 20  # deliveries verified in one form before it is pinned (app/receiving/pinning.py)
TOKENS = ["hook-token-one-0123456789", "hook-token-two-0123456789"]


def body_only(body: bytes, *, at: int) -> dict[str, str]:
    """A body-only hex signature, computed here; its timestamp is not part of it."""
    digest = hmac.new(SIGNING_KEY.encode(), body, hashlib.sha256).hexdigest()
    return {"cmr-x-signature": digest, "cmr-x-timestamp": str(at)}


async def post_body_only(client, payload, *, at: int | None = None):
    body = orjson.dumps(payload)
    headers = body_only(body, at=at or int(time.time())) | {"content-type": "application/json"}
    return await client.post(
        "/webhooks/cmr", content=body, params={"token": TOKENS[1]}, headers=headers
    )


async def deliver_signed(client, count: int) -> None:
    """`timestamp.body:hex` deliveries from both tokens, some stamped up to 2 min ahead."""
    for n in range(count):
        payload = traffic.mailbox_created()
        sent_at = int(time.time()) + (120 if n % 3 == 0 else 0)
        answer = await deliver(client, payload | {SENT_AT: sent_at}, token=TOKENS[n % 2])
        assert answer.status_code == 200, answer.text


async def forms_on_stats(client) -> list[str]:
    forms: list[str] = (await client.get("/api/v1/stats", headers=OPS)).json()["signatureForms"]
    return forms


async def test_once_enough_deliveries_verified_in_one_form_every_replica_keeps_to_it(
    database_url, capsys, monkeypatch
):
    # each process looks at every delivery until it pins a form, and never after
    monkeypatch.setattr(pinning, "RECHECK_SECONDS", 0.0)
    settings = make_settings(database_url, webhook_tokens=",".join(TOKENS))
    async with app_client(settings) as first:
        assert (await post_body_only(first, traffic.mailbox_created())).status_code == 200
        assert len(await forms_on_stats(first)) == 4
        await deliver_signed(first, ENOUGH)
    captured = traffic.mailbox_order_failed()
    old_signature = body_only(orjson.dumps(captured), at=int(time.time()) - 30 * 86400)
    async with app_client(settings) as second:  # another worker or replica, same database
        assert (await post_body_only(second, captured)).status_code == 401
        replayed = await second.post(
            "/webhooks/cmr",
            content=orjson.dumps(captured),
            params={"token": TOKENS[0]},
            headers={**old_signature, "cmr-x-timestamp": str(int(time.time()))},
        )
        assert replayed.status_code == 401
        await deliver_signed(second, 2)
        assert await forms_on_stats(second) == ["timestamp.body:hex"]
    pinned = [line for line in capsys.readouterr().err.splitlines() if "only the form" in line]
    assert len(pinned) == 1 and pinned[0].endswith(
        " signatures: only the form timestamp.body:hex is accepted from now on (at least "
        f"{ENOUGH} of the latest 1000 events verified in it); set CMR_SIGNATURE_FORMS to choose"
    )


async def test_cmr_signature_forms_when_set_is_kept_whatever_the_traffic(database_url):
    forms = "timestamp.body:hex,body:hex"
    settings = make_settings(
        database_url, webhook_tokens=",".join(TOKENS), cmr_signature_forms=forms
    )
    async with app_client(settings) as first:
        await deliver_signed(first, ENOUGH)
    async with app_client(settings) as second:
        assert (await post_body_only(second, traffic.mailbox_created())).status_code == 200
        assert await forms_on_stats(second) == sorted(forms.split(","))


COMPLETE = {
    "_env_file": None,
    "database_url": "postgres://u:p@db:5432/app",
    "fernet_keys": FERNET_KEY,
    "ops_api_tokens": f"{OPS_TOKEN},ops-token-second-0123",
    "credentials_api_tokens": f"cred-token-first-0123,{CREDENTIALS_TOKEN}",
    "webhook_tokens": ",".join(TOKENS),
}


def test_a_signing_key_without_a_webhook_token_stops_start_up():
    settings = load_settings(**COMPLETE | {"webhook_tokens": "", "cmr_signing_key": SIGNING_KEY})
    with pytest.raises(ConfigError) as error:
        settings.check_complete()
    assert str(error.value).startswith("WEBHOOK_TOKENS") and "\n" not in str(error.value)


@pytest.mark.parametrize("token", [TOKENS[1], "ops-token-second-0123", CREDENTIALS_TOKEN])
def test_a_signing_key_equal_to_a_token_stops_start_up_naming_it(token):
    settings = load_settings(**COMPLETE | {"cmr_signing_key": token})
    with pytest.raises(ConfigError) as error:
        settings.check_complete()
    message = str(error.value)
    assert message.startswith("CMR_SIGNING_KEY") and "\n" not in message
    assert token not in message
