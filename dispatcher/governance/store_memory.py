"""The governance store in memory, for unit tests of what sits above the store (the feed,
the policy documents) and for ``[membership] kind = "memory"``, a single process.

Never a stand-in for ZooKeeper or etcd in a test of the store itself: those run against the
real servers. The rules are the same: one write is one step (nothing awaits halfway), a stale
``expected_version`` is a Conflict, and only the last ``max_history`` revisions are kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from dispatcher.governance.store import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HISTORY,
    Conflict,
    GovernanceStore,
    Revision,
)

__all__ = ["MemoryGovernance", "MemoryGovernanceStore"]


class MemoryGovernance:
    """What every :class:`MemoryGovernanceStore` of one process shares: revisions by kind."""

    def __init__(self) -> None:
        self.revisions: dict[str, dict[int, Revision]] = {}
        self.changed: dict[str, trio.Event] = {}

    def head(self, kind: str) -> Revision | None:
        kept = self.revisions.get(kind)
        return kept[max(kept)] if kept else None

    def event(self, kind: str) -> trio.Event:
        return self.changed.setdefault(kind, trio.Event())


class MemoryGovernanceStore(GovernanceStore):
    """One kind of document in a :class:`MemoryGovernance`."""

    def __init__(
        self,
        shared: MemoryGovernance,
        kind: str,
        *,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        super().__init__(kind, max_history=max_history, max_body=max_body)
        self.shared = shared

    async def current(self) -> Revision | None:
        await trio.lowlevel.checkpoint()
        return self.shared.head(self.kind)

    async def revision(self, version: int) -> Revision | None:
        await trio.lowlevel.checkpoint()
        return self.shared.revisions.get(self.kind, {}).get(version)

    async def _history(self, limit: int | None) -> list[Revision]:
        await trio.lowlevel.checkpoint()
        kept = self.shared.revisions.get(self.kind, {})
        return [kept[v] for v in sorted(kept, reverse=True)][:limit]

    async def _commit(self, revision: Revision, expected_version: int) -> None:
        await trio.lowlevel.checkpoint()
        head = self.shared.head(self.kind)
        current = 0 if head is None else head.version
        if current != expected_version:
            raise Conflict(self.kind, current, expected_version)
        kept = self.shared.revisions.setdefault(self.kind, {})
        kept[revision.version] = revision
        for version in [v for v in kept if v < self._oldest_kept(revision.version)]:
            del kept[version]
        self.shared.event(self.kind).set()
        self.shared.changed[self.kind] = trio.Event()

    async def watch(self) -> AsyncIterator[Revision]:
        seen = 0
        while True:
            changed = self.shared.event(self.kind)
            head = self.shared.head(self.kind)
            if head is not None and head.version > seen:
                seen = head.version
                yield head
            await changed.wait()
