"""Reading checked values out of parsed TOML tables: the one set of readers every section uses.

Each configuration section (``[zookeeper]``, ``[health]``, ``[admin]``...) is parsed
beside the code that owns it; this module holds what they share, so that every
program reports a bad value the same way. Every reader takes the value and
``where``, the dotted path of its key (``zookeeper.tick_ms``, ``upstream[1].name``),
and raises :class:`ConfigError` with a message that starts with that path.

:func:`reject_unknown` is the one unknown-key check of the project; its message
is ``<where>.<key>: unknown key (known here: a, b)``.

This module imports nothing of zkgate but the address parser, so that any owner of
a section may import it without pulling in the rest of the program.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dispatcher.wire import parse_address

__all__ = [
    "ConfigError",
    "address",
    "array_of_tables",
    "boolean",
    "integer",
    "reject_unknown",
    "seconds",
    "string",
    "table",
    "type_name",
    "user_path",
    "valid_listen",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def reject_unknown(
    options: Mapping[str, Any],
    known: Iterable[str],
    where: str,
    error: type[ValueError] = ConfigError,
) -> None:
    """Raise ``error`` for the first key of ``options`` (in file order) not in ``known``.

    The one unknown-key check of every configuration table, so every program
    says it the same way: ``<where>.<key>: unknown key (known here: a, b)``, or
    ``<key>: ...`` at the top level (``where`` empty). The known keys are listed
    because the usual cause is a typo.
    """
    # A set's order changes between runs; the message must not.
    allowed = tuple(known) if isinstance(known, list | tuple) else tuple(sorted(known))
    for key in options:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise error(f"{path}: unknown key (known here: {', '.join(allowed)})")


def type_name(value: object) -> str:
    """The TOML name of a parsed value's type, for messages (``an integer``)."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``data[key]`` checked to be a table; an empty one when the key is absent."""
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a table, not {type_name(value)}")
    return value


def array_of_tables(value: Any, key: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The tables of ``[[key]]``, each with its place for messages (``key[2]``)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables, written [[{key}]]")
    tables = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a table, not {type_name(entry)}")
        tables.append((where, entry))
    return tables


def string(value: Any, where: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {type_name(value)}")
    if not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


def address(value: Any, where: str) -> str:
    """A ``HOST:PORT`` string, checked and returned as written."""
    text = string(value, where)
    try:
        parse_address(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return text


def valid_listen(_instance: object, _attribute: object, value: str) -> None:
    """An attrs validator: ``value`` is a ``HOST:PORT`` (raises ValueError otherwise)."""
    parse_address(value)


def user_path(value: Any, where: str) -> Path:
    """A non-empty path string with ``~`` expanded."""
    try:
        return Path(string(value, where)).expanduser()
    except RuntimeError:  # what pathlib raises for ~user when there is no such user
        raise ConfigError(f"{where}: cannot expand the ~ in {value!r}") from None


def integer(value: Any, where: str, *, minimum: int) -> int:
    """An integer (not a boolean) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: must be an integer, not {type_name(value)}")
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, not {value}")
    return value


def boolean(value: Any, where: str) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, not {type_name(value)}")
    return value


def seconds(value: Any, where: str) -> float:
    """A positive number of seconds, integer or float, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: must be a positive number of seconds, not {value!r}")
    return float(value)
