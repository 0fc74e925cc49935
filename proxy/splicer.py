"""The ``epoll`` data-plane engine: one thread that copies bytes for every connection.

Why it exists. In trio's copy loop (:mod:`proxy.forward`) each message costs
a task wake-up, a pass through the scheduler and an ``epoll_ctl`` to re-arm
the one-shot registration, on top of the ``recv``/``send`` pair; measured on
the 2-core benchmark machine (``bench/proxy_hop.py``, 128-byte echo) that
is 30-47 µs of CPU per request/response through the proxy, a third of it in
Python, against 13-14 µs for this engine (85% of it in the kernel's
loopback TCP) and 17-19 µs for Envoy 1.40 on one worker. So this engine keeps
trio for everything that happens once per connection (accept, balancing,
connect with retries, outlier detection, the control plane) and hands each
connected pair of sockets to :class:`EpollSplicer`, whose thread copies
bytes with registrations that live as long as the connection: a message
costs one ``recv``, one ``send`` and a share of one ``epoll_wait``.

Threads and ownership. Sockets handed to :meth:`EpollSplicer.add` belong to
the splicer's thread from then on; trio never touches them again. The
handover is a thread-safe deque plus an ``eventfd`` that wakes the thread.
When a pair ends, its ``done(ok)`` callback is run *on the trio thread*
(``TrioToken.run_sync_soon``), so the forwarder's counters are only ever
touched by trio. The thread runs inside :meth:`EpollSplicer.run`, in a
nursery the caller owns; cancelling it stops the thread, which closes the
connections it still has.

Semantics, as trio's loop: half-closes are passed on (``shutdown(SHUT_WR)``
once everything read before the end was written); an error on either side
closes both with a reset (``SO_LINGER`` 0); a destination that does not
take data stops reading from the source (backpressure: at most one receive
buffer is held per direction).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["DoneCallback", "EpollSplicer"]

log = logging.getLogger(__name__)

DoneCallback = Callable[[bool], None]
"""``done(ok)``: the pair ended (ok False: with an error); runs on the trio thread."""

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_HUP_ERR: Final = select.EPOLLHUP | select.EPOLLERR
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class _End:
    """One socket of a pair, and the data waiting to be written to it."""

    __slots__ = ("eof_in", "fd", "mask", "pair", "peer", "pending", "sock")

    def __init__(self, sock: socket.socket, pair: _Pair) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pair = pair
        self.peer: _End = self
        #: Bytes read from the peer that this socket has not taken yet.
        self.pending: memoryview | None = None
        #: This socket's read side has ended (EOF seen).
        self.eof_in = False
        #: What the epoll registration asks for now (0: not registered).
        self.mask = 0


class _Pair:
    __slots__ = ("a", "b", "done", "over")

    def __init__(self, a: socket.socket, b: socket.socket, done: DoneCallback) -> None:
        self.done = done
        self.over = False
        self.a = _End(a, self)
        self.b = _End(b, self)
        self.a.peer, self.b.peer = self.b, self.a


class EpollSplicer:
    """Copies bytes both ways for connected socket pairs; see the module docstring."""

    def __init__(self, chunk: int = 256 * 1024) -> None:
        self.chunk = chunk
        self._inbox: collections.deque[tuple[socket.socket, socket.socket, DoneCallback]] = (
            collections.deque()
        )
        self._wake = -1
        self._stopping = False
        self._token: trio.lowlevel.TrioToken | None = None
        #: Pairs being copied now (read on the trio thread: approximate).
        self.pairs = 0

    # ------------------------------------------------------------- the trio side

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the copying thread until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel)
                task_status.started()
                await trio.to_thread.run_sync(self._loop, abandon_on_cancel=False)
                nursery.cancel_scope.cancel()
        finally:
            os.close(self._wake)
            self._wake = -1
            # Pairs handed over after the thread stopped: nobody will copy them.
            while self._inbox:
                a, b, done = self._inbox.popleft()
                a.close()
                b.close()
                self._finished(done, False)

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._stopping = True
            os.eventfd_write(self._wake, 1)

    def add(self, a: socket.socket, b: socket.socket, done: DoneCallback) -> None:
        """Copy between connected non-blocking ``a`` and ``b`` from now on (the splicer
        owns and closes them); ``done(ok)`` runs on the trio thread when they end."""
        if self._wake < 0:
            raise RuntimeError("the splicer is not running")
        self.pairs += 1
        self._inbox.append((a, b, done))
        os.eventfd_write(self._wake, 1)

    def _finished(self, done: DoneCallback, ok: bool) -> None:
        self.pairs -= 1
        done(ok)

    # ------------------------------------------------------------- the thread

    def _loop(self) -> None:
        ep = select.epoll()
        ends: dict[int, _End] = {}
        wake = self._wake
        ep.register(wake, _IN)
        chunk = self.chunk
        try:
            while not self._stopping:
                for fd, events in ep.poll():
                    if fd == wake:
                        self._take_new(ep, ends)
                        continue
                    end = ends.get(fd)
                    if end is None:
                        continue  # closed earlier in this batch
                    mask = end.mask
                    if mask & _IN and events & (_IN | _HUP_ERR):
                        self._readable(ep, ends, end, chunk)
                    elif mask & _OUT and events & (_OUT | _HUP_ERR):
                        self._writable(ep, ends, end)
                    elif events & select.EPOLLERR:
                        self._abort(ep, ends, end.pair)
        finally:
            for end in list(ends.values()):
                if not end.pair.over:
                    self._close(ep, ends, end.pair, ok=False)
            ep.close()

    def _take_new(self, ep: select.epoll, ends: dict[int, _End]) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        inbox = self._inbox
        while inbox:
            a, b, done = inbox.popleft()
            pair = _Pair(a, b, done)
            for end in (pair.a, pair.b):
                ends[end.fd] = end
                end.mask = _IN
                ep.register(end.fd, _IN)

    def _readable(self, ep: select.epoll, ends: dict[int, _End], src: _End, chunk: int) -> None:
        dst = src.peer
        try:
            data = src.sock.recv(chunk)
        except BlockingIOError:
            return
        except OSError:
            self._abort(ep, ends, src.pair)
            return
        if not data:
            src.eof_in = True
            if dst.pending is None:
                self._shutdown_write(dst)
            self._update(ep, src)
            self._maybe_done(ep, ends, src.pair)
            return
        try:
            sent = dst.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._abort(ep, ends, src.pair)
            return
        if sent < len(data):
            dst.pending = memoryview(data)[sent:]
            self._update(ep, src)
            self._update(ep, dst)

    def _writable(self, ep: select.epoll, ends: dict[int, _End], dst: _End) -> None:
        pending = dst.pending
        assert pending is not None
        try:
            sent = dst.sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._abort(ep, ends, dst.pair)
            return
        if sent < len(pending):
            dst.pending = pending[sent:]
            return
        dst.pending = None
        src = dst.peer
        if src.eof_in:
            self._shutdown_write(dst)
        self._update(ep, dst)
        self._update(ep, src)
        self._maybe_done(ep, ends, dst.pair)

    @staticmethod
    def _shutdown_write(end: _End) -> None:
        with contextlib.suppress(OSError):
            end.sock.shutdown(socket.SHUT_WR)

    @staticmethod
    def _update(ep: select.epoll, end: _End) -> None:
        """Register exactly the interest ``end`` has now (none: unregistered, so a
        hung-up socket nobody reads cannot make a level-triggered epoll spin)."""
        mask = (0 if end.eof_in or end.peer.pending is not None else _IN) | (
            _OUT if end.pending is not None else 0
        )
        if mask == end.mask:
            return
        if not mask:
            ep.unregister(end.fd)
        elif not end.mask:
            ep.register(end.fd, mask)
        else:
            ep.modify(end.fd, mask)
        end.mask = mask

    def _maybe_done(self, ep: select.epoll, ends: dict[int, _End], pair: _Pair) -> None:
        a, b = pair.a, pair.b
        if a.eof_in and b.eof_in and a.pending is None and b.pending is None:
            self._close(ep, ends, pair, ok=True)

    def _abort(self, ep: select.epoll, ends: dict[int, _End], pair: _Pair) -> None:
        for end in (pair.a, pair.b):
            with contextlib.suppress(OSError):
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close(ep, ends, pair, ok=False)

    def _close(self, ep: select.epoll, ends: dict[int, _End], pair: _Pair, *, ok: bool) -> None:
        pair.over = True
        for end in (pair.a, pair.b):
            if end.mask:
                with contextlib.suppress(OSError):
                    ep.unregister(end.fd)
                end.mask = 0
            ends.pop(end.fd, None)
            end.sock.close()
        token = self._token
        assert token is not None
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._finished, pair.done, ok)
