"""Policies as legacy Dubbo consumers read them: override URLs and condition routes.

The rendering is checked against Dubbo 2.7's own parsing rules, ported here in a few lines
each: ``ZookeeperRegistry`` decodes a child's name with ``URLDecoder`` and parses it with
``URL.valueOf``; ``AbstractConfigurator`` (the pre-2.7 "deprecated" branch, which an
override without ``configVersion`` takes) applies an override with a port to the provider
of that host and port, and one with host ``0.0.0.0`` and no port to every provider a
consumer holds; ``ConditionRouter`` splits its decoded ``rule`` with ``ROUTE_PATTERN``.

Then with real processes: ``zkgate serve`` with ``[membership]`` on a real ZooKeeper 3.8 and
no ``[sharding]`` (the policies' store only), projecting Dubbo providers registered in that
ZooKeeper; policies written and rolled back with the real ``zkgate policy`` command; the
znodes read through zkgate's ZooKeeper face with kazoo and with the real ``dubbo-python3``
consumer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
from kazoo.client import KazooClient

from adapters.layouts import dubbo, dubbo_governance
from dispatcher.core.model import Instance
from dispatcher.governance.policy import Policy
from tests.policy_cli import POLICY_TOKEN, policy_cli
from tests.servers import (
    ServerFactory,
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    wait_for,
)

SERVICE = "com.acme.Cart"


# ------------------------------------------------------ Dubbo's parsing rules, ported


def value_of(znode_name: str) -> tuple[str, str, int, str, dict[str, str]]:
    """``(protocol, host, port, path, parameters)`` as Dubbo 2.7 reads a category child:
    ``URL.decode`` then ``URL.valueOf`` (parameters split on ``&``, each at its first
    ``=``, a bare key its own value, nothing unescaped)."""
    url = unquote_plus(znode_name, errors="strict")
    protocol, _, rest = url.partition("://")
    body, _, query = rest.partition("?")
    address, _, path = body.partition("/")
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "0")
    params: dict[str, str] = {}
    for part in query.split("&"):
        part = part.strip()
        if part:
            key, equals, value = part.partition("=")
            params[key] = value if equals else key
    return protocol, host, int(port), path, params


_CONDITION_KEYS = {"category", "check", "dynamic", "enabled", "group", "version", "application",
                   "side", "configVersion", "compatible_config", "interfaces"}  # fmt: skip


def configure(provider: dict[str, str], host: str, port: int, overrides: list[str]) -> dict:
    """A provider URL's parameters (as a consumer merged them: ``side=consumer``) after
    ``AbstractConfigurator.configureDeprecated`` applied each override, sorted as Dubbo
    sorts configurators (by host: ``0.0.0.0`` first)."""
    parsed = sorted((value_of(name) for name in overrides), key=lambda u: u[1])
    params = dict(provider)
    for protocol, o_host, o_port, _path, o_params in parsed:
        assert protocol == "override"
        if o_params.get("enabled", "true") != "true":
            continue
        if o_port != 0:
            if o_port != port or o_host != host:
                continue
        elif o_host != "0.0.0.0":
            continue
        params.update({k: v for k, v in o_params.items() if k not in _CONDITION_KEYS})
    return params


_ROUTE_PATTERN = re.compile(r"([&!=,]*)\s*([^&!=,\s]+)")


def condition_then(router: str) -> dict[str, set[str]]:
    """The ``then`` half of a condition route as ``ConditionRouter.parseRule`` reads it."""
    protocol, host, _port, _path, params = value_of(router)
    assert (protocol, host, params["router"], params["category"]) == (
        "condition", "0.0.0.0", "condition", "routers",
    )  # fmt: skip
    rule = unquote_plus(params["rule"]).replace("consumer.", "").replace("provider.", "")
    then = rule[rule.index("=>") + 2 :].strip()
    condition: dict[str, set[str]] = {}
    values: set[str] | None = None
    key = None
    for separator, content in _ROUTE_PATTERN.findall(then):
        if not separator:
            key = content
            condition[key] = set()
        elif separator == "=":
            assert key is not None
            values = condition[key]
            values.add(content)
        elif separator == ",":
            assert values
            values.add(content)
        else:
            raise AssertionError(f"unexpected separator {separator!r} in {then!r}")
    return condition


def consumer_view(
    instances: list[Instance], rendered: dict[str, dict[str, bytes]]
) -> dict[str, int]:
    """The weight a Dubbo 2.7 consumer balances each provider (by address) with, after the
    configurators and the condition routes; routed-out providers are left out."""
    providers = [dubbo.render(instance)[0] for instance in instances]
    return dubbo_view(providers, list(rendered["configurators"]), list(rendered["routers"]))


def dubbo_view(
    providers: list[str], configurators: list[str], routers: list[str]
) -> dict[str, int]:
    """:func:`consumer_view` of the znode names under a service's ``providers``,
    ``configurators`` and ``routers``."""
    routes = [condition_then(name) for name in routers]
    weights = {}
    for name in providers:
        _p, host, port, _path, params = value_of(name)
        params = configure({**params, "side": "consumer"}, host, port, configurators)
        if all(all(params.get(k) in v for k, v in route.items()) for route in routes):
            weights[f"{host}:{port}"] = int(params.get("weight", "100"))
    return weights


def provider(host: str, port: int, **metadata: str) -> Instance:
    return Instance(SERVICE, f"{host}:{port}", host, port, protocol="jsonrpc", metadata=metadata)


# --------------------------------------------------------------------- rendering


def test_timeouts_and_a_95_5_split_read_back_as_dubbo_parses_them() -> None:
    instances = [provider("10.0.0.1", 20880, release="v1"), provider("10.0.0.2", 20880,
                 release="v1"), provider("10.0.0.3", 20880, release="v2"),
                 provider("10.0.0.4", 20880, release="canary")]  # fmt: skip
    policy = Policy.from_mapping({
        "request_timeout": 1.5, "connect_timeout": 0.25,
        "split": {"release=v1": 95, "release=v2": 5},
    })  # fmt: skip
    rendered = dubbo_governance.render(SERVICE, instances, policy)

    # One service-wide override carries the timeouts, in milliseconds.
    global_overrides = [
        value_of(n) for n in rendered["configurators"] if "0.0.0.0" in unquote_plus(n)
    ]
    ((protocol, host, port, path, params),) = global_overrides
    assert (protocol, host, port, path) == ("override", "0.0.0.0", 0, SERVICE)
    assert params == {"category": "configurators", "connect.timeout": "250", "dynamic": "false",
                      "enabled": "true", "timeout": "1500"}  # fmt: skip
    # The route keeps v1 and v2 (the canary has no share); weights make 95/5 of them.
    (router,) = rendered["routers"]
    assert condition_then(router) == {"release": {"v1", "v2"}}
    assert value_of(router)[4]["force"] == "true"
    weights = consumer_view(instances, rendered)
    assert set(weights) == {"10.0.0.1:20880", "10.0.0.2:20880", "10.0.0.3:20880"}
    total = sum(weights.values())
    v1 = weights["10.0.0.1:20880"] + weights["10.0.0.2:20880"]
    assert v1 / total == pytest.approx(0.95, abs=0.001)
    assert weights["10.0.0.1:20880"] == weights["10.0.0.2:20880"]
    # And every consumer applies the timeouts the override says.
    (name, _), *_ = [dubbo.render(instances[0])]
    _p, h, p, _path, params = value_of(name)
    merged = configure({**params, "side": "consumer"}, h, p, list(rendered["configurators"]))
    assert (merged["timeout"], merged["connect.timeout"]) == ("1500", "250")


def test_a_single_value_split_keeps_weights_and_weights_are_overrides() -> None:
    instances = [provider("10.0.0.1", 20880, release="v1"), provider("10.0.0.2", 20881,
                 release="v2")]  # fmt: skip
    only_v2 = Policy.from_mapping({"split": {"release=v1": 0, "release=v2": 100}})
    rendered = dubbo_governance.render(SERVICE, instances, only_v2)
    # The route leaves v1 out; its weight 0 does too, for consumers that read no routes.
    (override,) = rendered["configurators"]
    assert value_of(override)[1:3] == ("10.0.0.1", 20880)
    assert value_of(override)[4]["weight"] == "0"
    assert consumer_view(instances, rendered) == {"10.0.0.2:20881": 100}

    weighted = Policy.from_mapping({"weights": {"instances": {"10.0.0.2:20881": 300}}})
    rendered = dubbo_governance.render(SERVICE, instances, weighted)
    assert rendered["routers"] == {}
    (override,) = rendered["configurators"]
    assert value_of(override)[:3] == ("override", "10.0.0.2", 20881)
    assert consumer_view(instances, rendered) == {"10.0.0.1:20880": 100, "10.0.0.2:20881": 300}


def test_urls_are_rendered_per_group_and_version_the_providers_register() -> None:
    """Dubbo matches configurators to a consumer by group and version (UrlUtils.isMatch)."""
    instances = [provider("10.0.0.1", 20880, version="1.0.0"),
                 provider("10.0.0.2", 20880, version="2.0.0", group="blue")]  # fmt: skip
    rendered = dubbo_governance.render(SERVICE, instances, Policy(request_timeout=3))
    scopes = sorted(
        (params.get("group", ""), params.get("version", ""))
        for *_, params in map(value_of, rendered["configurators"])
    )
    assert scopes == [("", "1.0.0"), ("blue", "2.0.0")]


def test_nothing_is_rendered_for_what_dubbo_does_not_apply() -> None:
    instances = [provider("10.0.0.1", 20880)]
    policy = Policy.from_mapping(
        {"retries": {"count": 2}, "circuit_breaking": {"max_connections": 5}}
    )
    assert dubbo_governance.render(SERVICE, instances, policy) == {
        "configurators": {},
        "routers": {},
    }
    # A tag value ConditionRouter's grammar cannot hold makes no route, only weights.
    odd = Policy.from_mapping({"split": {"release=a,b": 50, "release=c": 50}})
    odd_instances = [provider("10.0.0.1", 1, release="a,b"), provider("10.0.0.2", 2, release="c")]
    rendered = dubbo_governance.render(SERVICE, odd_instances, odd)
    assert rendered["routers"] == {}
    assert consumer_view(odd_instances, rendered) == {"10.0.0.1:1": 5000, "10.0.0.2:2": 5000}


# ------------------------------------------------------- real processes, real clients

WAIT = 30.0
"""Seconds a policy change may take to reach zkgate's ZooKeeper face or the client: far
above the sub-second it takes, so only a change that never arrives fails."""
P1_ELSEWHERE = """\
[services."com.acme.Elsewhere"]
request_timeout = 1
"""


def _set(tmp: Path, admin: str, name: str, document: str, why: str) -> str:
    path = tmp / name
    path.write_text(document)
    return policy_cli(tmp, admin, "set", str(path), "--why", why)


@pytest.fixture
def upstream_zk(zookeeper: ZooKeeperServer) -> Iterator[KazooClient]:
    """A kazoo client on the real ZooKeeper the Dubbo providers register in."""
    client = KazooClient(hosts=zookeeper.address, timeout=10)
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def _register(zk: KazooClient, root: str, service: str, host: str, release: str) -> None:
    """A Dubbo provider's registration: an ephemeral znode named by its URL."""
    url = (f"jsonrpc://{host}:20880/{service}?anyhost=true&interface={service}"
           f"&release={release}&side=provider")  # fmt: skip
    zk.create(f"{root}/{service}/providers/{dubbo.encode(url)}", b"", ephemeral=True,
              makepath=True)  # fmt: skip


