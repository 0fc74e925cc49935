"""The other side of ``bench/fanin.py``'s latency runs: the writer and the direct watcher.

Both live in a separate process from the fan-in under test, so that the
reference measurement (the upstream's own watch latency) shares no GIL, no
event loop and no threads with it: a registry's writers and its other
watchers are elsewhere in a real deployment too. Times are
``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on the
machine), so the fan-in process can subtract this process's write times from
its own arrival times.

The writes: for each sample ``k`` the writer registers one instance and,
``gap`` seconds after the reply, removes it again, then waits ``gap`` again.
Each of the two is a timed *write* (:func:`write_number`), so the service
keeps its preloaded size whatever the number of samples (the adapters'
per-event work grows with a service's size) and removals are measured as
well as additions. ``t0`` is taken just before each write leaves.

* ZooKeeper: two raw connections (:class:`tests.zkwire.WireClient` framing, no
  client library): one creates and deletes the instance znodes, the other
  holds a child watch on the service directory, re-armed by the
  ``getChildren`` that follows each notification, then reads ``getData`` of
  each new child. Noted per write: the notification's arrival, and when the
  reads a client needs to learn what changed came back (``getChildren``, plus
  ``getData`` for a creation). Frames are timestamped as soon as they are
  complete, whatever request was pending.
* etcd: python-etcd3 (the library the adapter uses): ``put``/``delete`` for the
  writes, a prefix watch (one gRPC stream; the callback runs in python-etcd3's
  watch thread) for the notifications. An etcd watch event carries the value,
  so no read follows.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import attrs

from adapters.layouts import plain
from dispatcher.core.model import Instance
from dispatcher.zk.codec.jute import Reader
from dispatcher.zk.codec.protocol import XID_NOTIFICATION, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    CreateRequest,
    DeleteRequest,
    GetChildrenResponse,
    PathWatchRequest,
    ReplyHeader,
    WatcherEvent,
)
from tests.zkwire import WireClient

__all__ = [
    "PeerResult",
    "etcd_peer",
    "grpc_value",
    "preload_instance",
    "sample_host",
    "sample_instance",
    "write_number",
    "zk_peer",
]

_NODE_CHILDREN_CHANGED = 4
_NO_NODE = -101
_SAMPLE_PORT = 8000
# How long the watcher may lag the writer's last reply before the peer gives up on it.
_DRAIN_TIMEOUT = 10.0


def write_number(k: int, removal: bool) -> int:
    """The index of sample ``k``'s registration (even) or removal (odd) among all writes."""
    return 2 * k + removal


def sample_host(k: int) -> str:
    """A host unique to sample ``k``: the fan-in merges by endpoint, so each needs its own."""
    return f"10.{200 + k // 65536}.{k // 256 % 256}.{k % 256}"


def _instance(service: str, instance_id: str, host: str) -> Instance:
    return Instance(
        service,
        instance_id,
        host,
        _SAMPLE_PORT,
        zone="az1",
        metadata={"version": "1.4.2", "application": "bench-app"},
    )


def sample_instance(service: str, k: int) -> Instance:
    """What sample ``k`` registers: a realistic small record (two metadata keys)."""
    return _instance(service, f"i-{k:06d}", sample_host(k))


def preload_instance(service: str, p: int) -> Instance:
    """The ``p``-th instance the service holds before sampling starts (never touched)."""
    return _instance(service, f"p-{p:06d}", f"10.199.{p // 256 % 256}.{p % 256}")


def grpc_value(instance: Instance) -> str:
    """``instance`` in etcd's gRPC naming format, as ``endpoints.Manager`` writes it."""
    return json.dumps(
        {
            "Op": 0,
            "Addr": f"{instance.host}:{instance.port}",
            "Metadata": dict(instance.metadata),
        }
    )


@attrs.frozen
class PeerResult:
    """What the peer measured, by write number: write start, notification, reads done (ns)."""

    sent: dict[int, int]
    notified: dict[int, int]
    read: dict[int, int]
    error: str = ""
    #: CPU seconds this peer process used (all its threads).
    cpu: float = 0.0


