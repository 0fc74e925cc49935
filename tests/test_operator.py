"""``zkgate status``, ``zkgate check-config`` and the messages of ``zkgate serve``,
run as an operator runs them: each message names what to change."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from dispatcher.logs import LogfmtFormatter, PlainFormatter
from dispatcher.zk.server.engine import Engine, EngineConfig
from dispatcher.zk.server.fourletter import srvr
from dispatcher.zk.server.store import TreeStore
from tests.compose_certs import make_certs, stack_configs
from tests.servers import ServerFactory, ZkgateServer, free_port, wait_for
from tests.test_signals import command

REPO = Path(__file__).resolve().parents[1]


def _zkgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_status_shows_services_health_and_upstreams(
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path
) -> None:
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"instances": [
        {"service": "orders", "host": "10.0.0.1", "port": 80, "health": "passing"},
        {"service": "orders", "host": "10.0.0.2", "port": 80, "health": "failing"},
    ]}))  # fmt: skip
    config = tmp_path / "zkgate.toml"
    config.write_text(f'[[upstream]]\nname = "file"\nkind = "static"\npath = "{instances}"\n')
    admin = f"127.0.0.1:{free_port()}"
    zkgate_factory(["--config", str(config), "--admin-listen", admin])
    wait_for(lambda: _zkgate("status", "--admin", admin).returncode == 0, timeout=15,
             message="the node to be ready")  # fmt: skip
    result = _zkgate("status", "--admin", admin)
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout.splitlines()[0]
    assert "file" in result.stdout and "connected" in result.stdout
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip().startswith("orders")]
    assert "1 failing" in line and "1 passing" in line
    as_json = json.loads(_zkgate("status", "--admin", admin, "--json").stdout)
    assert as_json["snapshot"]["services"] == 1


def test_status_of_an_unreachable_node_exits_3() -> None:
    result = _zkgate("status", "--admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "cannot reach" in result.stderr


def test_check_config_accepts_the_shipped_configs_and_names_a_bad_key(tmp_path: Path) -> None:
    # The stack's TLS tables name files its one-shot job writes into /certs.
    make_certs(tmp_path / "certs")
    stack = stack_configs(tmp_path / "certs", tmp_path / "config")
    for name in ("zkgate.toml", "dispatcher-1.toml", "dispatcher-2.toml"):
        result = _zkgate("check-config", str(stack / name))
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout
        if name == "dispatcher-1.toml":
            assert "mirror: /services from zookeeper:2181" in result.stdout
    assert _zkgate("check-config", "--meta", str(stack / "meta.toml")).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstream]]\nname = "e"\nkind = "etcd"\nendpoint = "x:1"\nprefixes = 3\n')
    result = _zkgate("check-config", str(bad))
    assert result.returncode == 2
    assert "upstream[0]" in result.stderr and "prefixes" in result.stderr


# ------------------------------------------------------- messages a person can act on


@contextlib.contextmanager
def _busy_port() -> Iterator[str]:
    """A loopback address something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


def test_a_busy_client_port_is_named_with_its_listener(tmp_path: Path) -> None:
    with _busy_port() as busy:
        result = _zkgate("serve", "--listen", busy, "--data-dir", str(tmp_path / "data"),
                         "--admin-listen", "off")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {busy} for the ZooKeeper client port" in result.stderr
    assert "--listen" in result.stderr and "Traceback" not in result.stderr


def test_a_busy_admin_port_is_named_with_its_listener(tmp_path: Path) -> None:
    with _busy_port() as busy:
        result = _zkgate("serve", "--listen", f"127.0.0.1:{free_port()}",
                         "--data-dir", str(tmp_path / "data"), "--admin-listen", busy)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {busy} for the admin endpoint (--admin-listen" in result.stderr


def test_a_busy_default_admin_port_warns_naming_the_flag_and_the_key(tmp_path: Path) -> None:
    # No --admin-listen: the default address, 127.0.0.1:8081, whose being busy
    # is only a warning.
    args = ["serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")]
    with contextlib.ExitStack() as held:
        holder = held.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # already taken by someone else: busy all the same
            holder.bind(("127.0.0.1", 8081))
            holder.listen()
        with command(args, tmp_path) as run:
            warning = run.wait_line("admin endpoint not started")
            run.wait_line("gateway serving")
            run.signal(signal.SIGTERM)
            assert run.wait() == 0, run.output
    assert "--admin-listen" in warning and "[admin] listen" in warning
    assert "127.0.0.1:8081" in warning


def test_version() -> None:
    result = _zkgate("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"zkgate {metadata.version('zkgate')}"


def test_log_options_are_accepted_after_the_subcommand_too(tmp_path: Path) -> None:
    with _busy_port() as busy:
        serve = ("serve", "--listen", busy, "--data-dir", str(tmp_path / "data"),
                 "--admin-listen", "off")  # fmt: skip
        after = _zkgate(*serve, "--log-format", "plain")
        before = _zkgate("--log-format", "plain", *serve)
        both = _zkgate("--log-format", "plain", *serve, "--log-format", "logfmt")
    for result in (after, before):
        assert result.returncode == 1, result.stderr
        assert " ERROR zkgate cannot serve" in result.stderr  # the plain layout
        assert "level=error" not in result.stderr
    assert "level=error" in both.stderr  # the one after the subcommand wins


def test_the_start_up_log_says_where_the_data_directory_is(zkgate: ZkgateServer) -> None:
    (line,) = [ln for ln in zkgate.log_path.read_text().splitlines() if "gateway serving" in ln]
    assert f"data_dir={zkgate.data_dir}" in line
    assert f"listen={zkgate.address}" in line


def test_status_into_a_closed_pipe_ends_quietly_with_its_own_status(
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    admin = f"127.0.0.1:{free_port()}"
    zkgate_factory(["--admin-listen", admin])
    wait_for(lambda: _zkgate("status", "--admin", admin).returncode == 0, timeout=15,
             message="the node to be ready")  # fmt: skip
    for extra in ((), ("--json",)):
        # `zkgate status | head -1`: the reader is gone before (most of) the output.
        read, write = os.pipe()
        os.close(read)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "dispatcher", "status", "--admin", admin, *extra],
                cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                check=False,
            )  # fmt: skip
        finally:
            os.close(write)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""


def test_srvr_latency_min_avg_max_are_consistent(tmp_path: Path) -> None:
    store = TreeStore(tmp_path)
    try:
        engine = Engine(store, EngineConfig())
        # Sub-millisecond requests, as most are: printed from fractions, a max
        # rounded to "0" would sit below an average of 0.3.
        for millis in (0.3, 0.4, 0.2):
            engine.stats.record_latency(millis)
        (line,) = [ln for ln in srvr(engine).splitlines() if ln.startswith("Latency")]
    finally:
        store.close()
    low, average, high = (float(part) for part in line.split(": ")[1].split("/"))
    assert low <= average <= high, line
    assert low == int(low) and high == int(high), line  # whole milliseconds, as ZooKeeper


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), PlainFormatter()],
                         ids=["logfmt", "plain"])  # fmt: skip
def test_session_ids_are_hex_in_every_session_field(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("zkgate", logging.INFO, __file__, 1, "event", None, None)
    record.session = 0x1000ABC
    record.upstream_session = 0x2000DEF
    text = formatter.format(record)
    assert "session=0x1000abc" in text and "upstream_session=0x2000def" in text
    assert str(0x2000DEF) not in text
