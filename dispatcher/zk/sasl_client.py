"""The client side of DIGEST-MD5, as ZooKeeper's Java client runs it (sans I/O).

:class:`DigestMd5Client` turns the server's challenge into a response and
checks the server's ``rspauth``, so a server that does not know the password
cannot pass for one that does. :class:`SaslCredentials` is the user name and
password a ``[[mirror]]`` or ``[[upstream]]`` table names (``sasl_username``,
``sasl_password_file``); :func:`load_credentials` reads the password file.
"""

from __future__ import annotations

import enum
import hmac
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dispatcher.zk.digest_md5 import (
    DIGEST_URI,
    REALM,
    SaslError,
    format_directives,
    parse_directives,
    response_value,
)

__all__ = ["DigestMd5Client", "SaslCredentials", "SaslError", "load_credentials"]

_BARE = frozenset({"qop", "nc", "charset", "response"})


@attrs.frozen
class SaslCredentials:
    """A DIGEST-MD5 user; the password is never in ``repr``."""

    username: str
    password: str = attrs.field(repr=False)
    #: Where the password came from, for writing the configuration back.
    password_file: Path | None = None

    def to_mapping(self) -> dict[str, Any]:
        """The ``sasl_username`` / ``sasl_password_file`` keys, never the password."""
        result: dict[str, Any] = {"sasl_username": self.username}
        if self.password_file is not None:
            result["sasl_password_file"] = str(self.password_file)
        return result


def load_credentials(username: str, password_file: Path) -> SaslCredentials:
    """The credentials with the password from ``password_file`` (one trailing
    newline dropped, as editors add one); ValueError names what is wrong."""
    if not username:
        raise ValueError("the SASL user name is empty")
    try:
        password = password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the SASL password file {password_file}: {exc}") from None
    password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"the SASL password file {password_file} is empty")
    return SaslCredentials(username, password, password_file)


class _Step(enum.Enum):
    START = 1
    CHALLENGE = 2
    RSPAUTH = 3
    DONE = 4
    #: A refused token ended the exchange: every later one is refused too.
    FAILED = 5


class DigestMd5Client:
    """One DIGEST-MD5 exchange as ``credentials``; ``random`` draws the cnonce."""

    def __init__(
        self, credentials: SaslCredentials, random: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._credentials = credentials
        self._random = random
        self._step = _Step.START
        self._expected_rspauth = ""

    @property
    def complete(self) -> bool:
        return self._step is _Step.DONE

    def initial(self) -> bytes:
        """The first token: empty, as DIGEST-MD5 has no initial response."""
        if self._step is not _Step.START:
            raise SaslError("DIGEST-MD5 exchange already started")
        self._step = _Step.CHALLENGE
        return b""

    def evaluate(self, token: bytes | None) -> bytes | None:
        """The answer to the server's ``token``: the response to its challenge,
        then None once its ``rspauth`` proves it knows the password.
        Raises SaslError on anything else."""
        step, self._step = self._step, _Step.FAILED
        directives = parse_directives(token or b"")
        if step is _Step.CHALLENGE:
            return self._respond(directives)
        if step is not _Step.RSPAUTH:
            raise SaslError(f"unexpected server token in step {step.name}")
        rspauth = directives.get("rspauth", "")
        if not hmac.compare_digest(rspauth.lower().encode(), self._expected_rspauth.encode()):
            raise SaslError("the server's rspauth does not match: it does not know the password")
        self._step = _Step.DONE
        return None

    def _respond(self, challenge: dict[str, str]) -> bytes:
        if "nonce" not in challenge:
            raise SaslError("challenge without a nonce")
        qops = [q.strip() for q in challenge.get("qop", "auth").split(",")]
        if "auth" not in qops:
            raise SaslError(f"the server offers qop {challenge['qop']}, not auth")
        realm = challenge.get("realm", REALM)
        utf8 = challenge.get("charset", "").lower() == "utf-8"
        cnonce = self._random(16).hex()
        user, password = self._credentials.username, self._credentials.password

        def value(server: bool) -> str:
            return response_value(
                username=user, realm=realm, password=password, nonce=challenge["nonce"],
                cnonce=cnonce, nc="00000001", qop="auth", digest_uri=DIGEST_URI,
                authzid=None, utf8=utf8, server=server,
            )  # fmt: skip

        directives = {
            "username": user, "realm": realm, "nonce": challenge["nonce"], "cnonce": cnonce,
            "nc": "00000001", "qop": "auth", "digest-uri": DIGEST_URI, "response": value(False),
        }  # fmt: skip
        if utf8:
            directives["charset"] = "utf-8"
        self._expected_rspauth = value(True)
        self._step = _Step.RSPAUTH
        return format_directives(directives, _BARE)
