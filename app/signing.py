"""The sender's delivery signature (`cmr-x-signature`, `cmr-x-timestamp`).

The exact signed string and digest encoding are undocumented (provider-docs/
DELIVERY-FACTS.md), so every plausible form is accepted and the one that matched is
recorded on the event. Once live traffic shows the real form, retire the others in FORMS.
"""

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

SIGNATURE_HEADER = "cmr-x-signature"
TIMESTAMP_HEADER = "cmr-x-timestamp"
# (form name, whether the timestamp is part of the signed string, digest encoding)
FORMS: tuple[tuple[str, bool, str], ...] = (
    ("timestamp.body:hex", True, "hex"),
    ("timestamp.body:base64", True, "base64"),
    ("body:hex", False, "hex"),
    ("body:base64", False, "base64"),
)


@dataclass(frozen=True)
class SignatureCheck:
    result: str  # valid | invalid | absent | stale | unchecked
    form: str | None = None
    signed_at: float | None = None  # the signed cmr-x-timestamp, Unix seconds

    @property
    def ok(self) -> bool:
        return self.result == "valid"


def _digest(key: str, message: bytes, encoding: str) -> str:
    raw = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return raw.hex() if encoding == "hex" else base64.b64encode(raw).decode()


def sign(key: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """Headers as the sender (or `simulate`) would send them, in the first form of FORMS."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        SIGNATURE_HEADER: _digest(key, f"{ts}.".encode() + body, "hex"),
        TIMESTAMP_HEADER: str(ts),
    }


def _parse_timestamp(value: str | None) -> float | None:
    try:
        ts = float(value) if value else None
    except ValueError:
        return None
    if ts is not None and ts > 1e11:  # milliseconds
        ts /= 1000
    return ts


def verify(
    key: str,
    body: bytes,
    *,
    signature: str | None,
    timestamp: str | None,
    tolerance: int,
    now: float | None = None,
) -> SignatureCheck:
    if not signature:
        return SignatureCheck("absent")
    ts = _parse_timestamp(timestamp)
    if timestamp and (ts is None or abs((now or time.time()) - ts) > tolerance):
        return SignatureCheck("stale")
    given = signature.strip().removeprefix("sha256=")
    for name, with_timestamp, encoding in FORMS:
        if with_timestamp and ts is None:
            continue
        message = f"{timestamp}.".encode() + body if with_timestamp else body
        expected = _digest(key, message, encoding)
        if hmac.compare_digest(given.encode(), expected.encode()):
            return SignatureCheck("valid", name, ts if with_timestamp else None)
    return SignatureCheck("invalid")
