"""SIGINT and SIGTERM stop ``zkgate serve``, ``zkgate meta`` and ``zkgate proxy`` cleanly.

docker, systemd and Kubernetes stop a process with SIGTERM, a person with
Ctrl-C (SIGINT). Each command is run here as a real process; the test waits
for its own log line saying it serves, sends the signal with ``os.kill``, and
checks what an operator relies on: exit status 0, one log line saying it
stops, no traceback, and for the mirror the clean stop's effect on the
ensemble (the ephemerals made through zkgate are gone at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from tests.servers import (
    REPO_ROOT,
    ServerFactory,
    ZooKeeperServer,
    free_port,
    wait_for,
)

TIMEOUT = 30.0
"""Seconds allowed for a start or a stop; they take well under a second here."""


class Command:
    """``python -m dispatcher ARGS`` (or ``argv``) as a child process whose output lines
    are collected."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``argv`` replaces the whole command line; ``env`` the environment."""
        if env is None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
        if argv is None:
            argv = [sys.executable, "-m", "dispatcher", *args]
        self.process = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first log line containing ``text``, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise AssertionError(
                        f"no log line with {text!r} (exit {self.process.poll()}):\n{self.output}"
                    )
                self._changed.wait(remaining)

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout)
        return code

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def command(args: Sequence[str], cwd: Path) -> Iterator[Command]:
    running = Command(args, cwd)
    try:
        yield running
    finally:
        running.close()


def assert_stopped_cleanly(run: Command, signum: signal.Signals, what: str) -> None:
    code = run.wait()
    assert code == 0, run.output
    stopping = [line for line in run.lines if "stopping" in line]
    assert len(stopping) == 1, run.output
    assert f"{what} stopping" in stopping[0] and f"signal={signum.name}" in stopping[0]
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_serve_stops_cleanly_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    args = ["serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
            "--admin-listen", "off"]  # fmt: skip
    with command(args, tmp_path) as run:
        run.wait_line("gateway serving")
        run.signal(signum)
        assert_stopped_cleanly(run, signum, "zkgate serve")


def _meta_config(tmp_path: Path, zookeeper: ZooKeeperServer) -> Path:
    config = tmp_path / "meta.toml"
    config.write_text(
        'token = "signal-test"\n\n[membership]\nkind = "zookeeper"\n'
        f'address = "{zookeeper.address}"\nroot = "/signals-{uuid.uuid4().hex}"\n'
    )
    return config


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_meta_and_proxy_stop_cleanly_on_a_signal(
    tmp_path: Path, zookeeper: ZooKeeperServer, signum: signal.Signals
) -> None:
    meta_listen = f"127.0.0.1:{free_port()}"
    meta_args = ["meta", "--config", str(_meta_config(tmp_path, zookeeper)),
                 "--listen", meta_listen]  # fmt: skip
    proxy_args = ["proxy", "--meta", meta_listen, "--token", "signal-test",
                  "--service", f"orders=127.0.0.1:{free_port()}"]  # fmt: skip
    with command(meta_args, tmp_path) as meta, command(proxy_args, tmp_path) as proxy:
        meta.wait_line("meta server listening")
        proxy.wait_line("proxy ready")
        proxy.signal(signum)
        assert_stopped_cleanly(proxy, signum, "zkgate proxy")
        meta.signal(signum)
        assert_stopped_cleanly(meta, signum, "zkgate meta")


def _mirror_config(tmp_path: Path, root: str, hosts: str) -> Path:
    config = tmp_path / "mirror.toml"
    # A session timeout far above the time the test waits: an ephemeral gone
    # within it was deleted by the clean stop's closeSession, not by expiry.
    config.write_text(f'[[mirror]]\nroot = "{root}"\nhosts = "{hosts}"\nsession_timeout = 60.0\n')
    return config


def test_sigterm_closes_the_mirrors_upstream_sessions_so_ephemerals_go_at_once(
    tmp_path: Path, zookeeper: ZooKeeperServer
) -> None:
    root = f"/signals-{uuid.uuid4().hex}"
    direct = KazooClient(hosts=zookeeper.address, timeout=10)
    direct.start(timeout=TIMEOUT)
    try:
        direct.create(root)
        listen = f"127.0.0.1:{free_port()}"
        args = ["serve", "--config", str(_mirror_config(tmp_path, root, zookeeper.address)),
                "--listen", listen, "--data-dir", str(tmp_path / "data"),
                "--admin-listen", "off"]  # fmt: skip
        with command(args, tmp_path) as run:
            run.wait_line("gateway serving")
            client = KazooClient(hosts=listen, timeout=10)
            client.start(timeout=TIMEOUT)
            try:
                client.create(f"{root}/member", b"up", ephemeral=True)
                assert direct.exists(f"{root}/member") is not None
                run.signal(signal.SIGTERM)
                assert_stopped_cleanly(run, signal.SIGTERM, "zkgate serve")
            finally:
                client.stop()
                client.close()
        # Deleted by the ensemble when zkgate closed its session, not 60 s later.
        wait_for(lambda: direct.exists(f"{root}/member") is None, timeout=10,
                 message="the ephemeral made through zkgate to be deleted")  # fmt: skip
    finally:
        direct.delete(root, recursive=True)
        direct.stop()
        direct.close()


def test_a_second_signal_ends_a_stop_that_waits_at_once(
    tmp_path: Path, zookeeper_factory: ServerFactory[ZooKeeperServer]
) -> None:
    ensemble = zookeeper_factory()
    root = "/frozen"
    direct = KazooClient(hosts=ensemble.address, timeout=10)
    direct.start(timeout=TIMEOUT)
    direct.create(root)
    direct.stop()
    direct.close()
    args = ["serve", "--config", str(_mirror_config(tmp_path, root, ensemble.address)),
            "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
            "--admin-listen", "off"]  # fmt: skip
    assert ensemble.pid is not None
    with command(args, tmp_path) as run:
        run.wait_line("gateway serving")
        # A frozen ensemble never answers closeSession: the clean stop waits
        # for it (two seconds per upstream session) until a second signal.
        os.kill(ensemble.pid, signal.SIGSTOP)
        try:
            run.signal(signal.SIGTERM)
            run.wait_line("zkgate serve stopping")
            run.signal(signal.SIGTERM)
            # Killed by the second signal, not ended by the clean stop (which exits 0).
            assert run.wait() == -signal.SIGTERM, run.output
        finally:
            os.kill(ensemble.pid, signal.SIGCONT)
