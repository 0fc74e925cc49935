"""One data directory, one process: a second zkgate on the same ``--data-dir`` stops.

Two processes serving the same SQLite files would each keep their own tree in
memory and write over the other's: the trees diverge and acknowledged writes
are lost. The first process holds a lock on the directory; the second exits 1
with a message naming the directory and the holder's pid. A crash frees the
directory (the kernel drops the lock with the process), so a restart after
``kill -9`` is never refused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from dispatcher.zk.server.store import StoreError, TreeStore
from tests.servers import REPO_ROOT, ServerFactory, ZkgateServer, free_port


def _second_serve(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--data-dir", str(data_dir), "--admin-listen", "off"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_second_serve_on_the_same_data_dir_exits_1_naming_the_holder(
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    first = zkgate_factory()
    client = KazooClient(hosts=first.address, timeout=10)
    client.start(timeout=15)
    try:
        client.create("/kept", b"first")
        second = _second_serve(first.data_dir)
        assert second.returncode == 1, second.stderr
        assert str(first.data_dir) in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        # The first one is untouched and goes on serving.
        assert client.get("/kept")[0] == b"first"
        client.set("/kept", b"still first")
    finally:
        client.stop()
        client.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_directory_is_free_again_once_its_process_is_gone(
    zkgate_factory: ServerFactory[ZkgateServer], how: str
) -> None:
    server = zkgate_factory()
    client = KazooClient(hosts=server.address, timeout=10)
    client.start(timeout=15)
    client.create("/durable", b"written")
    client.stop()
    client.close()
    # SIGTERM (a clean stop) or SIGKILL (a crash): either way the next start
    # on the same directory serves, with the data.
    server.stop() if how == "stop" else server.kill()
    server.start()
    client = KazooClient(hosts=server.address, timeout=10)
    client.start(timeout=15)
    try:
        assert client.get("/durable")[0] == b"written"
    finally:
        client.stop()
        client.close()


def test_the_store_refuses_a_directory_already_open(tmp_path: Path) -> None:
    first = TreeStore(tmp_path)
    try:
        with pytest.raises(StoreError, match=rf"{tmp_path}.*in use.*pid \d+"):
            TreeStore(tmp_path)
    finally:
        first.close()
    TreeStore(tmp_path).close()  # closing let it go
