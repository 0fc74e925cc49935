"""The README's examples run as written.

Every ```toml block names its file on its first line (``# bridge.toml``) and is
a configuration zkgate accepts; every line of every ```sh block is run here,
against real ZooKeeper and etcd servers, with the text the README shows. The
only changes made to what is run are addresses that would leave this machine
or collide with the shared test servers (``zk1:2181``, ``meta:7400``,
``/var/lib/zkgate``, a shared etcd prefix), each replaced by a loopback port or
a directory of the test's own; ``zkgate`` on the ``PATH`` is this checkout's.
The synopses (plain ``` blocks) name only flags the command accepts, and the
example error message is the one zkgate prints.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from dispatcher.cli import _build_parser
from dispatcher.config import parse_config
from metaserver.cli import parse_meta_config
from tests.servers import REPO_ROOT, EtcdServer, ZooKeeperServer, free_port, wait_for
from tests.test_signals import Command

README = (REPO_ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, re.M | re.S)
"""(language, text) of every fenced block."""
TOML_BLOCKS = [text for language, text in BLOCKS if language == "toml"]
SH_BLOCKS = [text for language, text in BLOCKS if language == "sh"]
SYNOPSES = [text for language, text in BLOCKS if not language and text.startswith("zkgate ")]


def _commands(block: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        # A comment is set off by two spaces; none of the commands has "  #" inside.
        line = re.sub(r"\s{2,}#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(re.sub(r"\s{2,}", " ", line))
    return lines


def _toml(name: str) -> str:
    (text,) = [block for block in TOML_BLOCKS if block.startswith(f"# {name}\n")]
    return text


def _command(prefix: str) -> str:
    """The README's one shell command that starts with ``prefix``."""
    (line,) = [c for block in SH_BLOCKS for c in _commands(block) if c.startswith(prefix)]
    return line


QUICK_START = ("scripts/zkgate serve", "scripts/test", "/usr/share/zookeeper/bin/zkCli.sh "
               "-server 127.0.0.1:2181 create", "echo ruok")  # fmt: skip
BRIDGE = ("etcdctl put", "zkgate serve --config bridge.toml",
          "/usr/share/zookeeper/bin/zkCli.sh -server 127.0.0.1:2181 ls")  # fmt: skip
MESH = ("zkgate serve --config d1.toml", "zkgate meta", "echo change-me", "zkgate proxy")
RUN_HERE = QUICK_START + BRIDGE + MESH
"""Prefixes of the README's shell commands; each is run by one test below."""


# ------------------------------------------------------------------ files


def test_every_toml_block_names_its_file() -> None:
    assert len(TOML_BLOCKS) >= 4
    for block in TOML_BLOCKS:
        assert re.match(r"# [\w-]+\.toml\n", block), block.splitlines()[0]


@pytest.mark.parametrize("example", TOML_BLOCKS, ids=lambda e: e.splitlines()[0][2:])
def test_each_readme_example_parses(example: str) -> None:
    if example.startswith("# meta.toml\n"):
        meta = parse_meta_config(tomllib.loads(example))
        assert meta.membership.kind == "zookeeper" and meta.token
        return
    config = parse_config(tomllib.loads(example))
    # Each scenario brings registries in: upstreams, or an ensemble to mirror.
    assert config.upstreams or config.mirrors


def test_every_shell_command_of_the_readme_is_run_by_a_test() -> None:
    commands = [c for block in SH_BLOCKS for c in _commands(block)]
    assert commands
    for command in commands:
        owners = [prefix for prefix in RUN_HERE if command.startswith(prefix)]
        assert len(owners) == 1, f"no test here runs this README command: {command}"
    for prefix in RUN_HERE:
        assert any(c.startswith(prefix) for c in commands), f"gone from the README: {prefix}"


