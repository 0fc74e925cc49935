"""The admin endpoint under slow clients (issue #13): deadlines, the per-address
cap, eviction of the connection waiting longest, and /health during an attack.

The unit tests drive :meth:`AdminServer.serve_stream` over in-memory streams
with trio's MockClock (autojump), so every deadline is checked to the instant
it is promised at, in no real time. The attack tests run a real zkgate and the
measurement of ``bench/admin_slowloris.py`` against its admin port on
loopback, where the slow clients share 127.0.0.1 with the prober.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from bench.admin_slowloris import measure
from dispatcher.config import ConfigError, parse_config
from dispatcher.faces.admin.http import AdminLimits, AdminServer
from dispatcher.gateway import Gateway, run_gateway
from tests.servers import ServerFactory, ZkgateServer, free_port

REQUEST = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
CLOSING = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
HEADER_TIMEOUT = AdminLimits().header_timeout
IDLE_TIMEOUT = AdminLimits().idle_timeout


# ---------------------------------------------------------------------- helpers

Pair = Callable[[], tuple[trio.StapledStream, trio.StapledStream]]


@asynccontextmanager
async def endpoint(
    tmp_path: Path, limits: AdminLimits | None = None
) -> AsyncIterator[tuple[AdminServer, Callable[..., trio.StapledStream]]]:
    """An admin server over a gateway that is not running, and ``connect(address,
    pair=memory_stream_pair)``: a client stream served as coming from ``address``."""
    config = parse_config({"zookeeper": {"data_dir": str(tmp_path / "data")}})
    admin = AdminServer(Gateway(config), limits=limits)
    async with trio.open_nursery() as nursery:

        def connect(
            address: str, pair: Pair = trio.testing.memory_stream_pair
        ) -> trio.StapledStream:
            client, server = pair()
            nursery.start_soon(admin.serve_stream, server, address)
            return client

        yield admin, connect
        nursery.cancel_scope.cancel()


async def read_to_end(stream: trio.abc.ReceiveStream) -> tuple[bytes, float]:
    """Everything until the server closes, and when its first byte came (the
    time of the close if nothing came)."""
    received = bytearray()
    first: float | None = None
    while chunk := await stream.receive_some(65536):
        if first is None:
            first = trio.current_time()
        received += chunk
    return bytes(received), trio.current_time() if first is None else first


async def exchange(stream: trio.abc.Stream, request: bytes = REQUEST) -> h11.Response:
    """One request on a kept-alive connection; the response, its body read."""
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(request)
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response


async def trickle(stream: trio.abc.SendStream, data: bytes, pace: float = 1.0) -> None:
    """Send ``data`` one byte every ``pace`` seconds, until done or the server hangs up."""
    try:
        for index in range(len(data)):
            await stream.send_all(data[index : index + 1])
            await trio.sleep(pace)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer
    return int(answer.split(b" ", 2)[1])


# ---------------------------------------------------------------------- deadlines


async def test_a_head_trickled_a_byte_a_second_gets_408_at_the_header_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with endpoint(tmp_path) as (admin, connect):
        async with trio.open_nursery() as nursery:
            opened = trio.current_time()
            client = connect("192.0.2.1")
            nursery.start_soon(trickle, client, REQUEST)
            answer, at = await read_to_end(client)
            nursery.cancel_scope.cancel()
        # Counted from the accept, not from the last byte: each byte came
        # well within the deadline, the head as a whole did not.
        assert status(answer) == 408 and b"connection: close" in answer
        assert at - opened == pytest.approx(HEADER_TIMEOUT)
        assert admin.timed_out == 1

        # On a kept-alive connection the next request's deadline counts from
        # its first byte, however long the connection was idle before it.
        client = connect("192.0.2.1")
        assert (await exchange(client)).status_code == 200
        await trio.sleep(IDLE_TIMEOUT / 2)
        async with trio.open_nursery() as nursery:
            first_byte = trio.current_time()
            nursery.start_soon(trickle, client, REQUEST)
            answer, at = await read_to_end(client)
            nursery.cancel_scope.cancel()
        assert status(answer) == 408
        assert at - first_byte == pytest.approx(HEADER_TIMEOUT)


async def test_idle_connections_are_closed_without_a_word_at_their_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with endpoint(tmp_path) as (admin, connect):
        # Kept alive after a request: closed idle_timeout after the answer.
        client = connect("192.0.2.1")
        assert (await exchange(client)).status_code == 200
        answered = trio.current_time()
        assert await read_to_end(client) == (b"", pytest.approx(answered + IDLE_TIMEOUT))

        # Opened and never used: a request that never started, closed at the
        # header deadline (a client opens a connection to send a request).
        opened = trio.current_time()
        silent = connect("192.0.2.1")
        assert await read_to_end(silent) == (b"", pytest.approx(opened + HEADER_TIMEOUT))
        assert admin.timed_out == 0  # no 408: nothing of a request came


# ---------------------------------------------------------------------- caps and eviction


async def test_over_the_per_address_cap_with_every_connection_busy_gets_503(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = AdminLimits(max_connections_per_address=3)
    async with endpoint(tmp_path, limits) as (admin, connect):
        # Lockstep streams: a response blocks until its client reads it, so
        # these three stay busy answering (never evictable) while unread.
        busy = [connect("192.0.2.1", trio.testing.lockstep_stream_pair) for _ in range(3)]
        for stream in busy:
            await stream.send_all(CLOSING)
        await trio.testing.wait_all_tasks_blocked()

        answer, _ = await read_to_end(connect("192.0.2.1"))
        assert status(answer) == 503 and b"too many admin connections" in answer
        assert (admin.refused, admin.evicted) == (1, 0)

        # The cap is per address: another client is served meanwhile.
        served = connect("192.0.2.2")
        await served.send_all(CLOSING)
        answer, _ = await read_to_end(served)
        assert status(answer) == 200

        # One busy client reads its answer and leaves: its address is served again.
        assert status((await read_to_end(busy[0]))[0]) == 200
        await trio.testing.wait_all_tasks_blocked()
        again = connect("192.0.2.1")
        await again.send_all(CLOSING)
        assert status((await read_to_end(again))[0]) == 200
        assert admin.refused == 1


async def test_at_the_global_cap_the_connection_waiting_longest_makes_room(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = AdminLimits(max_connections=3)
    async with endpoint(tmp_path, limits) as (admin, connect):
        # Oldest: a request being answered (its client does not read), then
        # two slow heads from two other addresses.
        busy = connect("192.0.2.1", trio.testing.lockstep_stream_pair)
        await busy.send_all(CLOSING)
        slow = []
        for address in ("192.0.2.2", "192.0.2.3"):
            stream = connect(address)
            await stream.send_all(REQUEST[:10])
            await trio.testing.wait_all_tasks_blocked()
            slow.append(stream)
            await trio.sleep(0.5)

        # A probe from a fourth address: the oldest slow head makes room (503,
        # try again), not the busy one, and the probe is answered at once.
        probed = trio.current_time()
        probe = connect("192.0.2.9")
        await probe.send_all(CLOSING)
        answer, at = await read_to_end(probe)
        assert status(answer) == 200 and at == probed
        evicted, at = await read_to_end(slow[0])
        assert status(evicted) == 503 and b"evicted" in evicted and at == probed
        assert (admin.evicted, admin.refused) == (1, 0)

        # The others keep their own fate: the younger slow head its 408 at its
        # deadline, the busy request its answer.
        answer, at = await read_to_end(slow[1])
        assert status(answer) == 408 and at == pytest.approx(probed - 0.5 + HEADER_TIMEOUT)
        assert status((await read_to_end(busy))[0]) == 200


async def test_a_probe_sharing_the_slow_clients_address_evicts_the_oldest_of_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The loopback case in small: the per-address cap would refuse a probe
    # from the attacker's own address; eviction lets it in.
    limits = AdminLimits(max_connections_per_address=2)
    async with endpoint(tmp_path, limits) as (admin, connect):
        slow = []
        for _ in range(2):
            stream = connect("127.0.0.1")
            await stream.send_all(REQUEST[:10])
            await trio.testing.wait_all_tasks_blocked()
            slow.append(stream)
            await trio.sleep(0.5)
        probed = trio.current_time()
        probe = connect("127.0.0.1")
        await probe.send_all(CLOSING)
        assert status((await read_to_end(probe))[0]) == 200
        evicted, at = await read_to_end(slow[0])
        assert status(evicted) == 503 and at == probed
        answer, at = await read_to_end(slow[1])
        assert status(answer) == 408 and at == pytest.approx(probed - 0.5 + HEADER_TIMEOUT)
        assert (admin.evicted, admin.refused) == (1, 0)


async def test_a_connection_that_sent_nothing_yet_is_evicted_last(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A probe's connection is accepted before its request is read; during a
    # flood, the arrivals that follow must take the slow heads' slots, not
    # the probe's, even when the probe's connection is the older one.
    limits = AdminLimits(max_connections_per_address=2)
    async with endpoint(tmp_path, limits) as (admin, connect):
        opened = trio.current_time()
        quiet = connect("127.0.0.1")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        slow = connect("127.0.0.1")
        await slow.send_all(REQUEST[:10])
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        arrived = trio.current_time()
        newcomer = connect("127.0.0.1")
        await newcomer.send_all(REQUEST[:10])
        evicted, at = await read_to_end(slow)
        assert status(evicted) == 503 and at == arrived
        # The quiet one keeps its slot: its request may still come, and does.
        assert (await exchange(quiet, CLOSING)).status_code == 200
        assert trio.current_time() < opened + HEADER_TIMEOUT
        assert (admin.evicted, admin.refused) == (1, 0)


async def test_a_bad_head_request_gets_its_error_without_a_body(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found by fuzz/admin_http.py: the error answer to a HEAD request whose
    # body broke off was not sent at all (HTTP forbids a body after HEAD).
    async with endpoint(tmp_path) as (_admin, connect):
        client = connect("192.0.2.1")
        await client.send_all(
            b"HEAD /health HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\n\r\n"
        )
        await client.send_eof()
        answer, _ = await read_to_end(client)
        assert status(answer) == 400
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-length: " in head and body == b""


# ---------------------------------------------------------------------- configuration


async def test_the_admin_table_sets_the_limits_and_names_a_bad_key(tmp_path: Path) -> None:
    table = {"max_connections_per_address": 4, "header_timeout": 5, "idle_timeout": 60.5}
    config = parse_config({
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        "admin": {"listen": "127.0.0.1:0", **table},
    })  # fmt: skip
    assert parse_config(config.to_mapping()).admin == config.admin
    async with trio.open_nursery() as nursery:
        running: Gateway = await nursery.start(run_gateway, config)
        assert running.admin is not None
        limits = running.admin.limits
        assert (limits.max_connections_per_address, limits.header_timeout, limits.idle_timeout) == (
            4, 5.0, 60.5,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    defaults = parse_config({}).admin.limits()
    assert (defaults.max_connections_per_address, defaults.header_timeout) == (8, 2.0)
    for bad, message in [
        ({"header_timout": 1}, r"^admin\.header_timout: unknown key"),
        (
            {"max_connections_per_address": 0},
            r"^admin\.max_connections_per_address: must be at least 1",
        ),
        (
            {"max_connections_per_address": 2.5},
            r"^admin\.max_connections_per_address: must be an int",
        ),
        ({"header_timeout": 0}, r"^admin\.header_timeout: must be above 0 and at most 10 "),
        ({"header_timeout": 30}, r"^admin\.header_timeout: must be above 0 and at most 10 "),
        ({"idle_timeout": float("nan")}, r"^admin\.idle_timeout: must be above 0"),
        ({"idle_timeout": "15s"}, r"^admin\.idle_timeout: must be a number of seconds"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"admin": bad})


# ---------------------------------------------------------------------- the attack


async def _metric(port: int, name: str) -> float:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answer, _ = await read_to_end(stream)
    assert status(answer) == 200
    for line in answer.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("addresses", [1, 10], ids=["one-address", "ten-addresses"])
async def test_health_answers_during_a_200_connection_slowloris_attack(
    zkgate_factory: ServerFactory[ZkgateServer], addresses: int
) -> None:
    """200 slow clients, each sending a head byte every 1-2 s and reconnecting
    when dropped, from 127.0.0.1 alone (the prober's address, so only eviction
    helps) or round-robin over 127.0.0.1..10 (20 per address: both caps, 8
    per address and 64 in all, are full); /health probed 20 times a second
    for 10 s, with zkgate's default [admin] limits."""
    port = free_port()
    zkgate_factory(["--admin-listen", f"127.0.0.1:{port}"])
    # The probe timeout is twice a Kubernetes probe's default (the benchmark
    # uses 1 s): /health answers in milliseconds, and the 2 shared cores may
    # be busy with other work.
    report = await measure(
        "127.0.0.1", port, connections=200, seconds=10.0, addresses=addresses, probe_timeout=2.0
    )
    for line in (*report.details(), report.summary()):
        print(line)
    assert report.probes == 200
    assert report.ok_percent >= 99.0, report.details()
    # The attack did press the caps: connections were evicted for newer ones.
    assert report.attack.endings["503"] > 0
    assert await _metric(port, "zkgate_admin_connections_evicted_total") > 0
