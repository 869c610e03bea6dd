"""The console's logins: server-side sessions in memory, each with its own CSRF token.

A session id is 32 random bytes (``secrets.token_urlsafe``) carried in an HttpOnly,
SameSite=Strict cookie; the operator's token stays on the server, in the session. A session
ends on logout, after `idle` seconds without a request or after `lifetime` seconds in all.
Before login, the login form carries a one-use nonce that must match a cookie (no login CSRF),
and :class:`LoginThrottle` slows down guessing (10 wrong tokens a minute at most).
Everything here is pure logic over an injected clock, for unit tests.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

SESSION_COOKIE = "dw_session"
LOGIN_COOKIE = "dw_login"
CSRF_FIELD = "csrf"  # the hidden form field
CSRF_HEADER = "x-csrf-token"  # the header fetch() sends
DEFAULT_IDLE = 30 * 60.0
DEFAULT_LIFETIME = 12 * 3600.0
LOGIN_NONCE_SECONDS = 600.0
MAX_LOGIN_NONCES = 1000  # pending login forms kept (the oldest go first)
MAX_LOGIN_FAILURES = 10  # wrong tokens in LOGIN_FAILURE_WINDOW seconds before logins wait
LOGIN_FAILURE_WINDOW = 60.0


@dataclasses.dataclass
class Session:
    """One operator's login. `token` is what the console sends to the collector for them;
    `channel` is the collector connection made for it (closed when the session ends)."""

    id: str
    token: str
    csrf: str
    created: float
    seen: float
    channel: Any = None


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison; False for a missing or empty value."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class SessionStore:
    """Sessions by id (module docstring). Thread-safe. `on_end(session)` runs for every
    session that ends (to close its channel)."""

    def __init__(self, *, idle: float = DEFAULT_IDLE, lifetime: float = DEFAULT_LIFETIME,
                 clock: Callable[[], float] = time.monotonic,
                 on_end: Callable[[Session], None] | None = None) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock
        self.on_end = on_end
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._nonces: dict[str, float] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(self, token: str, channel: Any = None) -> Session:
        now = self.clock()
        session = Session(id=secrets.token_urlsafe(32), token=token,
                          csrf=secrets.token_urlsafe(32), created=now, seen=now,
                          channel=channel)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle clock restarts), else None."""
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.lifetime:
                del self._sessions[session_id]
                expired = session
            else:
                session.seen = now
                return session
        self._ended(expired)
        return None

    def end(self, session_id: str | None) -> None:
        with self._lock:
            session = self._sessions.pop(session_id or "", None)
        if session is not None:
            self._ended(session)

    def end_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self._ended(session)

    def sweep(self) -> int:
        """End every expired session; how many ended."""
        now = self.clock()
        with self._lock:
            gone = [s for s in self._sessions.values()
                    if now - s.seen > self.idle or now - s.created > self.lifetime]
            for session in gone:
                del self._sessions[session.id]
        for session in gone:
            self._ended(session)
        return len(gone)

    def _ended(self, session: Session) -> None:
        if self.on_end is not None:
            self.on_end(session)

    @staticmethod
    def csrf_ok(session: Session | None, given: str | None) -> bool:
        return session is not None and same_secret(given, session.csrf)

    # -- login form nonces -----------------------------------------------------------------------

    def login_nonce(self) -> str:
        """A nonce for one login form (sent as a cookie and as the form's hidden field)."""
        now = self.clock()
        nonce = secrets.token_urlsafe(24)
        with self._lock:
            self._nonces = {n: t for n, t in self._nonces.items()
                            if now - t <= LOGIN_NONCE_SECONDS}
            while len(self._nonces) >= MAX_LOGIN_NONCES:
                self._nonces.pop(next(iter(self._nonces)))
            self._nonces[nonce] = now
        return nonce

    def take_login_nonce(self, cookie: str | None, field: str | None) -> bool:
        """True when the form's nonce matches the cookie and is one this store issued (not
        expired); either way it cannot be used again."""
        if not same_secret(field, cookie or ""):
            return False
        now = self.clock()
        with self._lock:
            issued = self._nonces.pop(cookie or "", None)
        return issued is not None and now - issued <= LOGIN_NONCE_SECONDS


class LoginThrottle:
    """At most `max_failures` failed logins in any `window` seconds, for the whole console
    (a token is guessed from anywhere alike); after that, logins wait until the oldest failure
    leaves the window. Thread-safe."""

    def __init__(self, *, max_failures: int = MAX_LOGIN_FAILURES,
                 window: float = LOGIN_FAILURE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: collections.deque[float] = collections.deque()

    def _forget_old(self, now: float) -> None:
        while self._failures and now - self._failures[0] >= self.window:
            self._failures.popleft()

    def wait_seconds(self) -> float:
        """0 when a login may be tried now, else how long until one may."""
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            if len(self._failures) < self.max_failures:
                return 0.0
            return self.window - (now - self._failures[0])

    def failed(self) -> None:
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            self._failures.append(now)


__all__ = ["CSRF_FIELD", "CSRF_HEADER", "LOGIN_COOKIE", "SESSION_COOKIE", "LoginThrottle",
           "Session", "SessionStore", "same_secret"]
