"""Idle connections, held without a task each.

A ZooKeeper client keeps its connection open for the life of its session and
says nothing between heartbeats, so most of a server's connections, most of
the time, wait for their socket to become readable. In trio each such wait is
a task: the task, its coroutine frames, its cancel status and the event loop's
registration come to some 4 KiB, most of what an idle session costs. Here an
idle connection is instead one entry in an epoll set that a single task
watches; when its socket has something to read, or the server must write to it
or close it, it gets a task again.

Linux only (epoll). Where :class:`IdleConnections` is not running, nothing is
parked and each connection keeps its task.
"""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

Connection = TypeVar("Connection")


class IdleConnections(Generic[Connection]):
    """Connections parked by file descriptor until their socket is readable.

    ``resume(connection)`` runs as a new task when a parked connection has
    work; it parks the connection again (with :meth:`park`) when it is idle,
    or ends it. ``end(connection)`` is called, synchronously, for each
    connection still parked when :meth:`run` stops.
    """

    def __init__(
        self,
        resume: Callable[[Connection], Awaitable[None]],
        end: Callable[[Connection], None],
    ) -> None:
        self._resume = resume
        self._end = end
        self._epoll: select.epoll | None = None
        self._nursery: trio.Nursery | None = None
        self._parked: dict[int, Connection] = {}

    @property
    def running(self) -> bool:
        """Whether connections can be parked (between :meth:`run`'s start and end)."""
        return self._nursery is not None

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, fd: int, connection: Connection) -> None:
        """Hold ``connection`` without a task until ``fd`` is readable (or
        hung up) or :meth:`wake` is called for it. Only while running."""
        assert self._epoll is not None, "park() outside run()"
        # Level-triggered: bytes that arrived before this call wake it at once.
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = connection

    def wake(self, fd: int) -> bool:
        """Give the connection parked at ``fd`` a task again; False if none is."""
        connection = self._parked.pop(fd, None)
        if connection is None:
            return False
        # Parked connections exist only while run() runs (it ends those left).
        assert self._epoll is not None and self._nursery is not None
        self._epoll.unregister(fd)
        self._nursery.start_soon(self._resume, connection)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the parked connections until cancelled; then end those left."""
        with select.epoll() as epoll:
            self._epoll = epoll
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    while True:
                        await trio.lowlevel.wait_readable(epoll.fileno())
                        for fd, _ in epoll.poll(0):
                            self.wake(fd)
            finally:
                self._nursery = None
                self._epoll = None
                parked, self._parked = self._parked, {}
                for connection in parked.values():
                    self._end(connection)


__all__ = ["IdleConnections"]
