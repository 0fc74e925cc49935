"""ZooKeeper path rules, as ``PathUtils.validatePath`` applies them."""

from __future__ import annotations


class InvalidPath(ValueError):
    """The path breaks ZooKeeper's rules; the server answers BADARGUMENTS."""


def _forbidden(ch: str) -> bool:
    c = ord(ch)
    return (
        0 < c <= 0x1F
        or 0x7F <= c <= 0x9F
        or 0xD800 <= c <= 0xF8FF
        or 0xFFF0 <= c <= 0xFFFF
    )


def validate_path(path: str) -> None:
    """Raise :class:`InvalidPath` unless ``path`` is a legal absolute znode path."""
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
        if any(_forbidden(ch) for ch in segment):
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
