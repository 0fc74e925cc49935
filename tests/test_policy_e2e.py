"""Policies end to end: `zkgate policy` on a real Dispatcher moves a real proxy's traffic.

Everything runs as users run it: a real ZooKeeper 3.8 holds the Dispatcher's
``[membership]`` (and so its policies); ``zkgate serve`` is a child process with
``[subscriptions]``, ``[sharding]`` and ``[governance]``; the Meta Server is zkgate's own
(in this process); ``zkgate proxy`` is a child process forwarding two services to real
TCP echo servers in this process, registered in a static file the Dispatcher watches;
policies are written with the real ``zkgate policy`` command through the Dispatcher's
admin endpoint. No part of the path from the operator's command to the proxy's routing is
replaced, so this is the check that the Dispatcher hands its policy feed to the
subscription server and the proxy follows it.

A proxy in another process cannot be asked which policy version it applies, so each step
waits for behaviour that only the new policy can produce (a connection to an instance the
previous policy gave no share, a request failing fast that used to be answered late),
then measures.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from proxy.forward import ListenAddress
from tests.policy_cli import POLICY_TOKEN, write_static_registry
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, free_port
from tests.test_proxy import EchoServer
from tests.test_proxy_policy import SlowEcho, one_exchange, run_connections, timed_exchange
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "subscription-token"
TIMEOUT = 30.0
"""Seconds any wait on a real process may take before the test fails."""
SLOW_DELAY = 2.0
"""Seconds the slow echo server takes to answer."""
SHORT_TIMEOUT = 0.2
"""The policy's request timeout: far below ``SLOW_DELAY``."""

P1_ALL_V1 = """\
[services.echo]
split = { "version=v1" = 100, "version=v2" = 0 }
"""
P2_CANARY = """\
[services.echo]
split = { "version=v1" = 90, "version=v2" = 10 }
"""
P3_TIMEOUT = """\
[services.echo]
split = { "version=v1" = 90, "version=v2" = 10 }

[services.slow]
request_timeout = 0.2
"""


def _dispatcher_config(tmp: Path, zookeeper: str, root: str, static: Path) -> Path:
    token_file = tmp / "policy-token"
    token_file.write_text(POLICY_TOKEN + "\n")
    path = tmp / "d1.toml"
    path.write_text(f"""
node_id = "d1"
[subscriptions]
listen = "127.0.0.1:{free_port()}"
token = "{TOKEN}"
[membership]
kind = "zookeeper"
address = "{zookeeper}"
root = "{root}"
session_timeout = 2.0
[sharding]
id = "d1"
services = ["echo", "slow"]
warm_timeout = 2.0
[governance]
max_history = 10
token_file = "{token_file}"
[[upstream]]
name = "file"
kind = "static"
path = "{static}"
poll_interval = 0.2
""")
    return path


