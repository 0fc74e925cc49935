"""ACL schemes and checks as ZooKeeper 3.8 applies them (world, auth, digest, ip)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress

from dispatcher.zk.protocol import Perm
from dispatcher.zk.records import ACL, Id

SUPER = Id("super", "")


class InvalidACL(ValueError):
    """The ACL list cannot be stored; ZooKeeper answers INVALIDACL."""


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


def _ip_matches(client: str, spec: str) -> bool:
    try:
        return ipaddress.ip_address(client) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


def _valid_id(scheme: str, ident: str) -> bool:
    if scheme == "digest":
        return len(ident.split(":")) == 2
    if scheme == "ip":
        return _valid_ip(ident)
    return False


def fixup_acl(acl: tuple[ACL, ...] | None, auth: list[Id]) -> tuple[ACL, ...]:
    """Validate an ACL for storage, expanding ``auth`` entries into the caller's ids."""
    if not acl:
        raise InvalidACL("empty ACL")
    out: list[ACL] = []
    for entry in acl:
        scheme, ident = entry.id.scheme, entry.id.id
        if scheme == "world" and ident == "anyone":
            out.append(entry)
        elif scheme == "auth":
            # Only schemes that prove who a client is may stand in for "auth";
            # the ip scheme describes where it connects from, not who it is.
            expanded = [ACL(entry.perms, a) for a in auth if a.scheme in ("digest", "super")]
            if not expanded:
                raise InvalidACL("auth scheme without an authenticated id")
            out.extend(expanded)
        elif _valid_id(scheme, ident):
            out.append(entry)
        else:
            raise InvalidACL(f"invalid ACL id {scheme}:{ident}")
    deduplicated: list[ACL] = []
    for entry in out:
        if entry not in deduplicated:
            deduplicated.append(entry)
    return tuple(deduplicated)


def allowed(acl: tuple[ACL, ...], perm: Perm, auth: list[Id]) -> bool:
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
            elif a.id == ident:
                return True
    return False
