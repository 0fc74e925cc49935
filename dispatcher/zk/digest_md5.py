"""DIGEST-MD5 (RFC 2831) as ZooKeeper speaks it: the parts both ends share.

ZooKeeper runs the mechanism through Java's SASL with the service ``zookeeper``
and the server name ``zk-sasl-md5`` for every host, so the realm is
``zk-sasl-md5`` and the ``digest-uri`` is ``zookeeper/zk-sasl-md5``; only
quality of protection ``auth`` (authentication, no integrity or privacy
layer) is offered. This module parses and writes the directive lists of
challenges and responses and computes the ``response`` and ``rspauth``
values; :mod:`dispatcher.zk.sasl_client` and :mod:`dispatcher.zk.server.sasl`
run the exchanges. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

__all__ = [
    "DIGEST_URI",
    "MAX_TOKEN",
    "REALM",
    "SaslError",
    "format_directives",
    "parse_directives",
    "response_value",
]

#: ZooKeeper's fixed server name for DIGEST-MD5, which Java uses as the realm.
REALM: Final = "zk-sasl-md5"
#: ``<service>/<server name>``: what both ends put in and expect of ``digest-uri``.
DIGEST_URI: Final = "zookeeper/" + REALM
#: Java's limit on a DIGEST-MD5 response (and RFC 2831's on a challenge).
MAX_TOKEN: Final = 4096


class SaslError(Exception):
    """A DIGEST-MD5 exchange failed: a malformed token, or wrong credentials.

    The message never contains a password or a digest of one.
    """


def parse_directives(token: bytes) -> dict[str, str]:
    """The ``name=value`` pairs of a challenge or response (RFC 2831 section 7.1).

    Values may be quoted (with backslash escapes) or bare tokens; names are
    case-insensitive and returned in lower case. A repeated directive, an
    unterminated quote or a token that is not UTF-8 raises :class:`SaslError`.
    """
    if len(token) > MAX_TOKEN:
        raise SaslError(f"token of {len(token)} bytes, more than {MAX_TOKEN}")
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("token is not UTF-8") from None
    result: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0:
            raise SaslError(f"directive without a value at offset {i}")
        name = text[i:eq].strip().lower()
        if not name:
            raise SaslError(f"empty directive name at offset {i}")
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            value: list[str] = []
            while True:
                if i >= n:
                    raise SaslError(f"unterminated quoted value of {name}")
                char = text[i]
                if char == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                    continue
                i += 1
                if char == '"':
                    break
                value.append(char)
            parsed = "".join(value)
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            parsed = text[i:end].strip()
            i = end
        if name in result:
            raise SaslError(f"directive {name} given twice")
        result[name] = parsed
    return result


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_directives(directives: Mapping[str, str], bare: frozenset[str]) -> bytes:
    """Write ``directives`` in order; names in ``bare`` unquoted, the rest quoted."""
    return ",".join(
        f"{name}={value if name in bare else _quoted(value)}" for name, value in directives.items()
    ).encode("utf-8")


def _hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def response_value(
    *,
    username: str,
    realm: str,
    password: str,
    nonce: str,
    cnonce: str,
    nc: str,
    qop: str,
    digest_uri: str,
    authzid: str | None,
    utf8: bool,
    server: bool,
) -> str:
    """The ``response`` directive (``server=False``) or ``rspauth`` (``server=True``).

    ``utf8`` is whether the response carried ``charset=utf-8``; without it,
    RFC 2831 has user name, realm and password in ISO 8859-1, as Java reads
    them (a character outside it raises :class:`SaslError`).
    """
    encoding = "utf-8" if utf8 else "latin-1"
    try:
        secret = f"{username}:{realm}:{password}".encode(encoding)
    except UnicodeEncodeError:
        raise SaslError("credentials outside ISO 8859-1 without charset=utf-8") from None
    a1 = hashlib.md5(secret).digest() + f":{nonce}:{cnonce}".encode()
    if authzid:
        a1 += b":" + authzid.encode("utf-8")
    a2 = ("" if server else "AUTHENTICATE") + ":" + digest_uri
    return _hex(f"{_hex(a1)}:{nonce}:{nc}:{cnonce}:{qop}:{_hex(a2.encode())}".encode())
