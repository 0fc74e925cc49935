"""docker/: what can be checked without a Docker engine.

No engine runs on the machines the suite runs on, so the images are never
built here. What is checked is what would otherwise rot silently as the code
moves: every configuration file the stack mounts is valid for the zkgate of
this checkout, the files the compose file and the Dockerfile name exist, the
Dockerfile copies every package pyproject.toml ships, and the stack's shared
secret is the same everywhere. (The compose file itself was also checked
against the Compose specification's JSON schema and with hadolint; see
docker/README.md.)
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from dispatcher.cli import _build_parser
from dispatcher.config import load_config
from dispatcher.sharding.membership import MembershipConfig
from metaserver.cli import load_meta_config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = (DOCKER / "docker-compose.yml").read_text()
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
DISPATCHERS = ("dispatcher-1", "dispatcher-2")


@pytest.mark.parametrize("name", [*DISPATCHERS, "zkgate"])
def test_every_gateway_configuration_loads(name: str) -> None:
    config = load_config(DOCKER / "config" / f"{name}.toml")
    assert config.admin.enabled
    assert config.admin.listen == "0.0.0.0:8081"  # reachable through the published port
    assert config.zookeeper.listen == "0.0.0.0:2181"
    assert str(config.zookeeper.data_dir).startswith("/var/lib/zkgate")  # the volume


@pytest.mark.parametrize("name", DISPATCHERS)
def test_dispatchers_advertise_their_compose_names(name: str) -> None:
    config = load_config(DOCKER / "config" / f"{name}.toml")
    assert config.node == name
    table = tomllib.loads((DOCKER / "config" / f"{name}.toml").read_text())
    sharding = table["sharding"]
    assert sharding["id"] == name
    assert sharding["subscribe_address"] == f"{name}:7000"
    assert sharding["zookeeper_address"] == f"{name}:2181"
    assert re.search(rf"^  {name}:$", COMPOSE, re.MULTILINE)
    assert [u.kind for u in config.upstreams] == ["zookeeper", "etcd", "consul"]


def test_dispatcher_1_mirrors_the_ensembles_services_for_legacy_clients() -> None:
    config = load_config(DOCKER / "config" / "dispatcher-1.toml")
    (mirror,) = config.mirrors
    assert (mirror.root, mirror.hosts) == ("/services", (("zookeeper", 2181),))
    assert re.search(r"^  zookeeper:$", COMPOSE, re.MULTILINE)


def test_the_meta_server_reads_the_dispatchers_membership_with_the_same_token() -> None:
    meta = load_meta_config(DOCKER / "config" / "meta.toml")
    dispatcher = tomllib.loads((DOCKER / "config" / "dispatcher-1.toml").read_text())
    ours = MembershipConfig.from_table(dispatcher["membership"])
    theirs = meta.membership
    assert (theirs.kind, theirs.address, theirs.root) == (ours.kind, ours.address, ours.root)
    token = dispatcher["subscriptions"]["token"]
    assert meta.token == token
    assert f"ZKGATE_TOKEN: {token}" in COMPOSE
    for name in DISPATCHERS:
        other = tomllib.loads((DOCKER / "config" / f"{name}.toml").read_text())
        assert other["subscriptions"]["token"] == token


def _command(service: str) -> list[str]:
    """The ``command`` of one compose service, flow (``[...]``) or block (``- x``) style."""
    block = re.search(rf"^  {re.escape(service)}:\n(.*?)(?=^  \S|\Z)", COMPOSE, re.M | re.S)
    assert block is not None, service
    flow = re.search(r"^    command: (\[.*\])$", block.group(1), re.M)
    if flow is not None:
        return list(json.loads(flow.group(1)))
    listed = re.search(r"^    command:\n((?:      - .*\n)+)", block.group(1), re.M)
    assert listed is not None, f"{service} has no command"
    return [line.strip()[2:] for line in listed.group(1).splitlines()]


@pytest.mark.parametrize("service", [*DISPATCHERS, "meta", "proxy"])
def test_zkgate_accepts_each_command_line_of_the_stack(service: str) -> None:
    command = _command(service)
    args = _build_parser().parse_args(command)
    assert args.command == command[0]
    config = getattr(args, "config", None)
    if config is not None:
        assert (DOCKER / "config" / Path(config).name).is_file()


def test_files_the_compose_file_names_exist() -> None:
    for config in re.findall(r"/etc/zkgate/([\w.-]+\.toml)", COMPOSE):
        assert (DOCKER / "config" / config).is_file(), config
    for script in re.findall(r"/register/([\w.-]+\.sh)", COMPOSE):
        assert (DOCKER / "register" / script).is_file(), script


def test_the_image_gets_every_package_and_only_what_the_ignore_file_lets_in() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.rstrip("*") for pattern in found]
    copied = [
        source
        for line in re.findall(r"^COPY (?!--)(.+)$", DOCKERFILE, re.MULTILINE)
        for source in line.split()[:-1]  # the last one is the destination
    ]
    for package in packages:
        assert package in copied, f"the Dockerfile does not copy {package}/"
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for source in copied:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"
    assert "prometheus-client" in str(pyproject["project"]["dependencies"])
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "status_page.html" in package_data["dispatcher.faces.admin"]


def _seconds(duration: str) -> float:
    """A compose duration such as ``30s``, ``1m30s`` or ``1m``, in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def test_zkgate_containers_stop_with_sigterm_and_time_for_the_clean_stop() -> None:
    """docker stops a container with its stop signal, then SIGKILLs it after the
    grace period: zkgate must get SIGTERM (its clean stop) and time to finish
    it (the mirror gives up on an unanswered closeSession after 2 s)."""
    anchor = re.search(r"^x-zkgate: &zkgate\n(.*?)(?=^\S)", COMPOSE, re.M | re.S)
    assert anchor is not None
    settings = dict(re.findall(r"^  (\w+): (.+)$", anchor.group(1), re.M))
    assert settings["stop_signal"] == "SIGTERM"
    assert _seconds(settings["stop_grace_period"]) >= 15
    # A real PID 1 passes the signals on: as PID 1 itself, a signal zkgate
    # leaves at its default would be ignored by the kernel.
    assert settings["init"] == "true"
    for service in (*DISPATCHERS, "meta", "proxy"):
        block = re.search(rf"^  {service}:\n(.*?)(?=^  \S|\Z)", COMPOSE, re.M | re.S)
        assert block is not None and "    <<: *zkgate\n" in block.group(1), service
        assert "stop_signal" not in block.group(1) and "stop_grace_period" not in block.group(1)
    assert re.search(r"^STOPSIGNAL SIGTERM$", DOCKERFILE, re.M)
