"""Jute, ZooKeeper's serialization: big-endian primitives, length-prefixed strings.

A :class:`Reader` walks one frame's body and raises :class:`DecodeError` on any
malformed or truncated input, so a hostile client can only ever produce that one
exception; a :class:`Writer` appends to a ``bytearray``.
"""

from __future__ import annotations

import builtins
import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = [
    "DecodeError",
    "Reader",
    "Writer",
]

T = TypeVar("T")

_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")
_BOOL = struct.Struct(">?")


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the record being read."""


class Reader:
    """Reads jute primitives from ``data`` starting at ``offset``."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def _take(self, fmt: struct.Struct) -> int:
        if self.offset + fmt.size > len(self.data):
            raise DecodeError("record truncated")
        value: int  # _take only reads the integer formats (bool() reads its byte itself)
        (value,) = fmt.unpack_from(self.data, self.offset)
        self.offset += fmt.size
        return value

    def int(self) -> int:
        return self._take(_INT)

    # From here on the class body's ``int`` is the method above, so annotations
    # name the type as ``builtins.int``.
    def long(self) -> builtins.int:
        return self._take(_LONG)

    def bool(self) -> bool:
        if self.offset >= len(self.data):
            raise DecodeError("record truncated")
        value = self.data[self.offset] != 0
        self.offset += 1
        return value

    def buffer(self) -> bytes | None:
        length = self.int()
        if length < 0:
            return None
        end = self.offset + length
        if end > len(self.data):
            raise DecodeError("buffer length exceeds the frame")
        value = bytes(self.data[self.offset : end])
        self.offset = end
        return value

    def ustring(self) -> str | None:
        raw = self.buffer()
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("string is not UTF-8") from exc

    def string(self) -> str:
        """A ustring that must not be null (paths, schemes)."""
        value = self.ustring()
        if value is None:
            raise DecodeError("null string where a value is required")
        return value

    def vector(self, item: Callable[[Reader], T]) -> list[T] | None:
        count = self.int()
        if count < 0:
            return None
        # Every element takes at least one byte, so a count beyond what is left
        # is a lie; refusing it early stops a 2**31 loop on a tiny frame.
        if count > self.remaining:
            raise DecodeError("vector count exceeds the frame")
        return [item(self) for _ in range(count)]


class Writer:
    """Appends jute primitives to :attr:`out`."""

    __slots__ = ("out",)

    def __init__(self, out: bytearray | None = None) -> None:
        self.out = bytearray() if out is None else out

    def int(self, value: int) -> None:
        self.out += _INT.pack(value)

    # ``int`` is the method above from here on (see Reader.long).
    def long(self, value: builtins.int) -> None:
        self.out += _LONG.pack(value)

    def bool(self, value: bool) -> None:
        self.out += _BOOL.pack(value)

    def buffer(self, value: bytes | None) -> None:
        if value is None:
            self.out += _INT.pack(-1)
        else:
            self.out += _INT.pack(len(value))
            self.out += value

    def ustring(self, value: str | None) -> None:
        self.buffer(None if value is None else value.encode("utf-8"))

    def vector(self, items: Iterable[T] | None, item: Callable[[Writer, T], None]) -> None:
        if items is None:
            self.out += _INT.pack(-1)
            return
        items = list(items)
        self.out += _INT.pack(len(items))
        for value in items:
            item(self, value)
