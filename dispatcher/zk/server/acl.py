"""ACL schemes and checks as ZooKeeper 3.8 applies them (world, auth, digest, ip, x509, sasl).

``x509`` is ZooKeeper's ``X509AuthenticationProvider``: a client that presented a
verified certificate on the TLS port holds ``x509:<subject DN>`` (see
:func:`dispatcher.tls.x509_subject`), and the configured ``x509_superuser`` holds
``super:<subject DN>`` before it, which passes every check. The provider is
there only when a TLS port verifies client certificates (``x509=True`` below;
without it an ``x509:`` entry is INVALIDACL, as on a ZooKeeper that does not
configure it); then any string is a valid x509 id, and an entry matches when
the DN is the same string.

``sasl`` is ZooKeeper's ``SASLAuthenticationProvider``, there only when SASL is
configured (``sasl=True`` below; without it a ``sasl:`` entry is INVALIDACL, as
on a ZooKeeper without the provider): a client that completed DIGEST-MD5 holds
``sasl:<user>``; an id is valid when Kerberos' name parser takes it (no ``@``,
or exactly ``name[/host]@REALM``); an entry matches the same user, and a user
named ``super`` matches every ``sasl:`` entry, as ZooKeeper's ``matches`` has it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

from dispatcher.zk.codec.protocol import Perm
from dispatcher.zk.codec.records import ACL, Id

SUPER = Id("super", "")


class InvalidACL(ValueError):
    """The ACL list cannot be stored; ZooKeeper answers INVALIDACL."""


class UnreadableACL(ValueError):
    """A null scheme or id where ZooKeeper's Java server dereferences it.

    The server's NullPointerException becomes MARSHALLINGERROR, as for any
    request it fails to process, and the connection stays open.
    """


#: Kerberos' principal syntax (``KerberosName``): an id with ``@`` must match it.
_KERBEROS_NAME = re.compile(r"([^/@]*)(/([^/@]*))?@([^/@]*)")

#: Schemes whose provider reads the id while validating it (a null id fails).
_ID_READING_SCHEMES = frozenset({"world", "digest", "ip"})


def digest_id(user_password: str) -> str:
    """``user:base64(sha1(user:password))``, the id a digest ACL names."""
    user = user_password.split(":", 1)[0]
    digest = hashlib.sha1(user_password.encode("utf-8")).digest()
    return f"{user}:{base64.b64encode(digest).decode('ascii')}"


def _valid_ip(spec: str) -> bool:
    try:
        ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False
    return True


def _ip_matches(client: str | None, spec: str | None) -> bool:
    # Records decode null strings as None; a null address or network matches nothing.
    if client is None or spec is None:
        return False
    try:
        return ipaddress.ip_address(client) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


def _valid_id(scheme: str, ident: str, sasl: bool, x509: bool) -> bool:
    if scheme == "x509":
        return x509
    if scheme == "sasl":
        return sasl and ("@" not in ident or _KERBEROS_NAME.fullmatch(ident) is not None)
    if scheme == "digest":
        return len(ident.split(":")) == 2
    if scheme == "ip":
        return _valid_ip(ident)
    return False


def _check_nulls_while_deduplicating(acl: tuple[ACL, ...]) -> None:
    """Fail where ZooKeeper's duplicate removal dereferences a null.

    ZooKeeper first drops duplicate entries with ``List.contains``, whose
    ``ACL.equals`` compares perms, then ``scheme.equals``, then ``id.equals``
    of the entry being added: a null scheme, or a null id beside an earlier
    entry of the same perms and scheme, throws there.
    """
    kept: list[ACL] = []
    for entry in acl:
        scheme = entry.id.scheme
        for other in kept:
            if other.perms != entry.perms:
                continue
            if scheme is None or (scheme == other.id.scheme and entry.id.id is None):
                raise UnreadableACL("null in an ACL entry compared with another")
        if entry not in kept:
            kept.append(entry)


def fixup_acl(
    acl: tuple[ACL, ...] | None, auth: tuple[Id, ...], *, sasl: bool = False, x509: bool = False
) -> tuple[ACL, ...]:
    """Validate an ACL for storage, expanding ``auth`` entries into the caller's ids.

    ``sasl``: the ``sasl`` scheme is known (SASL is configured); ``x509``: the
    ``x509`` scheme is (a TLS port verifies client certificates).

    Raises :class:`InvalidACL` or :class:`UnreadableACL`, as ZooKeeper 3.8's
    ``fixupACL`` fails, for the first offending entry in order.
    """
    if not acl:
        raise InvalidACL("empty ACL")
    if len(acl) > 1:
        _check_nulls_while_deduplicating(acl)
    out: list[ACL] = []
    for entry in acl:
        scheme, ident = entry.id.scheme, entry.id.id
        if scheme is None:
            raise InvalidACL("null ACL scheme")
        if ident is None and (scheme in _ID_READING_SCHEMES or (sasl and scheme == "sasl")):
            raise UnreadableACL(f"null id for the {scheme} scheme")
        if scheme == "world" and ident == "anyone":
            out.append(entry)
        elif scheme == "auth":
            # Only schemes that prove who a client is may stand in for "auth";
            # the ip scheme describes where it connects from, not who it is, and
            # "super" has no provider in ZooKeeper, which skips it here: a
            # superuser's auth entry names its digest or certificate only.
            expanded = [ACL(entry.perms, a) for a in auth if a.scheme in ("digest", "x509", "sasl")]
            if not expanded:
                raise InvalidACL("auth scheme without an authenticated id")
            out.extend(expanded)
        elif ident is not None and _valid_id(scheme, ident, sasl, x509):
            out.append(entry)
        else:
            raise InvalidACL(f"invalid ACL id {scheme}:{ident}")
    deduplicated: list[ACL] = []
    for entry in out:
        if entry not in deduplicated:
            deduplicated.append(entry)
    return tuple(deduplicated)


def allowed(acl: tuple[ACL, ...], perm: Perm, auth: tuple[Id, ...]) -> bool:
    """Whether a client holding ``auth`` may do ``perm`` on a node with ``acl``."""
    if not acl:
        return True
    for a in auth:
        if a.scheme == "super":
            return True
    for entry in acl:
        if not entry.perms & perm:
            continue
        scheme, ident = entry.id.scheme, entry.id.id
        if scheme == "world" and ident == "anyone":
            return True
        for a in auth:
            if a.scheme != scheme:
                continue
            if scheme == "ip":
                if _ip_matches(a.id, ident):
                    return True
            elif a.id == ident or (scheme == "sasl" and a.id == "super"):
                return True
    return False
