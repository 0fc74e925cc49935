"""One service's copy compared with its source: the ids that differ, and how to repair it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import attrs

__all__ = ["Check", "Difference", "compare"]

_V = TypeVar("_V")


@attrs.frozen
class Difference:
    """What differs for one service in one copy (``target``) at one moment.

    ``repair`` resyncs just that service in that copy, checks it again and
    returns whether it is now equal (False also when it could not be tried
    safely, e.g. the copy changed meanwhile; the next pass retries). It may
    be a coroutine function where the resync needs a round trip (a mirror's
    reload, an xDS stream's ACK).
    """

    target: str
    service: str
    missing: frozenset[str]
    extra: frozenset[str]
    differing: frozenset[str]
    #: The version of each record that differs (the source's for a missing
    #: one, the copy's for the others: a revision, the data): a record that
    #: changed between two checks is still moving, not stuck.
    stamps: Mapping[str, object] = attrs.field(factory=dict, eq=False, repr=False)
    repair: Callable[[], bool | Awaitable[bool]] | None = attrs.field(
        default=None, eq=False, repr=False
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.target, self.service)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.differing)

    def persisting(self, later: Difference) -> Difference:
        """The part of this difference that ``later`` still shows unchanged, with
        ``later``'s repair: an id that differs both times, its copy not moved meanwhile."""

        def still(mine: frozenset[str], theirs: frozenset[str]) -> frozenset[str]:
            return frozenset(
                key for key in mine & theirs if self.stamps.get(key) == later.stamps.get(key)
            )

        return attrs.evolve(
            later,
            missing=still(self.missing, later.missing),
            extra=still(self.extra, later.extra),
            differing=still(self.differing, later.differing),
        )


@attrs.frozen
class Check:
    """One comparison of a layer: its differences, services compared, requests made."""

    differences: tuple[Difference, ...]
    services: int
    reads: int = 0
    skipped: tuple[str, ...] = ()


def compare(
    target: str,
    service: str,
    source: Mapping[str, _V],
    copy: Mapping[str, _V],
    *,
    equal: Callable[[_V, _V], bool],
    newer: Callable[[_V], bool] = lambda _value: False,
    stamp: Callable[[_V], object] = lambda value: value,
) -> Difference:
    """``copy`` against ``source``, both by id. A record of ``copy`` for which
    ``newer`` holds arrived after ``source`` was read, so it is not compared;
    ``stamp`` gives the version of a copy's record (see :attr:`Difference.stamps`)."""
    missing = frozenset(key for key in source if key not in copy)
    extra = frozenset(key for key, value in copy.items() if key not in source and not newer(value))
    differing = frozenset(
        key
        for key, value in copy.items()
        if key in source and not newer(value) and not equal(source[key], value)
    )
    stamps = {key: stamp(copy[key]) for key in extra | differing}
    stamps.update((key, stamp(source[key])) for key in missing)
    return Difference(target, service, missing, extra, differing, stamps)
