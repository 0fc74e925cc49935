"""DIGEST-MD5 users from a JAAS login configuration, as ZooKeeper's server reads them.

ZooKeeper's server takes its DIGEST-MD5 users from the ``Server`` section of
the file named by ``java.security.auth.login.config``::

    Server {
        org.apache.zookeeper.server.auth.DigestLoginModule required
        user_alice="secret"
        user_bob="other";
    };

Each ``user_<name>="<password>"`` option is one user. :func:`load_users` reads
exactly this shape, so one file serves zkgate and ZooKeeper alike: sections
(other sections, such as a ``Client`` one, are skipped), ``//`` and
``/* */`` comments, quoted or bare values. Anything else in the ``Server``
section (another login module, another option, a second entry) is refused
with a message naming the file and line, rather than being half understood.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import attrs

__all__ = ["JaasError", "SaslUsers", "load_users", "parse_users"]

DIGEST_LOGIN_MODULE: Final = "org.apache.zookeeper.server.auth.DigestLoginModule"
_FLAGS: Final = frozenset({"required", "requisite", "sufficient", "optional"})
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<comment>//[^\n]*|/\*.*?\*/)
    | (?P<quoted>"(?:[^"\\]|\\.)*")
    | (?P<word>[^\s{};="]+)
    | (?P<punct>[{};=])
    """,
    re.VERBOSE | re.DOTALL,
)


class JaasError(ValueError):
    """The JAAS file cannot be used; the message names the line. Never a password."""


@attrs.frozen
class SaslUsers:
    """User names and their passwords; the passwords are never in ``repr``."""

    _passwords: Mapping[str, str] = attrs.field(repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._passwords))

    def password(self, name: str) -> str | None:
        return self._passwords.get(name)


@attrs.frozen
class _Token:
    kind: str
    text: str
    line: int


def _tokens(text: str, source: str) -> Iterator[_Token]:
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise JaasError(f"{source}:{line}: unexpected {text[pos]!r}")
        kind = match.lastgroup or ""
        value = match.group()
        if kind in ("quoted", "word", "punct"):
            if kind == "quoted":
                value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
            yield _Token(kind, value, line)
        line += match.group().count("\n")
        pos = match.end()


def parse_users(text: str, source: str = "JAAS file", section: str = "Server") -> SaslUsers:
    """The users of ``section`` in JAAS ``text``; ``source`` names it in errors."""
    tokens = list(_tokens(text, source))
    at = 0
    last_line = tokens[-1].line if tokens else 1

    def take(kind: str | None = None, text_: str | None = None, what: str = "") -> _Token:
        nonlocal at
        if at >= len(tokens):
            raise JaasError(f"{source}:{last_line}: ended where {what} was expected")
        token = tokens[at]
        if (kind is not None and token.kind != kind) or (text_ is not None and token.text != text_):
            raise JaasError(f"{source}:{token.line}: expected {what}, found {token.text!r}")
        at += 1
        return token

    found: dict[str, str] | None = None
    while at < len(tokens):
        name = take("word", what="a section name")
        take("punct", "{", what=f"'{{' after {name.text}")
        entries: list[tuple[_Token, dict[str, str]]] = []
        while at < len(tokens) and (tokens[at].kind, tokens[at].text) != ("punct", "}"):
            module = take("word", what="a login module class")
            flag = take("word", what="a control flag")
            if flag.text.lower() not in _FLAGS:
                raise JaasError(
                    f"{source}:{flag.line}: control flag {flag.text!r} is none of "
                    + ", ".join(sorted(_FLAGS))
                )
            options: dict[str, str] = {}
            while True:
                token = take(what="an option or ';'")
                if token.kind == "punct" and token.text == ";":
                    break
                if token.kind != "word":
                    raise JaasError(
                        f"{source}:{token.line}: expected an option, found {token.text!r}"
                    )
                take("punct", "=", what=f"'=' after {token.text}")
                value = take(what=f"the value of {token.text}")
                if value.kind not in ("quoted", "word"):
                    raise JaasError(f"{source}:{value.line}: expected the value of {token.text}")
                if token.text in options:
                    raise JaasError(f"{source}:{token.line}: option {token.text} given twice")
                options[token.text] = value.text
            entries.append((module, options))
        take("punct", "}", what="'}'")
        take("punct", ";", what=f"';' after the {name.text} section")
        if name.text != section:
            continue
        if found is not None:
            raise JaasError(f"{source}:{name.line}: a second {section} section")
        found = _users_of(entries, source, section, name.line)
    if found is None:
        raise JaasError(f"{source}: no {section} section")
    return SaslUsers(found)


def _users_of(
    entries: list[tuple[_Token, dict[str, str]]], source: str, section: str, line: int
) -> dict[str, str]:
    if len(entries) != 1:
        raise JaasError(
            f"{source}:{line}: the {section} section must hold exactly one "
            f"{DIGEST_LOGIN_MODULE} entry, not {len(entries)}"
        )
    module, options = entries[0]
    if module.text != DIGEST_LOGIN_MODULE:
        raise JaasError(
            f"{source}:{module.line}: login module {module.text} is not supported "
            f"(only {DIGEST_LOGIN_MODULE}, DIGEST-MD5)"
        )
    users: dict[str, str] = {}
    for key, password in options.items():
        name = key.removeprefix("user_")
        if name == key:
            raise JaasError(
                f"{source}:{module.line}: option {key} is not supported (only user_<name>)"
            )
        if not name or "@" in name:
            # ZooKeeper maps a name with '@' through Kerberos rules into a
            # different identity; zkgate has no such rules.
            raise JaasError(
                f"{source}:{module.line}: user name {name!r} must be non-empty, without '@'"
            )
        users[name] = password
    if not users:
        raise JaasError(f"{source}:{module.line}: the {section} section names no user_<name>")
    return users


def load_users(path: Path, section: str = "Server") -> SaslUsers:
    """Read and parse the JAAS file at ``path``; OSError becomes JaasError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JaasError(f"{path}: cannot read: {exc}") from None
    return parse_users(text, str(path), section)