def _pace(gap: float) -> None:
    # Deliberate spacing between writes (not synchronisation): each write's
    # events must be alone in the pipeline, or they would batch or queue.
    time.sleep(gap)


# ---------------------------------------------------------------------- ZooKeeper


class _TimedConnection:
    """A raw ZooKeeper session whose every frame is timestamped on arrival.

    WireClient's ``receive`` would queue a notification that arrives during a
    request and hand it out later; here each one is noted with its own arrival
    time instead, so a late re-arm never delays a measurement.
    """

    def __init__(self, host: str, port: int, session_ms: int) -> None:
        self.wire = WireClient(host, port, timeout=30.0)
        self.wire.connect(timeout_ms=session_ms)
        self.events: list[tuple[int, WatcherEvent]] = []

    def _frame(self) -> tuple[ReplyHeader, Reader]:
        payload = self.wire.read_frame()
        now = time.monotonic_ns()
        if payload is None:
            raise ConnectionError("ZooKeeper closed the connection")
        reader = Reader(payload)
        header = ReplyHeader.read(reader)
        if header.xid == XID_NOTIFICATION:
            self.events.append((now, WatcherEvent.read(reader)))
        return header, reader

    def call(self, opcode: int, record: Any, *, allowed: tuple[int, ...] = ()) -> Reader:
        """Send one request and wait for its reply; a non-zero error not in ``allowed`` raises."""
        xid = self.wire.send(opcode, record)
        while True:
            header, reader = self._frame()
            if header.xid == xid:
                if header.err and header.err not in allowed:
                    raise RuntimeError(f"opcode {opcode} failed with error {header.err}")
                return reader
            if header.xid != XID_NOTIFICATION:
                raise RuntimeError(f"reply for xid {header.xid} while waiting for {xid}")

    def wait_event(self) -> tuple[int, WatcherEvent]:
        while not self.events:
            self._frame()
        return self.events.pop(0)

    def children(self, path: str, watch: bool) -> tuple[str, ...]:
        reader = self.call(OpCode.GET_CHILDREN, PathWatchRequest(path, watch))
        return GetChildrenResponse.read(reader).children

    def close(self) -> None:
        with contextlib.suppress(OSError):
            # Wakes a thread blocked reading this connection.
            self.wire.sock.shutdown(socket.SHUT_RDWR)
        self.wire.close()


@attrs.define
class _ZkWatch:
    """The direct watcher's loop, run in its own thread of the peer process."""

    connection: _TimedConnection
    directory: str
    #: Instance znode name -> sample number.
    index: dict[str, int]
    writes: int
    notified: dict[int, int] = attrs.Factory(dict)
    read: dict[int, int] = attrs.Factory(dict)
    ready: threading.Event = attrs.Factory(threading.Event)

    def run(self) -> None:
        known = set(self.connection.children(self.directory, watch=True))
        self.ready.set()
        while len(self.notified) < self.writes:
            arrived, event = self.connection.wait_event()
            if event.type != _NODE_CHILDREN_CHANGED or event.path != self.directory:
                continue
            # Re-armed at once: the next write may follow soon.
            current = set(self.connection.children(self.directory, watch=True))
            listed = time.monotonic_ns()
            for name in known - current:
                if name in self.index:
                    j = write_number(self.index[name], removal=True)
                    self.notified[j], self.read[j] = arrived, listed
            for name in current - known:
                if name in self.index:
                    # Already deleted again (a slow machine): learning that is the read too.
                    self.connection.call(
                        OpCode.GET_DATA,
                        PathWatchRequest(f"{self.directory}/{name}", False),
                        allowed=(_NO_NODE,),
                    )
                    j = write_number(self.index[name], removal=False)
                    self.notified[j], self.read[j] = arrived, time.monotonic_ns()
            known = current


