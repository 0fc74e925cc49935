"""The server side of DIGEST-MD5 on the ZooKeeper face, as ZooKeeper 3.8 runs it.

One :class:`DigestMd5Server` per connection answers the tokens of the ``sasl``
request (opcode 102): the first token (empty, from every client; a non-empty
one is ignored, as by ZooKeeper) gets the challenge, the client's response
gets ``rspauth`` and completes the exchange; anything else (a malformed
response, an unknown user, a wrong password, a token after completion)
raises :class:`~dispatcher.zk.digest_md5.SaslError`, which ZooKeeper answers
with AUTHFAILED and a closed connection. Java's ``DigestMD5Server`` is the
reference: a response must name the offered nonce, nonce count 1, qop
``auth`` and the ``digest-uri`` ``zookeeper/zk-sasl-md5``. The identity a
completed exchange gives is the user name (ZooKeeper's callback handler
authorizes every authzid as the authenticated user's short name, which for
the names a JAAS file may hold here is the name itself).
"""

from __future__ import annotations

import base64
import enum
import hmac
import secrets
from collections.abc import Callable

from dispatcher.zk.digest_md5 import (
    DIGEST_URI,
    REALM,
    SaslError,
    format_directives,
    parse_directives,
    response_value,
)
from dispatcher.zk.server.jaas import SaslUsers

__all__ = ["DigestMd5Server"]

_BARE = frozenset({"charset", "algorithm"})


class _Step(enum.Enum):
    CHALLENGE = 1
    RESPONSE = 2
    DONE = 3


class DigestMd5Server:
    """One connection's DIGEST-MD5 exchange against ``users`` (sans I/O).

    ``random`` draws nonce bytes; tests pass a fixed one.
    """

    def __init__(
        self, users: SaslUsers, random: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._users = users
        self._random = random
        self._step = _Step.CHALLENGE
        self._nonce = ""
        #: The authenticated user, once :attr:`complete`.
        self.authorization_id: str | None = None

    @property
    def complete(self) -> bool:
        return self._step is _Step.DONE

    def evaluate(self, token: bytes) -> bytes:
        """The answer to the client's ``token``; raises SaslError if it is refused.

        A refusal ends the exchange: every later token is refused as well.
        """
        step, self._step = self._step, _Step.DONE
        if step is _Step.CHALLENGE:
            # ZooKeeper 3.8 on Java's DIGEST-MD5 answers any first token, even
            # a non-empty one, with the challenge.
            self._nonce = base64.b64encode(self._random(30)).decode("ascii")
            self._step = _Step.RESPONSE
            return format_directives(
                {"realm": REALM, "nonce": self._nonce, "qop": "auth",
                 "charset": "utf-8", "algorithm": "md5-sess"},
                _BARE,
            )  # fmt: skip
        if step is _Step.RESPONSE:
            return self._verify(parse_directives(token))
        raise SaslError("DIGEST-MD5 exchange already ended")

    def _verify(self, response: dict[str, str]) -> bytes:
        for name in ("username", "nonce", "cnonce", "nc", "digest-uri", "response"):
            if name not in response:
                raise SaslError(f"response without {name}")
        if response["nonce"] != self._nonce:
            raise SaslError("response for another nonce")
        if response["nc"] != "00000001":
            raise SaslError(f"nonce count {response['nc']}, expected 00000001")
        qop = response.get("qop", "auth")
        if qop != "auth":
            raise SaslError(f"qop {qop} not offered (only auth)")
        realm = response.get("realm", "")
        if realm not in ("", REALM):
            raise SaslError(f"realm {realm} not offered")
        if response["digest-uri"].lower() != DIGEST_URI:
            raise SaslError(f"digest-uri {response['digest-uri']}, expected {DIGEST_URI}")
        charset = response.get("charset")
        if charset is not None and charset.lower() != "utf-8":
            raise SaslError(f"charset {charset} (only utf-8 may be given)")
        username = response["username"]
        password = self._users.password(username)

        # An unknown user still costs a digest, so a refusal takes as long
        # whether or not the name exists.
        def value(server: bool) -> str:
            return response_value(
                username=username, realm=realm, password=password or "", nonce=self._nonce,
                cnonce=response["cnonce"], nc=response["nc"], qop=qop,
                digest_uri=response["digest-uri"], authzid=response.get("authzid"),
                utf8=charset is not None, server=server,
            )  # fmt: skip

        matches = hmac.compare_digest(value(False).encode(), response["response"].lower().encode())
        if password is None or not matches:
            raise SaslError(f"DIGEST-MD5 authentication of {username!r} failed")
        self.authorization_id = username
        rspauth = value(True)
        return f"rspauth={rspauth}".encode("ascii")
