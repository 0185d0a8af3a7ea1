"""What a delivery carries from receiving to recording: the parsed `Delivery`, a refused
one kept as a `Rejection`, and the `Outcome` that goes back to the answer. Receiving builds
them; recording (app/recording/record.py) records them, so they live here, below it.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from app.hashing import Hasher
from app.receiving import payloads
from app.receiving.signing import SignatureCheck


@dataclass(frozen=True)
class Stored:
    """A stored event that `replay` applies again: its row, and the time it was sent."""

    row_id: int
    event_time: datetime


@dataclass(frozen=True)
class Delivery:
    """An authenticated, parsed delivery, ready to record (live, from the spool, or replayed)."""

    envelope: dict[str, Any]  # normalised: `event` and `eventId` always present
    raw: bytes
    signature: SignatureCheck
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    warnings: list[str] = field(default_factory=list)
    spooled: bool = False
    # None only while the database is away (no hashing key yet): such a delivery is spooled
    hasher: Hasher | None = None
    stored: Stored | None = None

    @property
    def event_id(self) -> str | None:
        """None for a delivery without eventId received while the key was out of reach."""
        event_id = self.envelope["eventId"]
        return None if event_id is None else str(event_id)

    @property
    def event(self) -> str:
        return str(self.envelope["event"])

    @cached_property
    def content_hash(self) -> bytes:
        assert self.hasher is not None, "recorded without the hashing key"
        return self.hasher.digest(payloads.canonical(self.envelope))

    @property
    def event_time(self) -> datetime:
        """The signed time when the signature was valid, else the first receipt."""
        if self.stored is not None:
            return self.stored.event_time
        signed = self.signature.signed_at if self.signature.ok else None
        return datetime.fromtimestamp(signed, UTC) if signed is not None else self.received_at


@dataclass(frozen=True)
class Outcome:
    """What became of a delivery, from the recording to the answer."""

    status: str  # processed | ignored | duplicate | queued (in the spool)
    conflict: bool = False  # a second content for an eventId already recorded
    row_id: int = 0


@dataclass(frozen=True)
class Rejection:
    """A delivery refused (400, 422) or that failed to apply (500): kept, encrypted."""

    raw: bytes
    signature: str
    reason: str  # invalid_json | invalid_payload | apply_failed
    errors: list[dict[str, Any]]
    event: str | None = None
    event_id: str | None = None
    received_at: datetime | None = None
