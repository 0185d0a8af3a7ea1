"""The signature check, the keyed hashes and the vault against values this test computes
itself (hmac, hashlib, base64, Fernet): a service that checked or keyed the wrong thing
fails here however consistent it is with itself."""

import base64
import hashlib
import hmac

import orjson
import pytest
from cryptography.fernet import Fernet, InvalidToken

from app.crypto import REDACTED, Vault, generate_key, redact, token_matches
from app.hashing import Hasher
from app.receiving.signing import sign, verify

KEY = "cmr-partner-key-7f3a"
BODY = b'{"event":"mailbox.created","eventId":"E1"}'
NOW = 1_760_000_000
TS = str(NOW - 10)


def mac(message: bytes, key: str = KEY) -> bytes:
    return hmac.new(key.encode(), message, hashlib.sha256).digest()


SIGNED = {
    "timestamp.body:hex": mac(f"{TS}.".encode() + BODY).hex(),
    "timestamp.body:base64": base64.b64encode(mac(f"{TS}.".encode() + BODY)).decode(),
    "body:hex": mac(BODY).hex(),
    "body:base64": base64.b64encode(mac(BODY)).decode(),
}


def check(signature, *, timestamp=TS, body=BODY, **options):
    options = {"tolerance": 300, "now": NOW} | options
    return verify(KEY, body, signature=signature, timestamp=timestamp, **options)


@pytest.mark.parametrize("form", sorted(SIGNED))
def test_each_signature_form_verifies_and_is_named(form):
    result = check(SIGNED[form])
    assert (result.result, result.form, result.ok) == ("valid", form, True)
    # only a signed timestamp is the event's time; a body-only form signs no time
    assert result.signed_at == (float(TS) if form.startswith("timestamp") else None)
    assert check(SIGNED[form], forms={form}).ok
    others = {f for f in SIGNED if f != form}
    assert check(SIGNED[form], forms=others).result == "invalid"


def test_a_signature_may_carry_its_sha256_prefix_and_surrounding_spaces():
    assert check("sha256=" + SIGNED["timestamp.body:hex"]).ok
    assert check(f"  {SIGNED['body:hex']} ").ok
    assert not check(SIGNED["body:hex"] + "sha256=").ok


@pytest.mark.parametrize(
    "wrong",
    [
        mac(f"{TS}.".encode() + BODY, key="another-key").hex(),
        mac(f"{int(TS) + 1}.".encode() + BODY).hex(),  # another timestamp
        mac(BODY + b" ").hex(),  # another body
        SIGNED["body:hex"].upper()[:-1],
    ],
)
def test_a_wrong_signature_is_invalid(wrong):
    assert check(wrong).result == "invalid"


def test_no_signature_is_absent_and_no_fresh_timestamp_is_stale():
    assert check(None).result == "absent" and check("").result == "absent"
    for timestamp in (None, "", "nan", "inf", "-5", "12abc", "1e9", " "):
        assert check(SIGNED["body:hex"], timestamp=timestamp).result == "stale", timestamp


@pytest.mark.parametrize(
    ("offset", "result"), [(-301, "stale"), (-300, "valid"), (300, "valid"), (301, "stale")]
)
def test_the_window_includes_its_edges(offset, result):
    ts = str(NOW + offset)
    signature = mac(f"{ts}.".encode() + BODY).hex()
    assert check(signature, timestamp=ts).result == result
    millis = str((NOW + offset) * 1000)
    signature = mac(f"{millis}.".encode() + BODY).hex()
    assert check(signature, timestamp=millis).result == result


def test_a_timestamp_signature_resent_as_a_body_is_not_a_body_signature():
    """`<T>.<body>` signed with a timestamp, replayed as a body of its own."""
    body = f"{TS}.".encode() + BODY
    assert check(mac(body).hex(), body=body).result == "invalid"
    assert check(base64.b64encode(mac(body)).decode(), body=body).result == "invalid"
    assert check(mac(f"{TS}.".encode() + body).hex(), body=body).ok  # the timestamp form


