"""Sessions: ids, passwords, negotiated timeouts and expiry deadlines."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator

import attrs

#: Session ids carry the boot counter in their high bits, so ids never repeat
#: across restarts of the same data directory.
_BOOT_SHIFT = 32


@attrs.define(eq=False)
class Session:
    id: int
    timeout_ms: int
    deadline: float
    #: The connection currently attached, or None between a disconnect and expiry.
    client: object | None = None
    closing: bool = False


class SessionTable:
    """Live sessions and when each one expires unless it hears from its client."""

    def __init__(self, boot: int, min_timeout_ms: int, max_timeout_ms: int) -> None:
        self._next = (boot << _BOOT_SHIFT) + 1
        self.min_timeout_ms = min_timeout_ms
        self.max_timeout_ms = max_timeout_ms
        self._sessions: dict[int, Session] = {}
        #: Passwords are derived from the session id with this, as ZooKeeper
        #: derives them from its own secret, so no session stores one.
        self._secret = secrets.token_bytes(32)

    def negotiate(self, requested_ms: int) -> int:
        return max(self.min_timeout_ms, min(requested_ms, self.max_timeout_ms))

    def create(self, requested_timeout_ms: int, now: float) -> Session:
        timeout = self.negotiate(requested_timeout_ms)
        session = Session(self._next, timeout, now + timeout / 1000)
        self._next += 1
        self._sessions[session.id] = session
        return session

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def password(self, session: Session) -> bytes:
        """The password a client presents to resume ``session``."""
        key = session.id.to_bytes(8, "big", signed=True)
        return hmac.new(self._secret, key, hashlib.sha256).digest()[:16]

    def resumable(self, session_id: int, passwd: bytes) -> Session | None:
        """The live session ``session_id`` if ``passwd`` is its password
        (compared in constant time), else None."""
        session = self._sessions.get(session_id)
        if session is None or session.closing:
            return None
        return session if hmac.compare_digest(self.password(session), passwd) else None

    def touch(self, session: Session, now: float) -> None:
        session.deadline = now + session.timeout_ms / 1000

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def expired(self, now: float) -> list[Session]:
        return [s for s in self._sessions.values() if s.deadline <= now and not s.closing]

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))