def test_the_synopses_name_only_flags_the_commands_accept() -> None:
    parser = _build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for synopsis in SYNOPSES:
        for line in synopsis.replace("\n   ", " ").splitlines():
            words = line.split()
            if words[:1] != ["zkgate"]:
                continue
            sub = subcommands.choices[words[1]]
            known = {option for action in sub._actions for option in action.option_strings}
            for flag in re.findall(r"--[\w-]+", line):
                assert flag in known, f"zkgate {words[1]} has no {flag}"
                checked += 1
    assert checked >= 15


def test_the_error_message_example_is_the_one_zkgate_prints(tmp_path: Path) -> None:
    (shown,) = [text.strip() for language, text in BLOCKS if language == "text"]
    bad = _toml("bridge.toml").replace('layout = "grpc"', 'layout = "grcp"')
    (tmp_path / "bridge.toml").write_text(bad)
    result = _run(tmp_path, "zkgate check-config bridge.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == shown
    served = _run(tmp_path, "zkgate serve --config bridge.toml")
    assert served.returncode == 2
    assert served.stderr.strip() == shown


# ------------------------------------------------------------------ commands


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """``zkgate`` on the PATH runs this checkout; the default data directory is the test's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "zkgate"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dispatcher "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
            "XDG_DATA_HOME": str(tmp_path / "xdg")}  # fmt: skip


def _run(cwd: Path, line: str, env: Mapping[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    if env is None:
        venv_bin = Path(sys.executable).parent
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
               "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        line = line.replace("zkgate ", f"{shlex.quote(sys.executable)} -m dispatcher ", 1)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=dict(env), capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def _start(cwd: Path, line: str, env: Mapping[str, str], stack: ExitStack) -> Command:
    # Relative paths in the README (scripts/zkgate) are the repository's.
    line = line.replace("scripts/", f"{REPO_ROOT}/scripts/", 1)
    running = Command([], cwd, argv=["bash", "-c", f"exec {line}"], env=env)
    stack.callback(running.close)
    return running


def _stop(running: Command) -> None:
    running.signal(signal.SIGTERM)
    assert running.wait() == 0, running.output


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As a server binds (trio sets SO_REUSEADDR): TIME_WAIT is no obstacle.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def zookeeper_port_2181() -> Iterator[None]:
    """The README's commands use ZooKeeper's own port, as a reader's would."""
    assert _port_is_free(2181), "127.0.0.1:2181 is taken; the README's commands need it"
    yield


@pytest.mark.usefixtures("zookeeper_port_2181")
def test_quick_start(tmp_path: Path, shell_env: dict[str, str]) -> None:
    with ExitStack() as stack:
        server = _start(tmp_path, _command("scripts/zkgate serve"), shell_env, stack)
        server.wait_line("gateway serving")
        created = _run(REPO_ROOT, _command(QUICK_START[2]), shell_env)
        assert created.returncode == 0, created.stdout + created.stderr
        ruok = _run(REPO_ROOT, _command("echo ruok"), shell_env)
        assert ruok.stdout.strip() == "imok", ruok.stderr
        client = KazooClient(hosts="127.0.0.1:2181", timeout=10)
        client.start(timeout=15)
        try:
            assert client.get("/hello")[0] == b"world"
        finally:
            client.stop()
            client.close()
        _stop(server)
    assert (tmp_path / "xdg" / "zkgate").is_dir()  # the default data directory
    # `scripts/test` runs this whole suite (it cannot run inside it): it must
    # at least be a valid, executable bash script.
    assert _command("scripts/test") == "scripts/test"
    assert os.access(REPO_ROOT / "scripts" / "test", os.X_OK)
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / "test")]).returncode == 0


