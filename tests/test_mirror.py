"""The mirror: a real ZooKeeper 3.8 subtree served through zkgate to kazoo clients.

Every answer a client gets through the mirror is compared with the answer the
ensemble gives the same request directly; the load the ensemble carries is
read from its own ``mntr``.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
)
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from tests.servers import (
    ServerFactory,
    ZkgateServer,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    free_port,
    wait_for,
)

TIMEOUT = 15.0


@contextmanager
def kazoo(hosts: str, **kwargs: object) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=10, **kwargs)
    client.start(timeout=TIMEOUT)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def mntr(server: ZooKeeperServer | ZkgateServer) -> dict[str, str]:
    lines = server.four_letter("mntr").splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def start_mirror(
    factory: ServerFactory[ZkgateServer], tmp_path: Path, root: str, hosts: str, extra: str = "",
    args: tuple[str, ...] = (),
) -> ZkgateServer:  # fmt: skip
    config = tmp_path / f"mirror-{len(list(tmp_path.glob('mirror-*')))}.toml"
    config.write_text(
        f'[zookeeper]\nmax_client_cnxns = 0\n\n[[mirror]]\nroot = "{root}"\nhosts = "{hosts}"\n'
        f"session_timeout = 6.0\n{extra}"
    )
    return factory(["--config", str(config), *args])


def admin_status(port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def mirror_upstream(port: int) -> dict[str, Any]:
    (entry,) = [u for u in admin_status(port)["upstreams"] if u["kind"] == "mirror"]
    return entry


@pytest.fixture
def mirrored(
    zookeeper: ZooKeeperServer, zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path,
    unique_path: str,
) -> Iterator[tuple[KazooClient, ZkgateServer, str]]:  # fmt: skip
    """A direct client of the shared ZooKeeper, and a zkgate mirroring ``unique_path`` of it."""
    gate = start_mirror(zkgate_factory, tmp_path, unique_path, zookeeper.address)
    with kazoo(zookeeper.address) as direct:
        direct.create(unique_path)
        yield direct, gate, unique_path


def same_answer(direct: KazooClient, through: KazooClient, call: Callable[[KazooClient], object]):
    """``call`` on both clients: the same result or the same exception type (the
    exception is the answer compared)."""
    outcomes = []
    for client in (direct, through):
        try:
            outcomes.append(("ok", call(client)))
        except Exception as exc:
            outcomes.append(("error", type(exc).__name__))
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


def test_reads_answer_what_the_ensemble_answers(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    direct.create(f"{root}/a", b"alpha")
    direct.create(f"{root}/a/x", b"")
    direct.create(f"{root}/a/y", b"why")
    direct.create(f"{root}/eph", b"e", ephemeral=True)
    direct.set(f"{root}/a", b"alpha2")
    with kazoo(gate.address) as through:
        for path in (root, f"{root}/a", f"{root}/a/x", f"{root}/eph", f"{root}/missing"):
            same_answer(direct, through, lambda c, p=path: c.get(p))
            same_answer(direct, through, lambda c, p=path: c.exists(p))
            same_answer(direct, through, lambda c, p=path: sorted(c.get_children(p)))
            same_answer(direct, through, lambda c, p=path: c.get_children(p, include_data=True))
        # The mount point shows in its parent, as a directory would.
        assert root.lstrip("/") in through.get_children("/")
        state = mntr(gate)
        assert state["zk_mirror_connected"] == "1"
        assert state["zk_mirror_stale"] == "0"


def test_a_change_upstream_fires_every_watcher_and_reads_show_it(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    path = f"{root}/config"
    direct.create(path, b"v1")
    fired = [threading.Event() for _ in range(3)]
    children_fired = threading.Event()
    with kazoo(gate.address) as a, kazoo(gate.address) as b, kazoo(gate.address) as c:
        for client, event in zip((a, b, c), fired, strict=True):
            data, _ = client.get(path, watch=lambda _e, ev=event: ev.set())
            assert data == b"v1"
        a.get_children(root, watch=lambda _e: children_fired.set())
        direct.set(path, b"v2")
        for event in fired:
            assert event.wait(TIMEOUT)
        for client in (a, b, c):
            assert client.get(path)[0] == b"v2"
            assert client.get(path)[1] == direct.get(path)[1]
        direct.create(f"{root}/new")
        assert children_fired.wait(TIMEOUT)
        assert sorted(a.get_children(root)) == sorted(direct.get_children(root))


def test_200_clients_on_50_paths_cost_the_ensemble_one_watch(
    mirrored: tuple[KazooClient, ZkgateServer, str], zookeeper: ZooKeeperServer,
) -> None:  # fmt: skip
    direct, gate, root = mirrored
    paths = [f"{root}/p{i:02d}" for i in range(50)]
    for path in paths:
        direct.create(path, b"0")
    watches_before = int(mntr(zookeeper)["zk_watch_count"])
    heard = threading.Semaphore(0)

    def watch_all(_index: int) -> KazooClient:
        client = KazooClient(hosts=gate.address, timeout=10)
        client.start(timeout=TIMEOUT)
        for path in paths:
            client.get(path, watch=lambda _event: heard.release())
        return client

    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(watch_all, range(200)))
    try:
        assert int(mntr(gate)["zk_watch_count"]) == 200 * 50
        watches = int(mntr(zookeeper)["zk_watch_count"]) - watches_before
        # The mirror's one recursive watch on its root, whatever N is.
        assert watches <= 50 + 2, watches
        # A write through zkgate by one client reaches every watcher.
        clients[0].set(paths[7], b"1")
        for _ in range(200):
            assert heard.acquire(timeout=TIMEOUT)
        assert direct.get(paths[7])[0] == b"1"
    finally:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda c: (c.stop(), c.close()), clients))


def test_writes_go_upstream_and_answer_as_the_ensemble_does(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    with kazoo(gate.address) as through:
        created = through.create(f"{root}/w", b"one")
        assert created == f"{root}/w"
        assert direct.get(created)[0] == b"one"
        # Read-your-writes: the next read through zkgate shows the write.
        stat = through.set(created, b"two")
        data, read_stat = through.get(created)
        assert (data, read_stat) == (b"two", stat)
        assert direct.get(created) == (b"two", stat)
        seq = [through.create(f"{root}/w/s-", sequence=True) for _ in range(3)]
        assert seq == [f"{root}/w/s-{i:010d}" for i in range(3)]
        assert sorted(through.get_children(created)) == sorted(direct.get_children(created))
        with pytest.raises(NodeExistsError):
            through.create(created)
        with pytest.raises(BadVersionError):
            through.set(created, b"x", version=99)
        with pytest.raises(NotEmptyError):
            through.delete(created)
        with pytest.raises(NoNodeError):
            through.delete(f"{root}/nothing")
        transaction = through.transaction()
        transaction.create(f"{root}/t1", b"a")
        transaction.set_data(created, b"three")
        assert transaction.commit()[0] == f"{root}/t1"
        assert direct.get(created)[0] == b"three"
        assert through.get(created)[0] == b"three"
        through.delete(created, recursive=True)
        assert direct.exists(created) is None
        assert through.exists(created) is None


def test_sync_shows_what_another_client_wrote_upstream(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    path = f"{root}/s"
    direct.create(path, b"old")
    with kazoo(gate.address) as through:
        assert through.get(path)[0] == b"old"
        direct.set(path, b"new")
        through.sync(path)
        assert through.get(path)[0] == b"new"


def test_ephemerals_belong_to_the_downstream_session(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    path = f"{root}/member"
    gone = threading.Event()
    with kazoo(gate.address) as other:
        with kazoo(gate.address) as owner:
            owner.create(path, b"me", ephemeral=True)
            session_id = owner.client_id[0]
            assert owner.get(path)[1].ephemeralOwner == session_id
            assert other.get(path)[1].ephemeralOwner == session_id
            assert direct.exists(path) is not None
            other.exists(path, watch=lambda _event: gone.set())
        # The owner's session is closed: the ephemeral goes upstream too, and
        # it was gone before the close was answered.
        assert direct.exists(path) is None
        assert gone.wait(TIMEOUT)
        assert other.exists(path) is None


def test_digest_acls_are_enforced_as_the_ensemble_would(
    mirrored: tuple[KazooClient, ZkgateServer, str],
) -> None:
    direct, gate, root = mirrored
    path = f"{root}/secret"
    direct.create(path, b"s3cret", acl=[make_digest_acl("alice", "pw", all=True)])
    with kazoo(gate.address) as anonymous, kazoo(gate.address) as alice, \
            kazoo(gate.address) as mallory:  # fmt: skip
        alice.add_auth("digest", "alice:pw")
        mallory.add_auth("digest", "alice:wrong")
        for stranger in (anonymous, mallory):
            with pytest.raises(NoAuthError):
                stranger.get(path)
            with pytest.raises(NoAuthError):
                stranger.set(path, b"mine")
            with pytest.raises(NoAuthError):
                stranger.get_children(path)
        changed = threading.Event()
        # Read upstream as alice (the mirror may not read it), watched all the same.
        assert alice.get(path, watch=lambda _e: changed.set())[0] == b"s3cret"
        alice.set(path, b"changed")
        assert changed.wait(TIMEOUT)
        assert alice.get(path)[0] == b"changed"
        # exists needs no permission, here as upstream.
        assert anonymous.exists(path) == alice.exists(path)


@pytest.mark.parametrize("admin", [True, False], ids=["read-admin", "read-only"])
def test_the_mirror_reads_protected_znodes_with_its_own_credentials(
    zookeeper: ZooKeeperServer, zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path,
    unique_path: str, admin: bool,
) -> None:  # fmt: skip
    """With READ and ADMIN the mirror caches the ACL and checks each client
    against it; with READ alone the ensemble hides the digests, so reads go
    upstream as the client. Either way the answers are the ensemble's."""
    with kazoo(zookeeper.address) as direct:
        acl = [
            make_digest_acl("zkgate", "pw", read=True, admin=admin),
            make_digest_acl("alice", "pw", all=True),
        ]
        direct.create(unique_path, b"guarded", acl=acl)
        gate = start_mirror(zkgate_factory, tmp_path, unique_path, zookeeper.address,
                            'auth = ["digest:zkgate:pw"]\n')  # fmt: skip
        with kazoo(gate.address) as anonymous, kazoo(gate.address) as alice:
            alice.add_auth("digest", "alice:pw")
            # Cached with the mirror's credentials, checked against each client's.
            assert alice.get(unique_path)[0] == b"guarded"
            with pytest.raises(NoAuthError):
                anonymous.get(unique_path)
            with pytest.raises(NoAuthError):
                anonymous.set(unique_path, b"x")