def _governed_gateway(
    factory: ServerFactory[ZkgateServer], tmp: Path, zookeeper: str, root: str, admin: str
) -> ZkgateServer:
    """``zkgate serve`` with ``[membership]`` (no ``[sharding]``), ``[governance]``, the
    providers of the real ZooKeeper under ``root`` as upstream and a Dubbo projection at
    ``/dubbo``, the root Dubbo consumers read."""
    (tmp / "policy-token").write_text(POLICY_TOKEN + "\n")
    config = tmp / "zkgate.toml"
    config.write_text(f"""
node_id = "gw-dubbo"
[membership]
kind = "zookeeper"
address = "{zookeeper}"
root = "{root}/zkgate"
session_timeout = 2.0
[governance]
max_history = 10
token_file = "{tmp / "policy-token"}"
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "{zookeeper}"
roots = [{{ path = "{root}/dubbo", layout = "dubbo" }}]
[[projection]]
root = "/dubbo"
layout = "dubbo"
""")
    return factory(["--config", str(config), "--admin-listen", admin])


def _children(zk: KazooClient, service: str, category: str) -> list[str]:
    path = f"/dubbo/{service}/{category}"
    return sorted(zk.get_children(path)) if zk.exists(path) else []


def test_policy_set_renders_configurators_and_routers_in_the_zookeeper_face_and_rollback_removes_them(  # noqa: E501
    zookeeper: ZooKeeperServer, upstream_zk: KazooClient,
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path, unique_path: str,
) -> None:  # fmt: skip
    """A Dispatcher with ``[membership]`` and no ``[sharding]`` projects the providers it
    reads from a real ZooKeeper and, once ``zkgate policy set`` writes a timeout and a 90/10
    split, shows the override URLs and the condition route a Dubbo 2.7 consumer reads (read
    here with kazoo, parsed with Dubbo's rules above); ``zkgate policy rollback`` to a
    version without a policy for the service removes them and leaves the providers."""
    service = f"com.acme.Cart{uuid.uuid4().hex[:8]}"
    _register(upstream_zk, f"{unique_path}/dubbo", service, "10.0.0.1", "v1")
    _register(upstream_zk, f"{unique_path}/dubbo", service, "10.0.0.2", "v2")
    admin = f"127.0.0.1:{free_port()}"
    gateway = _governed_gateway(zkgate_factory, tmp_path, zookeeper.address, unique_path, admin)
    face = KazooClient(hosts=gateway.address, timeout=10)
    face.start(timeout=15)
    try:
        wait_for(lambda: len(_children(face, service, "providers")) == 2, timeout=WAIT,
                 message="both providers projected")  # fmt: skip
        providers = _children(face, service, "providers")
        assert _children(face, service, "configurators") == []
        assert _children(face, service, "routers") == []
        assert "written: version 1" in _set(tmp_path, admin, "p1.toml", P1_ELSEWHERE, "other")

        canary = (f'[services."{service}"]\nrequest_timeout = 1.5\n'
                  'split = { "release=v1" = 90, "release=v2" = 10 }\n')  # fmt: skip
        assert "written: version 2" in _set(tmp_path, admin, "p2.toml", canary, "canary")
        wait_for(lambda: len(_children(face, service, "configurators")) == 3
                 and _children(face, service, "routers"), timeout=WAIT,
                 message="the policy's configurators and routers")  # fmt: skip
        configurators = _children(face, service, "configurators")
        (router,) = _children(face, service, "routers")
        assert condition_then(router) == {"release": {"v1", "v2"}}
        assert dubbo_view(providers, configurators, [router]) == {
            "10.0.0.1:20880": 9000, "10.0.0.2:20880": 1000,
        }  # fmt: skip
        (provider_name, *_) = providers
        _p, host, port, _path, params = value_of(provider_name)
        merged = configure({**params, "side": "consumer"}, host, port, configurators)
        assert merged["timeout"] == "1500"
        # The store holds the policies and nothing of a shard: no member registered.
        assert upstream_zk.get_children(f"{unique_path}/zkgate") == ["governance"]

        assert "version 3" in policy_cli(tmp_path, admin, "rollback", "1", "--why", "undo")
        wait_for(lambda: not _children(face, service, "configurators")
                 and not _children(face, service, "routers"), timeout=WAIT,
                 message="the rollback removing the znodes")  # fmt: skip
        assert _children(face, service, "providers") == providers
    finally:
        face.stop()
        face.close()


