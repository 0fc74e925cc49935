"""The load of ``bench/xds_push.py``: N ADS streams, or N subscribers of zkgate's own protocol.

One worker process (``multiprocessing``, spawn) runs ``count`` clients of
one kind on an asyncio loop:

* ``xds``: a gRPC ADS stream each (grpcio's ``grpc.aio``; one channel, and
  so one TCP connection, per stream, as N Envoys would hold), State of the
  World, subscribed to the service's ``ClusterLoadAssignment`` alone. Every
  response is parsed (``DiscoveryResponse``) and ACKed with its version and
  nonce at once, as Envoy does;
* ``own``: a TCP connection each speaking :mod:`dispatcher.wire`: Hello,
  Subscribe to the service, then an ``Ack`` for every ``Full`` or ``Deltas``,
  keeping the instances (id to host) as a proxy does.

The driver arms a round with ``("expect", round, host, present)``: whether
the sample instance on ``host`` must be in the service after the write.
Each client notes, for the first message of the round that leaves it in
that state, the time just after its ACK was written
(``time.monotonic_ns``, CLOCK_MONOTONIC, the driver's clock too). When all
``count`` have, the worker sends ``("done", round, times, sizes)``; sizes
are the serialized sizes of the ``ClusterLoadAssignment`` resources
(``Any``) the xDS clients received in that round (empty for ``own``).
``"stop"`` closes every client and ends the process.

The clients here cost the machine CPU that the server would otherwise get;
the driver reports this process's CPU per round beside the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from dispatcher import wire
from dispatcher.cli import tune_gc
from dispatcher.faces.xds.resources import ENDPOINTS

__all__ = ["load_main"]

_ADS: Final = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
# Connections opened at once while setting up: the listeners' backlogs and
# the gRPC handshakes stay small.
_CONNECTING: Final = 50
_LENGTH: Final = struct.Struct(">I")
_SETUP_TIMEOUT: Final = 120.0


class _Round:
    """One armed round: what the clients wait for and when each got there."""

    def __init__(self, number: int, host: str, present: bool, count: int) -> None:
        self.number = number
        self.host = host
        # SocketAddress.address (field 2) as it appears in an encoded assignment,
        # tag and length included, so that 10.200.0.1 never matches 10.200.0.12.
        self.host_bytes = bytes((0x12, len(host))) + host.encode()
        self.present = present
        self.times: list[int | None] = [None] * count
        self.sizes: list[int] = []
        self.remaining = count


class _Load:
    def __init__(self, count: int, conn: Connection) -> None:
        self.count = count
        self.conn = conn
        self.round: _Round | None = None
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connected(self) -> None:
        self.ready += 1
        if self.ready == self.count:
            self.all_ready.set()

    def fail(self, message: str) -> None:
        if not self.failed.done():
            self.failed.set_result(message)

    def reached(self, index: int, present: Callable[[bytes, str], bool]) -> bool:
        """Whether client ``index`` still waits in this round and its state (``present``
        asked about the round's host) is now the one the round waits for."""
        current = self.round
        return (
            current is not None
            and current.times[index] is None
            and present(current.host_bytes, current.host) is current.present
        )

    def note(self, index: int, size: int | None) -> None:
        current = self.round
        assert current is not None
        current.times[index] = time.monotonic_ns()
        if size is not None:
            current.sizes.append(size)
        current.remaining -= 1
        if current.remaining == 0:
            self.conn.send(("done", current.number, current.times, current.sizes))
            self.round = None


async def _xds_client(
    load: _Load, index: int, name: int, port: int, service: str, gate: asyncio.Semaphore
) -> None:
    async with gate:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            # No BDP PINGs (Envoy sends none either): each would cost a write
            # here and a PING ACK at the server per response.
            options=(("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)),
        )
        call = channel.stream_stream(_ADS, request_serializer=None, response_deserializer=None)()
        node = base_pb2.Node(id=f"bench-{name}", cluster="bench")
        first = discovery_pb2.DiscoveryRequest(
            node=node, type_url=ENDPOINTS, resource_names=[service]
        )
        await call.write(first.SerializeToString())
        response = discovery_pb2.DiscoveryResponse.FromString(await call.read())
        await call.write(_xds_ack(response, service))
    load.connected()
    try:
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                load.fail(f"xds stream {index} ended")
                return
            response = discovery_pb2.DiscoveryResponse.FromString(raw)
            await call.write(_xds_ack(response, service))
            resources = response.resources
            body = resources[0].value if resources else b""

            def present(host: bytes, _name: str, body: bytes = body) -> bool:
                return host in body

            if load.reached(index, present):
                load.note(index, resources[0].ByteSize() if resources else 0)
    finally:
        call.cancel()
        await channel.close()


def _xds_ack(response: discovery_pb2.DiscoveryResponse, service: str) -> bytes:
    return discovery_pb2.DiscoveryRequest(
        type_url=response.type_url,
        resource_names=[service],
        version_info=response.version_info,
        response_nonce=response.nonce,
    ).SerializeToString()


async def _read_message(reader: asyncio.StreamReader) -> wire.Message:
    (length,) = _LENGTH.unpack(await reader.readexactly(4))
    return wire.decode(await reader.readexactly(length))


async def _own_client(
    load: _Load, index: int, name: int, port: int, service: str, gate: asyncio.Semaphore
) -> None:
    from bench.xds_push_dispatcher import TOKEN

    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, f"bench-{name}")))
        welcome = await _read_message(reader)
        if not isinstance(welcome, wire.Welcome):
            load.fail(f"subscriber {index}: expected Welcome, got {welcome!r}")
            return
        writer.write(wire.encode(wire.Subscribe({service: None})))
        hosts: dict[str, str] = {}
        first = await _read_message(reader)
        if not isinstance(first, wire.Full):
            load.fail(f"subscriber {index}: expected Full, got {first!r}")
            return
        hosts = {i.id: i.host for i in first.instances}
        writer.write(wire.encode(wire.Ack(service, first.version)))
    load.connected()

    def present(_host: bytes, host: str) -> bool:
        return host in hosts.values()

    try:
        while True:
            try:
                message = await _read_message(reader)
            except asyncio.IncompleteReadError:
                load.fail(f"subscriber {index}: connection closed")
                return
            if isinstance(message, wire.Ping):
                writer.write(wire.encode(wire.Pong()))
                continue
            if isinstance(message, wire.Full):
                hosts = {i.id: i.host for i in message.instances}
                version = message.version
            elif isinstance(message, wire.Deltas):
                for instance_id in message.removed:
                    hosts.pop(instance_id, None)
                for instance in message.upserted:
                    hosts[instance.id] = instance.host
                version = message.to_version
            else:
                load.fail(f"subscriber {index}: unexpected {message!r}")
                return
            writer.write(wire.encode(wire.Ack(service, version)))
            if load.reached(index, present):
                load.note(index, None)
    finally:
        writer.close()