def test_more_clients_than_the_ensemble_allows_connections(
    zookeeper_factory: ServerFactory[ZooKeeperServer], zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:  # fmt: skip
    upstream = zookeeper_factory(config={"maxClientCnxns": 4})
    with kazoo(upstream.address) as direct:
        direct.create("/capped")
    gate = start_mirror(zkgate_factory, tmp_path, "/capped", upstream.address)
    clients = [KazooClient(hosts=gate.address, timeout=10) for _ in range(12)]
    try:
        for index, client in enumerate(clients):
            client.start(timeout=TIMEOUT)
            client.create(f"/capped/c{index}", ephemeral=True)
        for client in clients:
            assert len(client.get_children("/capped")) == 12
    finally:
        for client in clients:
            client.stop()
            client.close()


def test_upstream_killed_and_restarted_keeps_serving_then_catches_up(
    zookeeper_factory: ServerFactory[ZooKeeperServer], zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:  # fmt: skip
    upstream = zookeeper_factory()
    with kazoo(upstream.address) as direct:
        direct.create("/svc/a", b"1", makepath=True)
    admin_port = free_port()
    gate = start_mirror(zkgate_factory, tmp_path, "/svc", upstream.address,
                        args=("--admin-listen", f"127.0.0.1:{admin_port}"))  # fmt: skip
    assert mirror_upstream(admin_port)["connected"] is True
    changed = threading.Event()
    # No retries: the test sees each answer zkgate gives.
    with kazoo(gate.address, connection_retry=KazooRetry(max_tries=0)) as through:
        assert through.get("/svc/a", watch=lambda _e: changed.set())[0] == b"1"
        upstream.kill()
        wait_for(lambda: mntr(gate)["zk_mirror_stale"] == "1", TIMEOUT, message="marked stale")
        state = mirror_upstream(admin_port)
        assert (state["name"], state["connected"]) == ("mirror:/svc", False)
        # Cached reads go on; writes get an error clients retry.
        assert through.get("/svc/a")[0] == b"1"
        with pytest.raises(ConnectionLoss):
            through.set("/svc/a", b"lost?")
        upstream.start()
        wait_for(lambda: mntr(gate)["zk_mirror_stale"] == "0", 30, message="mirror in sync again")
        with kazoo(upstream.address) as direct:
            assert direct.get("/svc/a")[0] == b"1"
            direct.set("/svc/a", b"2")
        assert changed.wait(TIMEOUT)
        assert through.get("/svc/a")[0] == b"2"


def test_changes_made_while_the_mirror_was_cut_off_fire_on_return(
    zk_ensemble: ZooKeeperEnsemble, zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path,
    unique_path: str,
) -> None:  # fmt: skip
    first = zk_ensemble.members[0]
    with kazoo(zk_ensemble.connect_string) as direct:
        direct.create(f"{unique_path}/cfg", b"before", makepath=True)
        direct.sync(unique_path)
    # The mirror knows only the first member, so killing it cuts the mirror off
    # while the rest of the ensemble takes writes.
    gate = start_mirror(zkgate_factory, tmp_path, unique_path, first.address)
    changed = threading.Event()
    with kazoo(gate.address) as through:
        assert through.get(f"{unique_path}/cfg", watch=lambda _e: changed.set())[0] == b"before"
        first.kill()
        wait_for(lambda: mntr(gate)["zk_mirror_stale"] == "1", TIMEOUT, message="marked stale")
        others = ",".join(m.address for m in zk_ensemble.members[1:])
        with kazoo(others) as direct:
            direct.retry(direct.set, f"{unique_path}/cfg", b"meanwhile")
        assert not changed.is_set()
        first.start()
        assert changed.wait(40), "the watch of a change made while away fired on return"
        assert through.get(f"{unique_path}/cfg")[0] == b"meanwhile"
        wait_for(lambda: mntr(gate)["zk_mirror_stale"] == "0", TIMEOUT, message="mirror in sync")