@pytest.mark.usefixtures("zookeeper_port_2181")
def test_scenario_2_bridges_an_etcd_key_into_the_projections(
    tmp_path: Path, shell_env: dict[str, str], etcd: EtcdServer
) -> None:
    prefix = f"/readme-{uuid.uuid4().hex}/"
    config = (
        _toml("bridge.toml")
        .replace('"127.0.0.1:2379"', f'"{etcd.endpoint}"')
        .replace('prefix = "/services/"', f'prefix = "{prefix}"')
        .replace('"/var/lib/zkgate"', f'"{tmp_path / "data"}"')
        # Consul is optional: nothing listens here.
        .replace('"127.0.0.1:8500"', f'"127.0.0.1:{free_port()}"')
    )
    (tmp_path / "bridge.toml").write_text(config)
    env = {**shell_env, "ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": etcd.client_url}
    put = _run(tmp_path, _command("etcdctl put").replace(" /services/", f" {prefix}", 1), env)
    assert put.returncode == 0, put.stderr
    with ExitStack() as stack:
        server = _start(tmp_path, _command("zkgate serve --config bridge.toml"), env, stack)
        server.wait_line("gateway serving")
        client = KazooClient(hosts="127.0.0.1:2181", timeout=10)
        client.start(timeout=15)
        stack.callback(client.close)
        stack.callback(client.stop)
        _wait_children(client, "/services/orders")
        listed = _run(tmp_path, _command(BRIDGE[2]), env)
        assert listed.returncode == 0, listed.stderr
        assert "[10.0.0.1:8080]" in listed.stdout, listed.stdout
        providers = client.get_children("/dubbo/orders/providers")
        assert len(providers) == 1 and "10.0.0.1%3A8080" in providers[0]
        _stop(server)


def _wait_children(client: KazooClient, path: str) -> None:
    wait_for(lambda: client.exists(path) and client.get_children(path), timeout=30,
             message=f"{path} to list the instance")  # fmt: skip


@pytest.mark.usefixtures("zookeeper_port_2181")
def test_scenario_3_a_dispatcher_a_meta_server_and_a_proxy_with_its_token(
    tmp_path: Path, shell_env: dict[str, str], zookeeper: ZooKeeperServer
) -> None:
    unique = uuid.uuid4().hex
    subscriptions = f"127.0.0.1:{free_port()}"
    meta_listen = f"127.0.0.1:{free_port()}"
    ensemble = "zk1:2181,zk2:2181,zk3:2181"
    d1 = (
        _toml("d1.toml")
        .replace(ensemble, zookeeper.address)
        .replace('"0.0.0.0:7000"', f'"{subscriptions}"')
        .replace('"d1.internal:7000"', f'"{subscriptions}"')
        .replace('"d1.internal:2181"', '"127.0.0.1:2181"')
        .replace('root = "/zkgate"', f'root = "/readme-{unique}"')
        .replace('path = "/dubbo"', f'path = "/readme-dubbo-{unique}"')
    )
    meta = (
        _toml("meta.toml")
        .replace(ensemble, zookeeper.address)
        .replace('root = "/zkgate"', f'root = "/readme-{unique}"')
        .replace('"0.0.0.0:7400"', f'"{meta_listen}"')
    )
    (tmp_path / "d1.toml").write_text(d1)
    (tmp_path / "meta.toml").write_text(meta)
    proxy_line = (
        _command("zkgate proxy")
        .replace("meta:7400", meta_listen)
        .replace("127.0.0.1:9000", f"127.0.0.1:{free_port()}")
    )
    with ExitStack() as stack:
        dispatcher = _start(tmp_path, _command("zkgate serve --config d1.toml"), shell_env, stack)
        dispatcher.wait_line("joining the shard membership")
        meta_server = _start(tmp_path, _command("zkgate meta"), shell_env, stack)
        meta_server.wait_line("meta server listening")
        token = _run(tmp_path, _command("echo change-me"), shell_env)
        assert token.returncode == 0 and (tmp_path / "token").read_text() == "change-me\n"
        proxy = _start(tmp_path, proxy_line, shell_env, stack)
        proxy.wait_line("proxy ready")
        # The token was accepted by both: the Meta Server's Welcome, then the
        # owner of `orders` (d1, the only member) took the subscription.
        proxy.wait_line("connected to the Meta Server")
        proxy.wait_line("connected to a Dispatcher")
        for running in (proxy, meta_server, dispatcher):
            _stop(running)
