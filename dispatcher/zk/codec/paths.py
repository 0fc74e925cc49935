"""ZooKeeper path rules, as ``PathUtils.validatePath`` applies them."""

from __future__ import annotations

import re

__all__ = [
    "InvalidPath",
    "basename",
    "is_within",
    "join",
    "parent_of",
    "validate_path",
]


class InvalidPath(ValueError):
    """The path breaks ZooKeeper's rules; the server answers BADARGUMENTS."""


# The characters PathUtils.validatePath refuses besides NUL (which has its own
# message): controls, the C1 range, surrogates and private use, and specials.
_FORBIDDEN = re.compile("[\x01-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]")
# Paths that pass every check below but the one for "." and ".." names, told
# in one match: names of allowed characters (none of the above, no NUL) after
# each slash, no empty name, no trailing slash. Most paths are such.
_PLAIN = re.compile("(?:/[^/\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]+)+")


def validate_path(path: str) -> None:
    """Raise :class:`InvalidPath` unless ``path`` is a legal absolute znode path."""
    if _PLAIN.fullmatch(path) and "/." not in path:
        return
    if not path:
        raise InvalidPath("path length must be > 0")
    if path[0] != "/":
        raise InvalidPath("path must start with / character")
    if len(path) == 1:
        return
    if path[-1] == "/":
        raise InvalidPath("path must not end with / character")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidPath("empty node name specified")
        if segment in (".", ".."):
            raise InvalidPath("relative paths not allowed")
        if "\0" in segment:
            raise InvalidPath("null character not allowed")
        if _FORBIDDEN.search(segment):
            raise InvalidPath("invalid character")


def parent_of(path: str) -> str:
    """The parent path; ``"/"`` for top-level nodes and for the root itself."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_within(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or below it."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")