@asynccontextmanager
async def proxy_process(
    tmp: Path, meta: str, services: dict[str, ListenAddress]
) -> AsyncIterator[trio.Process]:
    """``zkgate proxy`` for ``services``; terminated (then killed) on the way out."""
    command = [sys.executable, "-m", "dispatcher", "--log-format", "plain", "proxy",
               "--meta", meta, "--engine", "epoll"]  # fmt: skip
    for name, address in services.items():
        command += ["--service", f"{name}={address.host}:{address.port}"]
    env = {**os.environ, "ZKGATE_TOKEN": TOKEN}
    with open(tmp / "proxy.log", "wb") as log:
        process = await trio.lowlevel.open_process(command, cwd=ROOT, env=env, stderr=log)
    try:
        yield process
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def policy(admin: str, *args: str) -> str:
    """``zkgate policy ARGS --admin ADMIN`` (writes with the token); its stdout. Must succeed."""
    command = [sys.executable, "-m", "dispatcher", "policy", *args, "--admin", admin]
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(command, cwd=ROOT, capture_stdout=True,
                                      capture_stderr=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def until_true(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Repeat the async ``check`` (itself a real request, so no pause between) until True."""
    await until(check, what, timeout=TIMEOUT, poll=0)


async def test_policy_set_and_rollback_move_a_real_proxys_traffic(
    nursery: trio.Nursery,
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    unique_path: str,
) -> None:
    """`zkgate policy set` with a 90/10 tag split sends 10 % (±3 points) of 2,000
    connections to v2; a request timeout shorter than the slow server's delay fails its
    requests quickly; `zkgate policy rollback` to the first version sends everything to v1
    again and lets the slow server's late answers through."""
    from metaserver.cli import parse_meta_config, run_meta

    v1 = await EchoServer("v1").start(nursery)
    v2 = await EchoServer("v2").start(nursery)
    slow = await SlowEcho(SLOW_DELAY).start(nursery)
    static = tmp_path / "registry.toml"
    write_static_registry(static, [("echo", v1.port, "v1"), ("echo", v2.port, "v2"),
                     ("slow", slow.port, "v1")])  # fmt: skip
    admin_port = free_port()
    admin = f"127.0.0.1:{admin_port}"
    config = _dispatcher_config(tmp_path, zookeeper.address, unique_path, static)
    await trio.to_thread.run_sync(functools.partial(
        zkgate_factory, ["--config", str(config), "--admin-listen", admin]
    ))  # fmt: skip
    meta_config = parse_meta_config({
        "token": TOKEN, "server_id": "meta-1", "meta": {"listen": "127.0.0.1:0"},
        "membership": {"kind": "zookeeper", "address": zookeeper.address, "root": unique_path,
                       "session_timeout": 2.0},
    })  # fmt: skip
    _, meta_port = await nursery.start(run_meta, meta_config)
    echo = ListenAddress("127.0.0.1", free_port())
    slow_address = ListenAddress("127.0.0.1", free_port())

    async with proxy_process(tmp_path, f"127.0.0.1:{meta_port}",
                             {"echo": echo, "slow": slow_address}):  # fmt: skip
        # No policy yet: the flags' round robin over both echo instances.
        await until_true(lambda: one_exchange(echo), "the proxy forwarding echo")
        await run_connections(echo, 20)
        assert v1.accepted > 0 and v2.accepted > 0

        out = await policy(
            admin,
            "set",
            str(_write(tmp_path, "p1.toml", P1_ALL_V1)),
            "--why",
            "all on v1",
            "--token-file",
            str(tmp_path / "policy-token"),
        )
        assert "written: version 1" in out

        # Applied once 50 connections in a row all reach v1 (round robin never does that).
        async def fifty_on_v1() -> bool:
            before = v2.accepted
            return await run_connections(echo, 50, workers=4) == 50 and v2.accepted == before

        await until_true(fifty_on_v1, "the proxy routing everything to v1")

        out = await policy(admin, "set", str(_write(tmp_path, "p2.toml", P2_CANARY)),
                           "--why", "canary v2 at 10%",
                           "--token-file", str(tmp_path / "policy-token"))  # fmt: skip
        assert 'split."version=v2": 0 -> 10' in out and "written: version 2" in out
        # Applied at the first connection that reaches v2 (version 1 gave it nothing).
        held = v2.accepted
        await until_true(lambda: _reached(echo, v2, held), "the proxy applying the canary")
        base1, base2 = v1.accepted, v2.accepted
        assert await run_connections(echo, 2000) == 2000
        got1, got2 = v1.accepted - base1, v2.accepted - base2
        assert got1 + got2 == 2000
        share = 100 * got2 / 2000
        assert abs(share - 10) <= 3, f"v2 got {share:.2f} % of 2000 connections"

        # Before the timeout: the slow server's answer is waited for.
        ok, took = await timed_exchange(slow_address)
        assert ok and took >= SLOW_DELAY, took
        out = await policy(admin, "set", str(_write(tmp_path, "p3.toml", P3_TIMEOUT)),
                           "--why", "slow callers time out",
                           "--token-file", str(tmp_path / "policy-token"))  # fmt: skip
        assert "written: version 3" in out

        async def fails_fast() -> bool:
            ok, took = await timed_exchange(slow_address)
            return not ok and took < SLOW_DELAY - 0.5

        await until_true(fails_fast, "the request timeout applied")
        for _ in range(5):
            ok, took = await timed_exchange(slow_address)
            # Reset after the timeout, long before the server's answer would come.
            assert not ok and took < SLOW_DELAY - 0.5, took

        out = await policy(admin, "rollback", "1", "--why", "back to all on v1",
                           "--token-file", str(tmp_path / "policy-token"))  # fmt: skip
        assert "version 4" in out

        async def answered_late() -> bool:
            ok, took = await timed_exchange(slow_address)
            return ok and took >= SLOW_DELAY

        await until_true(answered_late, "the rollback lifting the timeout")
        # The same document as version 1: everything to v1 again.
        held = v2.accepted
        assert await run_connections(echo, 200) == 200
        assert v2.accepted == held
        got = await policy(admin, "get")
        assert "version 4" in got


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


async def _reached(address: ListenAddress, server: EchoServer, held: int) -> bool:
    """One connection through the proxy; True once ``server`` has accepted more than ``held``."""
    await one_exchange(address)
    return server.accepted > held
