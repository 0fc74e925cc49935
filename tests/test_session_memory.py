"""What an idle ZooKeeper session costs zkgate.

A registry's clients mostly sit connected and silent: a fleet of ten thousand
services holds ten thousand sessions that do little but ping. An idle
session was measured at about 6.5 KiB of RSS in ZooKeeper 3.8 (issue #21);
zkgate must not cost more, or the gateway becomes the thing that runs out of
memory first. And a cheap
session must still be a whole one: it answers when spoken to, and hears its
watches fire.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dispatcher.zk.codec.protocol import EventType, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    CreateRequest,
    PathWatchRequest,
    SetDataRequest,
)
from tests.servers import ServerFactory, ZkgateServer
from tests.zkwire import WireClient

SESSIONS = 2_000
#: KiB of the server's RSS per idle session that the test accepts. Measured:
#: 5.0 with 2,000 sessions and 5.3 with 10,000 (bench/zk_writes.py); 12.0 and
#: 12.5 when each connection ran a reader and a writer task. The margin is for
#: allocator and page granularity and for other versions of the interpreter.
MAX_KIB_PER_SESSION = 9.0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


#: Fewer sessions than this measure allocator noise more than sessions.
MIN_SESSIONS = 500
#: Descriptors kept for everything but the sessions (the test runner, the servers).
_SPARE_FILES = 1024


@contextmanager
def _open_files(sessions: int) -> Iterator[int]:
    """Raise the descriptor limit here and in servers started meanwhile (a child
    inherits it) for ``sessions`` sessions, both ends in one process tree, and
    yield how many fit under the hard limit (at least MIN_SESSIONS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * sessions + _SPARE_FILES
    limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
    fitting = min(sessions, (limit - _SPARE_FILES) // 2)
    assert fitting >= MIN_SESSIONS, (
        f"RLIMIT_NOFILE hard limit {hard} leaves room for {fitting} sessions, "
        f"fewer than the {MIN_SESSIONS} this measurement needs"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), hard))
    try:
        yield fitting
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_sessions_cost_less_than_zookeepers(
    zkgate_factory: ServerFactory[ZkgateServer], unique_path: str
) -> None:
    """2,000 idle sessions grow zkgate's RSS by less than 9 KiB each, and every
    one of them still answers and hears its watch fire."""
    with ExitStack() as stack:
        sessions = stack.enter_context(_open_files(SESSIONS))
        server = zkgate_factory(["--max-client-cnxns", "0"])
        assert server.pid is not None
        with WireClient(server.host, server.port) as writer:
            writer.connect(timeout_ms=60_000)
            created = writer.call(
                OpCode.CREATE, CreateRequest(unique_path, b"", OPEN_ACL_UNSAFE, 0)
            )
            assert created.header.err == 0
            before = _rss_kib(server.pid)

            clients = []
            for _ in range(sessions):
                client = stack.enter_context(WireClient(server.host, server.port))
                session = client.connect(timeout_ms=60_000)
                assert session.timeout > 0 and session.session_id != 0
                clients.append(client)
            per_session = (_rss_kib(server.pid) - before) / sessions
            assert per_session < MAX_KIB_PER_SESSION, (
                f"{per_session:.1f} KiB of RSS per idle session"
            )

            # Idle and cheap, yet whole: each answers, and hears a watch fire.
            for client in clients:
                reply = client.call(OpCode.EXISTS, PathWatchRequest(unique_path, True))
                assert reply.header.err == 0
            changed = writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, b"changed", -1))
            assert changed.header.err == 0
            for client in clients:
                event = client.read_event()
                assert event is not None, "a session was closed instead of notified"
                assert (event[1].type, event[1].path) == (EventType.NODE_DATA_CHANGED, unique_path)
