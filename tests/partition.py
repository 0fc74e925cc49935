"""A TCP forwarder in front of a real server, whose connections a test can break.

Killing a server is one failure; a network partition that the server survives
is another, and the interesting one for sessions: the server keeps the
session (and lets other clients change things) while the client cannot reach
it. Tests put a :class:`Partition` between a client and a real server.
"""

from __future__ import annotations

import trio


class _Link:
    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.frozen = False


class Partition:
    """A TCP forwarder in front of a real server whose links a test can break.

    ``cut`` closes every forwarded connection and refuses new ones (accept,
    then close), as a network partition that the server itself survives.
    ``freeze`` makes the connections open now go silent both ways while
    staying open (a peer behind a dead NAT); new connections work.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._cut = False
        self._links: set[_Link] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, listeners)

    def cut(self) -> None:
        self._cut = True
        for link in self._links:
            link.scope.cancel()

    def heal(self) -> None:
        self._cut = False

    def freeze(self) -> None:
        for link in self._links:
            link.frozen = True

    async def _forward(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            if self._cut:
                return
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return  # the server is down: the client sees a closed connection
            async with upstream, trio.open_nursery() as nursery:
                link = _Link(nursery.cancel_scope)
                self._links.add(link)
                try:
                    nursery.start_soon(self._pump, downstream, upstream, link)
                    await self._pump(upstream, downstream, link)
                finally:
                    self._links.discard(link)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, link: _Link) -> None:
        try:
            while data := await source.receive_some(65536):
                if not link.frozen:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        link.scope.cancel()


__all__ = ["Partition"]