def test_sign_makes_what_the_sender_sends_stamped_now_unless_told(monkeypatch):
    headers = sign(KEY, BODY, timestamp=int(TS))
    assert headers == {"cmr-x-signature": SIGNED["timestamp.body:hex"], "cmr-x-timestamp": TS}
    monkeypatch.setattr("app.receiving.signing.time.time", lambda: int(TS) + 0.7)  # now
    assert sign(KEY, BODY) == headers


# --- keyed hashes ---------------------------------------------------------------------


def test_hashes_are_hmacs_of_the_sha256_under_the_server_key():
    key, data = b"k" * 32, b'{"a":1}'
    expected = hmac.new(key, hashlib.sha256(data).digest(), hashlib.sha256).digest()
    hasher = Hasher(key)
    assert hasher.digest(data) == expected
    assert hasher.key_sha256(hashlib.sha256(data).digest()) == expected
    assert hasher.event_id(data) == "sha256:" + expected.hex()
    token_digest = hmac.new(key, hashlib.sha256(b"tok").digest(), hashlib.sha256).hexdigest()
    assert hasher.fingerprint("tok") == token_digest[:16]
    assert Hasher(b"j" * 32).digest(data) != expected


# --- the vault and redaction ----------------------------------------------------------


def test_the_first_key_encrypts_and_every_key_decrypts():
    new, old = generate_key(), generate_key()
    under_old = Fernet(old).encrypt(b"pw-1")
    vault = Vault([new, old])
    assert vault.decrypt(under_old) == b"pw-1"
    assert Fernet(new).decrypt(vault.encrypt(b"pw-2")) == b"pw-2"
    assert Fernet(new).decrypt(vault.rotate(under_old)) == b"pw-1"
    assert vault.rotate(under_old) != vault.rotate(under_old)  # a fresh IV each time
    with pytest.raises(InvalidToken):
        Vault([new]).decrypt(under_old)


def test_credentials_are_sealed_as_one_token_under_each_given_name():
    vault = Vault([generate_key()])
    sealed = vault.seal({"password": "pässword", "app_password": None, "secret": "s-1"})
    assert sealed["app_password"] is None
    assert sealed["password"] is sealed["secret"]  # one encryption for both
    token = sealed["password"]
    assert token is not None and b"s-1" not in token
    assert orjson.loads(vault.decrypt(token)) == {"password": "pässword", "secret": "s-1"}
    assert vault.unseal(sealed) == {"password": "pässword", "app_password": None, "secret": "s-1"}
    assert vault.seal({"password": None}) == {"password": None}
    # two tokens (two events): each name read from its own
    later = vault.seal({"password": "new", "secret": None})
    mixed = {"password": later["password"], "secret": sealed["secret"]}
    assert vault.unseal(mixed) == {"password": "new", "secret": "s-1"}
    # a token as the release before sealing wrote it (a replica still running it): bare
    for bare in ("hunter2", "123", '{"other": "x"}', "null"):
        assert vault.unseal({"password": vault.encrypt(bare.encode())}) == {"password": bare}


def test_a_token_matches_only_one_of_the_allowed_exactly():
    allowed = ["token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb"]
    assert token_matches("token-bbbbbbbbbbbbbbbb", allowed)
    assert token_matches("token-aaaaaaaaaaaaaaaa", allowed)
    for given in ("", None, "token-bbbbbbbbbbbbbbb", "token-bbbbbbbbbbbbbbbbb", "TOKEN-a"):
        assert not token_matches(given, allowed), given
    assert not token_matches("x", [])


def test_redaction_shows_only_descriptive_values():
    payload = {
        "event": "mailbox.created",
        "data": {
            "mailboxDetails": [{"email": "a@b.c", "password": "pw", "smtpPass": {"x": 1}}],
            "price": 8.16,
        },
    }
    assert redact(payload) == {
        "event": "mailbox.created",
        "data": {
            "mailboxDetails": [{"email": "a@b.c", "password": REDACTED, "smtpPass": REDACTED}],
            "price": 8.16,
        },
    }