async def _run(
    kind: str, port: int, count: int, first: int, service: str, conn: Connection
) -> None:
    load = _Load(count, conn)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)

    def command() -> None:
        while conn.poll():
            try:
                commands.put_nowait(conn.recv())
            except EOFError:
                commands.put_nowait("stop")
                loop.remove_reader(conn.fileno())
                return

    loop.add_reader(conn.fileno(), command)
    client = _xds_client if kind == "xds" else _own_client
    gate = asyncio.Semaphore(_CONNECTING)

    async def guarded(index: int) -> None:
        try:
            await client(load, index, first + index, port, service, gate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            load.fail(f"{kind} client {first + index}: {exc!r}")

    tasks = [asyncio.create_task(guarded(i)) for i in range(count)]
    try:
        ready = asyncio.create_task(load.all_ready.wait())
        done, _ = await asyncio.wait(
            (ready, load.failed), timeout=_SETUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if load.failed.done():
            conn.send(("error", load.failed.result()))
            return
        if ready not in done:
            conn.send(("error", f"only {load.ready} of {count} {kind} clients connected"))
            return
        conn.send(("ready", count))
        while True:
            getting = asyncio.create_task(commands.get())
            await asyncio.wait((getting, load.failed), return_when=asyncio.FIRST_COMPLETED)
            if load.failed.done():
                getting.cancel()
                conn.send(("error", load.failed.result()))
                return
            message = getting.result()
            if message == "stop":
                return
            _, number, host, present = message
            load.round = _Round(number, host, present, count)
            conn.send(("armed", number))
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def load_main(kind: str, port: int, count: int, first: int, service: str, conn: Connection) -> None:
    """Process entry point; see the module docstring. ``kind`` is ``xds`` or ``own``."""
    # The load should cost the machine as little as it can: collect young
    # objects as rarely as zkgate itself does (a thousand clients' objects
    # would otherwise be walked many times per round).
    tune_gc()
    try:
        asyncio.run(_run(kind, port, count, first, service, conn))
    finally:
        conn.close()
