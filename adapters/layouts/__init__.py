"""ZooKeeper path layouts: how registries spell one instance as one znode.

Each module (``dubbo``, ``curator``, ``serverset``, ``plain``) is a
:class:`~dispatcher.core.upstream.Layout`, registered in the ``zkgate.layouts``
entry-point group: it parses one znode under a service's directory into an
:class:`~dispatcher.core.model.Instance`, and renders an instance back into the
znode name and data that the layout's own clients read, for projecting the
unified registry into ZooKeeper. All of it is pure code: bytes and strings
in, values out.

The contract every layout keeps:

* ``parse`` never raises on bad input. Garbage (undecodable bytes, the wrong
  JSON shape, an impossible port) yields ``None`` and the caller logs it:
  registries are full of half-written and foreign znodes, and one of them
  must not stop an adapter.
* ``render`` is faithful to the real format: what it produces is what the
  layout's real clients accept. Model fields the format has no place for
  are left out (each module says which), so ``parse(render(x))`` equals
  ``x`` only for instances the layout can represent. Rendering is
  deterministic (equal instances give equal bytes), so an unchanged
  instance never looks changed to a watcher. Instance ids become znode
  names through :func:`node_name`, which escapes what ZooKeeper refuses.
* ``directory(service)`` is the service's directory relative to the
  layout's root, and ``service_of`` inverts it (``None`` for a directory
  that is not a service's instance directory in this layout).

The helpers below are shared decoding rules for the layout modules, so that
"what counts as a port" is the same everywhere.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final
from urllib.parse import unquote

from dispatcher.core.upstream import Layout, layout_kind

__all__ = ["NAMES", "Layout", "get"]

# ASCII only (str.isdigit accepts other scripts' digits), and short enough
# to stay clear of int()'s digit limit, which raises ValueError.
_DECIMAL: Final = re.compile(r"-?[0-9]{1,18}")

NAMES: Final = ("curator", "dubbo", "plain", "serverset")
"""The layouts this package ships (plugins may register more; see :func:`get`)."""


def get(name: str) -> Layout:
    """The layout called ``name``, found the one way zkgate finds layouts:
    :func:`dispatcher.core.upstream.layout_kind` (the ``zkgate.layouts`` entry points),
    so plugin layouts count too. Raises ``ConfigError`` for an unknown name."""
    return layout_kind(name)


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """``data`` decoded as a JSON object, or None for anything else.

    Catches the recursion error a deeply nested document raises, as well as
    undecodable bytes and malformed JSON.
    """
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_bytes(record: object) -> bytes:
    """``record`` as compact UTF-8 JSON, the way Jackson writes it.

    Text is written raw, as Jackson does, so that a rendered record is
    byte-for-byte what the layout's Java writers produce; only text holding
    a lone surrogate (which UTF-8 cannot carry) falls back to ``\\u`` escapes.
    """
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode("ascii")


def as_int(value: object) -> int | None:
    """An integer from JSON: an int, an integral float or a decimal string.

    Booleans are refused: ``"port": true`` is a bug, not port 1.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return int(value)
    return None


def as_port(value: object) -> int | None:
    """A TCP port (0..65535) by :func:`as_int`'s rules, or None."""
    port = as_int(value)
    return port if port is not None and 0 <= port <= 65535 else None


def as_text(value: object) -> str | None:
    """A JSON scalar as the string metadata carries, or None for null and containers.

    Booleans are spelled as JSON spells them, so ``true`` round-trips as
    ``"true"`` rather than Python's ``"True"``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return None


def text_map(value: object) -> dict[str, str] | None:
    """A JSON object's scalar entries as a ``str -> str`` dict (others are skipped).

    None when ``value`` is not an object at all.
    """
    if not isinstance(value, dict):
        return None
    result: dict[str, str] = {}
    for key, item in value.items():
        text = as_text(item)
        if text is not None:
            result[key] = text
    return result


# What ZooKeeper's PathUtils.validatePath refuses in a node name, plus "/"
# (the separator) and "%" (our escape character).
_UNSAFE_IN_NAME: Final = re.compile("[/%\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff]")


def _escape(text: str) -> str:
    # surrogatepass: a lone surrogate (legal in a JSON string) still gets
    # a reversible escape instead of an exception.
    return "".join(f"%{byte:02X}" for byte in text.encode("utf-8", "surrogatepass"))


def node_name(text: str) -> str:
    """``text`` (an instance id) as a valid znode name, unchanged when it already is one.

    Ids from other registries may hold ``/`` or be ``.`` or ``..``, which
    ZooKeeper refuses as a node name; those characters (and ``%`` itself,
    and the control and private-use characters ZooKeeper refuses) are
    percent-encoded, so that :func:`node_text` recovers the id exactly.
    """
    if text in {".", ".."}:
        return _escape(text)
    return _UNSAFE_IN_NAME.sub(lambda match: _escape(match[0]), text)


def node_text(name: str) -> str | None:
    """Inverse of :func:`node_name`; None for an escape that is not UTF-8."""
    if "%" not in name:
        return name
    try:
        return unquote(name, errors="surrogatepass")
    except UnicodeDecodeError:
        return None
