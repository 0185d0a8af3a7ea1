"""The dashboard's sessions: sign-in takes an ops token and opens a server-side session.

Its cookie is HttpOnly, SameSite=Strict (Secure behind HTTPS); sign-out, 30 idle minutes,
8 hours, or removing the token from OPS_API_TOKENS end it. Sign-in and sign-out refuse
cross-site posts; failed sign-ins are throttled per client.

The cookie holds a random secret; the server keeps its keyed hash (ui_sessions), so
sign-out and the idle timeout end a session wherever its cookie was copied to.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request

from app.db import raw_connection
from app.hashing import Hasher

COOKIE = "cmw_session"
SESSION_HOURS = 8
IDLE_MINUTES = 30
FIRST_WAIT_SECONDS, LONGEST_WAIT_SECONDS = 1, 30  # after failed sign-ins

SESSION_STATEMENTS = {
    "open": "INSERT INTO ui_sessions (id_hash, token_fingerprint) VALUES ($1, $2)",
    # one statement checks the session and keeps it alive
    "touch": f"""UPDATE ui_sessions SET last_seen_at = now() WHERE id_hash = $1
        AND last_seen_at > now() - interval '{IDLE_MINUTES} minutes'
        AND created_at > now() - interval '{SESSION_HOURS} hours'
        RETURNING token_fingerprint""",
    "close": "DELETE FROM ui_sessions WHERE id_hash = $1",
    "expire": f"""DELETE FROM ui_sessions
        WHERE last_seen_at < now() - interval '{IDLE_MINUTES} minutes'
        OR created_at < now() - interval '{SESSION_HOURS} hours'""",
}


class SignInThrottle:
    """Failed sign-ins per client address (per worker): after the n-th failure in a row the
    address waits min(2**(n-1), 30) s for its next try; tries within the wait get 429 and do
    not lengthen it, and a success starts over. A short back-off, not a minute's lock-out that
    five tries renew: a mistyped token costs a second, each wait is 30 s at most, and a client
    guessing gets two tries a minute (one that retries exactly on Retry-After still sets the
    pace for the others behind its address). Bounded: the least recent addresses go.

    A sign-in counts as failed from before its body is read until its token is found good:
    guesses sent at once, and posts that never finish or are too large, count too."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, clients: int = 10_000):
        self.clock, self.clients = clock, clients
        self.failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # count, until

    def wait_seconds(self, client: str) -> float:
        _, until = self.failures.get(client, (0, 0.0))
        return max(0.0, until - self.clock())

    def failed(self, client: str) -> None:
        count = self.failures.pop(client, (0, 0.0))[0] + 1
        wait = min(FIRST_WAIT_SECONDS * 2 ** (count - 1), LONGEST_WAIT_SECONDS)
        self.failures[client] = (count, self.clock() + wait)
        while len(self.failures) > self.clients:
            self.failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


async def session_statement(request: Request, name: str, *args: Any) -> Any:
    async with raw_connection(request.app.state.read_engine) as conn:
        return await conn.fetchval(SESSION_STATEMENTS[name], *args)


async def hasher_of(request: Request) -> Hasher:
    hasher: Hasher = await request.app.state.hashing.get()
    return hasher


def tokens(request: Request) -> list[str]:
    settings = request.app.state.settings
    return list(settings.ops_token_list + settings.credentials_token_list)


class SignInRequired(Exception):
    """Raised by a page without a session: answered with a redirect to the sign-in page."""


async def signed_in(request: Request) -> str:
    """The signed-in token's fingerprint, if the session is open, recent, and its token
    still configured (removing a token from OPS_API_TOKENS ends its sessions)."""
    secret = request.cookies.get(COOKIE)
    if not secret or len(secret) > 100:
        raise SignInRequired()
    hasher = await hasher_of(request)
    who = await session_statement(request, "touch", hasher.digest(secret.encode()))
    request.app.state.receiver.away_since = None  # the database answered
    if who is None or who not in {hasher.fingerprint(t) for t in tokens(request)}:
        raise SignInRequired()
    request.state.signed_in = str(who)
    return str(who)


def cross_site(request: Request) -> bool:
    """A browser says where a post comes from: Sec-Fetch-Site (every current browser), else
    Origin. A post from any other site is a forged one; clients that send neither (curl)
    are no browser's forms."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    # the host alone: behind a TLS proxy the scheme seen here may be http
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


async def is_credentials_session(request: Request) -> bool:
    """Whether the signed-in token may export credentials (CREDENTIALS_API_TOKENS)."""
    hasher = await hasher_of(request)
    who = getattr(request.state, "signed_in", None)
    return who in {hasher.fingerprint(t) for t in request.app.state.settings.credentials_token_list}
