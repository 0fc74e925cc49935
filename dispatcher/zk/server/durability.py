"""Group commit: many writes, one fsync, and nobody sees a write before it is durable.

The engine applies each write to the in-memory tree at once (so that the next
request is checked against it, as ZooKeeper's PrepRequestProcessor checks
against its outstanding changes), then hands the paths it touched to a
:class:`GroupCommit`. From that moment until those paths are on disk, every
byte the engine sends (to any client: the write's reply, watch events, and
replies to reads that could show the write) and every close it asks for is
held here, in order. The commit task writes all the paths gathered so far in
one SQLite transaction, in a worker thread, while the event loop goes on
taking requests, which gather into the next group; once the fsync returns it
releases what the group held, in the order it was sent.

So an acknowledged write is durable (as before), a reply or an event that
shows a write leaves only after the write is durable (no client can observe a
write a crash would lose), per-connection ordering and "a watch event before
any reply that shows the new state" hold because one ordered list carries
everything, and writes that arrive during a commit share the next fsync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import trio

__all__ = ["GroupCommit"]


class _Peer(Protocol):
    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _Group:
    __slots__ = ("held", "held_bytes", "paths")

    def __init__(self) -> None:
        self.paths: dict[str, None] = {}
        # (peer, bytes to send) or (peer, None): close it.
        self.held: list[tuple[_Peer, bytes | None]] = []
        self.held_bytes = 0


class GroupCommit:
    """Gathers written paths into groups, commits each group with one fsync,
    and holds what the engine sends until the group before it is durable.

    ``prepare(paths)`` runs in the event loop when a group closes: it reads
    the paths' current state and returns the function that writes it, which
    runs in a worker thread (one at a time) while later writes go on.
    """

    def __init__(self, prepare: Callable[[Iterable[str]], Callable[[], None]]) -> None:
        self._prepare = prepare
        # Writes applied and not yet handed to the disk, with what was sent since.
        self._open: _Group | None = None
        # A group is being written; what is sent meanwhile waits behind it.
        self._committing = False
        self._wake = trio.Event()
        self._durable = trio.Event()
        #: Groups written and fsyncs done (for ``mntr`` and the benchmark).
        self.commits = 0

    @property
    def holding(self) -> bool:
        """True while something sent now would have to wait for a commit."""
        return self._open is not None or self._committing

    @property
    def held_bytes(self) -> int:
        return 0 if self._open is None else self._open.held_bytes

    def add(self, paths: Iterable[str]) -> None:
        """Paths a write changed in the tree: they go to disk with the next fsync."""
        # The commit task was woken when the open group was made: while a
        # group is open, the task either has the wake still to see or is in
        # its loop, which takes every group there is before it waits again.
        gathered = self._group().paths
        for path in paths:
            gathered[path] = None

    def add_path(self, path: str) -> None:
        """``add((path,))`` for one path, without the tuple: a setData's only one."""
        group = self._open
        if group is None:
            group = self._group()
        group.paths[path] = None

    def send(self, peer: _Peer, data: bytes) -> None:
        """Send ``data`` to ``peer`` once the writes before it are durable (at
        once when none is waiting)."""
        group = self._open
        if group is None:
            if not self._committing:
                peer.send(data)
                return
            group = self._group()
        group.held.append((peer, data))
        group.held_bytes += len(data)

    def close(self, peer: _Peer) -> None:
        if not self.holding:
            peer.close()
            return
        self._group().held.append((peer, None))

    async def wait_durable(self) -> None:
        """Until the group being written now (if any) is on disk."""
        await self._durable.wait()

    def _group(self) -> _Group:
        if self._open is None:
            self._open = _Group()
            self._wake.set()
        return self._open

    async def run(self) -> None:
        """The commit task: runs until cancelled. A failed write raises: the
        gateway then stops, because acknowledging anything after the disk
        refused a write would be a lie."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._open is not None:
                group, self._open = self._open, None
                self._committing = True
                if group.paths:
                    await trio.to_thread.run_sync(self._prepare(group.paths))
                    self.commits += 1
                self._committing = False
                durable, self._durable = self._durable, trio.Event()
                durable.set()
                _release(group.held)


def _release(held: list[tuple[_Peer, bytes | None]]) -> None:
    """Send what was held, one write per peer: only each peer's own order
    matters, and a group can hold thousands of replies for a few peers."""
    out: dict[_Peer, list[bytes]] = {}
    closing: list[_Peer] = []
    for peer, data in held:
        if data is None:
            closing.append(peer)
        elif peer not in closing:  # nothing reaches a peer after its close
            out.setdefault(peer, []).append(data)
    for peer, chunks in out.items():
        peer.send(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    for peer in closing:
        peer.close()