def zk_peer(
    host: str, port: int, directory: str, service: str, samples: int, gap: float, out: Connection
) -> None:
    """Create and delete ``samples`` plain-layout instance znodes under ``directory``.

    Watches them directly meanwhile; sends a :class:`PeerResult` (as a dict)
    through ``out``.
    """
    session_ms = int(max(120.0, samples * gap * 8 + 60) * 1000)
    instances = [sample_instance(service, k) for k in range(samples)]
    watcher = _ZkWatch(
        _TimedConnection(host, port, session_ms),
        directory,
        {instance.instance_id: k for k, instance in enumerate(instances)},
        2 * samples,
    )
    writer = _TimedConnection(host, port, session_ms)
    sent: dict[int, int] = {}
    failure: list[BaseException] = []
    error = ""

    def watch() -> None:
        try:
            watcher.run()
        except (OSError, ConnectionError, RuntimeError, struct.error) as exc:
            failure.append(exc)
            watcher.ready.set()

    thread = threading.Thread(target=watch, name="zk-direct-watch", daemon=True)
    thread.start()
    try:
        if not watcher.ready.wait(30.0):
            raise TimeoutError("the direct watcher did not arm its watch")
        for k, instance in enumerate(instances):
            name, data = plain.render(instance)
            path = f"{directory}/{name}"
            create = CreateRequest(path, data, OPEN_ACL_UNSAFE, 0)
            sent[write_number(k, removal=False)] = time.monotonic_ns()
            writer.call(OpCode.CREATE, create)
            _pace(gap)
            sent[write_number(k, removal=True)] = time.monotonic_ns()
            writer.call(OpCode.DELETE, DeleteRequest(path, -1))
            _pace(gap)
        thread.join(_DRAIN_TIMEOUT)
    except Exception as exc:  # reported to the parent, which prints it
        error = repr(exc)
    finally:
        watcher.connection.close()
        writer.close()
    if failure and not error and len(watcher.notified) < 2 * samples:
        error = repr(failure[0])
    result = PeerResult(
        sent, dict(watcher.notified), dict(watcher.read), error, time.process_time()
    )
    out.send(attrs.asdict(result))
    out.close()


# --------------------------------------------------------------------------- etcd


def etcd_peer(
    host: str, port: int, prefix: str, service: str, samples: int, gap: float, out: Connection
) -> None:
    """Put and delete ``samples`` gRPC-naming keys under ``prefix + service + '/'``.

    Watches them directly meanwhile; sends a :class:`PeerResult` (as a dict)
    through ``out``.
    """
    import etcd3  # only the etcd peer needs it
    import etcd3.events

    directory = f"{prefix}{service}/"
    instances = [sample_instance(service, k) for k in range(samples)]
    index = {f"{directory}{instance.instance_id}": k for k, instance in enumerate(instances)}
    sent: dict[int, int] = {}
    notified: dict[int, int] = {}
    done = threading.Event()
    error = ""

    def on_response(response: Any) -> None:
        arrived = time.monotonic_ns()
        if isinstance(response, BaseException):
            done.set()
            return
        for event in response.events:
            k = index.get(event.key.decode())
            if k is not None:
                removal = isinstance(event, etcd3.events.DeleteEvent)
                notified.setdefault(write_number(k, removal), arrived)
        if len(notified) >= 2 * samples:
            done.set()

    client = etcd3.client(host, port, timeout=30)
    watch_id: int | None = None
    try:
        # Returns once etcd confirmed the watch: no write can slip in before it.
        watch_id = client.add_watch_prefix_callback(directory, on_response)
        for k, instance in enumerate(instances):
            key = f"{directory}{instance.instance_id}"
            value = grpc_value(instance)
            sent[write_number(k, removal=False)] = time.monotonic_ns()
            client.put(key, value)
            _pace(gap)
            sent[write_number(k, removal=True)] = time.monotonic_ns()
            client.delete(key)
            _pace(gap)
        done.wait(_DRAIN_TIMEOUT)
    except Exception as exc:  # reported to the parent, which prints it
        error = repr(exc)
    finally:
        if watch_id is not None:
            with contextlib.suppress(Exception):  # etcd may be gone; close() ends it anyway
                client.cancel_watch(watch_id)
        client.close()
    out.send(attrs.asdict(PeerResult(sent, dict(notified), {}, error, time.process_time())))
    out.close()


PeerFunction = Callable[[str, int, str, str, int, float, Connection], None]
"""The signature of :func:`zk_peer` and :func:`etcd_peer`."""