def test_a_real_python_dubbo_consumer_follows_a_per_provider_weight_override(
    zookeeper: ZooKeeperServer, upstream_zk: KazooClient,
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path, unique_path: str,
) -> None:  # fmt: skip
    """The ``dubbo-python3`` consumer (kazoo underneath) reading providers and
    configurators through zkgate picks up the weight ``zkgate policy set`` gives one
    provider, and drops it again on ``zkgate policy rollback``.

    What that client applies is narrow, so this checks only that: it reads
    ``override://host:port`` URLs matched to a provider by address (and group and
    version), taking their ``weight`` and ``disabled``. It ignores service-wide overrides
    (``override://0.0.0.0``, so a policy's timeouts), never reads ``routers`` (so a
    split's condition route), keeps only ``jsonrpc`` and ``http`` providers and always
    reads under ``/dubbo``. A split reaches it as per-provider weights all the same.
    """
    # Imported here because importing it configures logging.
    from dubbo_client import ZookeeperRegistry

    service = f"com.acme.Stock{uuid.uuid4().hex[:8]}"
    _register(upstream_zk, f"{unique_path}/dubbo", service, "10.0.0.1", "v1")
    _register(upstream_zk, f"{unique_path}/dubbo", service, "10.0.0.2", "v2")
    admin = f"127.0.0.1:{free_port()}"
    gateway = _governed_gateway(zkgate_factory, tmp_path, zookeeper.address, unique_path, admin)
    face = KazooClient(hosts=gateway.address, timeout=10)
    face.start(timeout=15)
    registry = None
    try:
        wait_for(lambda: len(_children(face, service, "providers")) == 2, timeout=WAIT,
                 message="both providers projected")  # fmt: skip
        registry = ZookeeperRegistry(gateway.address)
        registry.subscribe(service)

        def weights() -> dict[str, int]:
            assert registry is not None
            return {a: url.weight for a, url in registry.get_providers(service).items()}

        assert weights() == {"10.0.0.1:20880": 100, "10.0.0.2:20880": 100}
        assert "written: version 1" in _set(tmp_path, admin, "p1.toml", P1_ELSEWHERE, "other")
        heavier = (
            f'[services."{service}"]\nweights = {{ instances = {{ "10.0.0.2:20880" = 300 }} }}\n'
        )
        assert "written: version 2" in _set(tmp_path, admin, "p2.toml", heavier, "more on .2")
        wait_for(lambda: weights() == {"10.0.0.1:20880": 100, "10.0.0.2:20880": 300},
                 timeout=WAIT, message="the client applying the override")  # fmt: skip

        assert "version 3" in policy_cli(tmp_path, admin, "rollback", "1", "--why", "undo")
        wait_for(lambda: weights() == {"10.0.0.1:20880": 100, "10.0.0.2:20880": 100},
                 timeout=WAIT, message="the client dropping the override")  # fmt: skip
    finally:
        if registry is not None:
            # The package has no way to close its registry; stop its kazoo client.
            own: KazooClient = registry._ZookeeperRegistry__zk
            own.stop()
            own.close()
        face.stop()
        face.close()
