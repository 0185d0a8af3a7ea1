"""The sender's delivery signature (`cmr-x-signature`, `cmr-x-timestamp`).

The sender does not document the exact signed string or the digest's encoding
(docs/webhooks.md, step 2), so every plausible form is accepted and the one that matched is
recorded on the event. Once live traffic shows the real form, retire the others with
CMR_SIGNATURE_FORMS. Whatever the form, a fresh `cmr-x-timestamp` is required: without it a
captured signature could be replayed for ever.
"""

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Collection
from dataclasses import dataclass

from app.config import FORMS

SIGNATURE_HEADER = "cmr-x-signature"
TIMESTAMP_HEADER = "cmr-x-timestamp"
UNIX_TIME = re.compile(r"[0-9]{1,16}(\.[0-9]{1,6})?")
TIMESTAMP_PREFIX = re.compile(rb"\s*[0-9]+(\.[0-9]*)?\.")
ALL_FORMS = frozenset(form.name for form in FORMS)


@dataclass(frozen=True)
class SignatureCheck:
    result: str  # valid | invalid | absent | stale | unchecked
    form: str | None = None
    signed_at: float | None = None  # the signed cmr-x-timestamp, Unix seconds

    @property
    def ok(self) -> bool:
        return self.result == "valid"


def _digest(key: str, message: bytes, encoding: str) -> str:
    digest = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def sign(key: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """Headers as the sender (or `simulate`) would send them, in the first form of FORMS."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        SIGNATURE_HEADER: _digest(key, f"{ts}.".encode() + body, "hex"),
        TIMESTAMP_HEADER: str(ts),
    }


def _parse_timestamp(value: str | None) -> float | None:
    """Unix seconds (or milliseconds); digits only, so no `nan` or `inf` slips past the
    window check."""
    if value is None or not UNIX_TIME.fullmatch(value.strip()):
        return None
    ts = float(value)
    return ts / 1000 if ts > 1e11 else ts


def verify(
    key: str,
    body: bytes,
    *,
    signature: str | None,
    timestamp: str | None,
    tolerance: int,
    forms: Collection[str] = ALL_FORMS,
    now: float | None = None,
) -> SignatureCheck:
    """`stale` covers a missing timestamp too: every form needs a fresh one."""
    if not signature:
        return SignatureCheck("absent")
    ts = _parse_timestamp(timestamp)
    if ts is None or abs((now or time.time()) - ts) > tolerance:
        return SignatureCheck("stale")
    given = signature.strip().removeprefix("sha256=")
    # `<T>.<body>` signed with a timestamp must not pass as a body of its own
    looks_signed_with_timestamp = TIMESTAMP_PREFIX.match(body) is not None
    for form in FORMS:
        if form.name not in forms or (looks_signed_with_timestamp and not form.with_timestamp):
            continue
        message = f"{timestamp}.".encode() + body if form.with_timestamp else body
        expected = _digest(key, message, form.encoding)
        if hmac.compare_digest(given.encode(), expected.encode()):
            return SignatureCheck("valid", form.name, ts if form.with_timestamp else None)
    return SignatureCheck("invalid")
