"""Helpers shared by the fuzz targets; nothing here needs atheris."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Callable, Iterator


class Cursor:
    """Takes choices out of a fuzz input, front to back, never failing.

    atheris's FuzzedDataProvider does the same, but targets must also run
    without atheris (the pytest replay of the corpus), so the few choices the
    structured targets make are read here. An exhausted cursor answers zeros,
    which keeps every input meaningful.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def byte(self) -> int:
        if self.offset >= len(self.data):
            return 0
        value = self.data[self.offset]
        self.offset += 1
        return value

    def pick(self, count: int) -> int:
        """An index in ``range(count)`` (``count`` at most 65536)."""
        return ((self.byte() << 8) | self.byte()) % count

    def take(self, size: int) -> bytes:
        value = self.data[self.offset : self.offset + size]
        self.offset += len(value)
        return value

    def rest(self) -> bytes:
        return self.take(self.remaining)


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes, as a socket might deliver it."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def instrument(*packages: str) -> None:
    """Add atheris's coverage instrumentation to every function already loaded
    from ``packages`` (and their submodules).

    Call it from a target's ``__main__`` block, after the target's imports:
    ``atheris.instrument_all()`` would do the same for everything loaded (trio,
    grpc, protobuf...), which takes minutes on a busy machine and steers the
    fuzzer by branches of no interest.
    """
    import atheris

    def wanted(module: object) -> bool:
        return isinstance(module, str) and any(
            module == package or module.startswith(package + ".") for package in packages
        )

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and wanted(obj.__module__):
            atheris.instrument_func(obj)


def fuzz_main(test_one_input: Callable[[bytes], None], *packages: str) -> None:
    """A target's ``__main__``: instrument ``packages`` and run libFuzzer with
    the command line's arguments (corpus directories, ``-runs``, ...)."""
    import atheris

    instrument(*packages)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
