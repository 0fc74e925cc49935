"""The ZooKeeper layouts: real-world records, round trips, and garbage."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters import layouts
from adapters.layouts import curator, dubbo, node_name, node_text, plain, serverset
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.upstream import ConfigError

# --- real-world records ---------------------------------------------------------

# A Dubbo 2.7.8 demo provider's znode name, encoded by java.net.URLEncoder.
DUBBO_NAME = (
    "dubbo%3A%2F%2F192.168.1.5%3A20880%2Forg.apache.dubbo.demo.DemoService%3Fanyhost%3Dtrue"
    "%26application%3Ddemo-provider%26deprecated%3Dfalse%26dubbo%3D2.0.2%26dynamic%3Dtrue"
    "%26generic%3Dfalse%26interface%3Dorg.apache.dubbo.demo.DemoService"
    "%26methods%3DsayHello%2CsayHelloAsync%26pid%3D18612%26release%3D2.7.8%26side%3Dprovider"
    "%26timestamp%3D1600934419355%26weight%3D50"
)

# Written by Curator 5.4's JsonInstanceSerializer<Map> (captured from the real library).
CURATOR_WITH_URI_SPEC = (
    b'{"name":"orders","id":"5f1c2a9e-3b7d-4c1e-9a55-0d6f1e2b3c4d","address":"10.0.0.7",'
    b'"port":8080,"sslPort":null,"payload":null,"registrationTimeUTC":1700000000000,'
    b'"serviceType":"DYNAMIC","uriSpec":{"parts":[{"value":"scheme","variable":true},'
    b'{"value":"://","variable":false},{"value":"address","variable":true},'
    b'{"value":":","variable":false},{"value":"port","variable":true}]}}'
)
CURATOR_WITH_PAYLOAD = (
    b'{"name":"orders","id":"x1","address":"10.0.0.8","port":8080,"sslPort":8443,'
    b'"payload":{"@class":"java.util.LinkedHashMap","zone":"az1","weight":"50"},'
    b'"registrationTimeUTC":1700000000000,"serviceType":"STATIC","uriSpec":null}'
)

# An Aurora-announced member, as Twitter commons' JSON codec writes it.
SERVERSET_MEMBER = (
    b'{"additionalEndpoints":{"aurora":{"host":"192.168.33.7","port":8081},'
    b'"http":{"host":"192.168.33.7","port":8081}},'
    b'"serviceEndpoint":{"host":"192.168.33.7","port":31337},"shard":0,"status":"ALIVE"}'
)


def test_dubbo_encoding_matches_java_url_encoder() -> None:
    url = DUBBO_NAME.replace("%3A", ":").replace("%2F", "/").replace("%3F", "?")
    url = url.replace("%3D", "=").replace("%26", "&").replace("%2C", ",")
    assert dubbo.encode(url) == DUBBO_NAME
    # URLEncoder.encode("a b~*-_.ü/[]:", "UTF-8"), from a real JVM:
    assert dubbo.encode("a b~*-_.ü/[]:") == "a+b%7E*-_.%C3%BC%2F%5B%5D%3A"
    assert dubbo.decode("a+b%7E*-_.%C3%BC%2F%5B%5D%3A") == "a b~*-_.ü/[]:"


def test_dubbo_parses_a_real_provider() -> None:
    source = Source("zookeeper", "/dubbo/org.apache.dubbo.demo.DemoService/providers/x", 9)
    instance = dubbo.parse("org.apache.dubbo.demo.DemoService", DUBBO_NAME, b"", source=source)
    assert instance is not None
    assert instance.service == "org.apache.dubbo.demo.DemoService"
    assert instance.instance_id == "192.168.1.5:20880"
    assert instance.endpoint == ("192.168.1.5", 20880)
    assert instance.protocol == "dubbo"
    assert instance.weight == 50
    assert instance.health is Health.UNKNOWN
    assert instance.source == source
    assert instance.metadata["application"] == "demo-provider"
    assert instance.metadata["methods"] == "sayHello,sayHelloAsync"
    assert instance.metadata["side"] == "provider"
    assert "weight" not in instance.metadata


def test_dubbo_renders_a_parsed_provider_byte_for_byte() -> None:
    instance = dubbo.parse("org.apache.dubbo.demo.DemoService", DUBBO_NAME, b"")
    assert instance is not None
    assert dubbo.render(instance) == (DUBBO_NAME, b"192.168.1.5")


def test_dubbo_takes_the_interface_from_the_url_when_the_directory_is_unknown() -> None:
    instance = dubbo.parse("", DUBBO_NAME, b"")
    assert instance is not None
    assert instance.service == "org.apache.dubbo.demo.DemoService"


@pytest.mark.parametrize(
    ("query", "health"),
    [
        ("disabled=true", Health.FAILING),
        ("enabled=false", Health.FAILING),
        ("disabled=false&enabled=false", Health.UNKNOWN),  # disabled wins, as in Dubbo
        ("enabled=true", Health.UNKNOWN),
    ],
)
def test_dubbo_disabled_providers_are_failing(query: str, health: Health) -> None:
    instance = dubbo.parse("com.foo.Bar", dubbo.encode(f"dubbo://h:1/com.foo.Bar?{query}"), b"")
    assert instance is not None
    assert instance.health is health
    assert "enabled" not in instance.metadata
    assert "disabled" not in instance.metadata


def test_dubbo_failing_instances_render_disabled() -> None:
    instance = Instance("com.foo.Bar", "h:1", "h", 1, health=Health.FAILING)
    name, _ = dubbo.render(instance)
    assert dubbo.decode(name) == "dubbo://h:1/com.foo.Bar?disabled=true&interface=com.foo.Bar"


def test_dubbo_query_rules_follow_dubbo_url_parser() -> None:
    url = "tri://[fe80::1]:50051/com.foo.Bar?anyhost;k=a=b&default.weight=7&&=x"
    instance = dubbo.parse("com.foo.Bar", dubbo.encode(url), b"")
    assert instance is not None
    assert instance.host == "fe80::1"
    assert instance.instance_id == "[fe80::1]:50051"
    assert instance.protocol == "tri"
    assert instance.weight == 7
    assert dict(instance.metadata) == {"anyhost": "anyhost", "k": "a=b", "default.weight": "7"}


def test_dubbo_omits_metadata_its_parser_would_mis_split() -> None:
    instance = Instance(
        "com.foo.Bar", "h:1", "h", 1, metadata={"good": "x", "bad": "a&b", "worse;": "c"}
    )
    name, _ = dubbo.render(instance)
    assert dubbo.decode(name) == "dubbo://h:1/com.foo.Bar?good=x&interface=com.foo.Bar"


def test_dubbo_metadata_is_written_into_the_url_as_dubbo_writes_it() -> None:
    instance = Instance(
        "com.foo.Bar", "h:1", "h", 1, zone=" eu west 1\t",
        metadata={"app name": "shop co", "bad": "a & b", "empty": "", "blank": "  ", "Z": "y",
                  "été": "café ☃", "\U0001d538": "s", "\uffff": "t", "path": "/a/b?c=d",
                  "pct": "100%+1"},
    )  # fmt: skip
    name, _ = dubbo.render(instance)
    # What Dubbo's URL.toFullString then URLEncoder.encode give for these
    # parameters (checked with a JDK): keys in Java's String order (U+1D538,
    # a surrogate pair, before U+FFFF), values trimmed, the interface named;
    # left out: the value its parser would split, and the empty and blank
    # values, which Dubbo 3 would read back as the key itself.
    assert name == (
        "dubbo%3A%2F%2Fh%3A1%2Fcom.foo.Bar%3FZ%3Dy%26app+name%3Dshop+co"
        "%26interface%3Dcom.foo.Bar%26path%3D%2Fa%2Fb%3Fc%3Dd%26pct%3D100%25%2B1"
        "%26zone%3Deu+west+1%26%C3%A9t%C3%A9%3Dcaf%C3%A9+%E2%98%83%26%F0%9D%94%B8%3Ds"
        "%26%EF%BF%BF%3Dt"
    )
    parsed = dubbo.parse("com.foo.Bar", name)
    assert parsed is not None
    assert parsed.zone == "eu west 1"
    assert dict(parsed.metadata) == {
        "app name": "shop co", "Z": "y", "été": "café ☃", "\U0001d538": "s", "\uffff": "t",
        "path": "/a/b?c=d", "pct": "100%+1", "interface": "com.foo.Bar",
    }  # fmt: skip


def test_dubbo_category_directories_and_client_paths() -> None:
    assert dubbo.categories("group/com.foo.Bar") == (
        "group%2Fcom.foo.Bar/consumers", "group%2Fcom.foo.Bar/routers",
        "group%2Fcom.foo.Bar/configurators",
    )  # fmt: skip
    assert dubbo.CLIENT_PATHS == (
        "*", "*/providers", "*/consumers", "*/routers", "*/configurators", "*/consumers/*",
    )  # fmt: skip


def test_dubbo_directories() -> None:
    assert dubbo.directory("com.foo.Bar") == "com.foo.Bar/providers"
    assert dubbo.directory("group/com.foo.Bar") == "group%2Fcom.foo.Bar/providers"
    assert dubbo.service_of("group%2Fcom.foo.Bar/providers") == "group/com.foo.Bar"
    assert dubbo.service_of("com.foo.Bar/consumers") is None
    assert dubbo.service_of("com.foo.Bar") is None


def test_curator_parses_what_curator_writes() -> None:
    instance = curator.parse(
        "orders", "5f1c2a9e-3b7d-4c1e-9a55-0d6f1e2b3c4d", CURATOR_WITH_URI_SPEC
    )
    assert instance is not None
    assert instance.service == "orders"
    assert instance.instance_id == "5f1c2a9e-3b7d-4c1e-9a55-0d6f1e2b3c4d"
    assert instance.endpoint == ("10.0.0.7", 8080)
    assert instance.protocol == "http"  # {scheme} without an sslPort, as Curator builds it
    assert instance.health is Health.UNKNOWN

    with_payload = curator.parse("orders", "x1", CURATOR_WITH_PAYLOAD)
    assert with_payload is not None
    assert with_payload.endpoint == ("10.0.0.8", 8080)
    assert with_payload.metadata["zone"] == "az1"
    assert with_payload.metadata["curator.sslPort"] == "8443"
    assert with_payload.metadata["curator.serviceType"] == "STATIC"
    assert with_payload.protocol == ""


def test_curator_re_renders_what_it_parsed() -> None:
    instance = curator.parse(
        "orders", "5f1c2a9e-3b7d-4c1e-9a55-0d6f1e2b3c4d", CURATOR_WITH_URI_SPEC
    )
    assert instance is not None
    assert curator.render(instance) == (instance.instance_id, CURATOR_WITH_URI_SPEC)

    with_payload = curator.parse("orders", "x1", CURATOR_WITH_PAYLOAD)
    assert with_payload is not None
    name, data = curator.render(with_payload)
    assert name == "x1"
    assert json.loads(data) == json.loads(CURATOR_WITH_PAYLOAD)
    assert list(json.loads(data)) == list(json.loads(CURATOR_WITH_PAYLOAD))  # field order


def test_curator_render_keeps_exactly_curators_field_set() -> None:
    _, data = curator.render(Instance("orders", "a", "h", 1))
    assert json.loads(data) == {
        "name": "orders",
        "id": "a",
        "address": "h",
        "port": 1,
        "sslPort": None,
        "payload": None,
        "registrationTimeUTC": 0,
        "serviceType": "DYNAMIC",
        "uriSpec": None,
    }


def test_curator_tolerates_newer_and_sparser_records() -> None:
    disabled = {"name": "s", "id": "i", "address": "h", "sslPort": 443, "enabled": False}
    instance = curator.parse("", "i", json.dumps(disabled).encode())
    assert instance is not None
    assert instance.service == "s"
    assert instance.port == 443
    assert instance.health is Health.FAILING
    # The REST example of curator-x-discovery-server: a string payload, no uriSpec.
    rest = {"name": "test", "id": "ca2f", "address": "10.20.30.40", "port": 1234,
            "payload": "From Test", "registrationTimeUTC": 1325129459728,
            "serviceType": "STATIC"}  # fmt: skip
    instance = curator.parse("test", "ca2f", json.dumps(rest).encode())
    assert instance is not None
    assert instance.metadata["curator.payload"] == "From Test"
    assert json.loads(curator.render(instance)[1])["payload"] == "From Test"


def test_curator_escapes_ids_zookeeper_would_refuse() -> None:
    name, data = curator.render(Instance("orders", "a/b", "h", 1))
    assert name == "a%2Fb"
    assert json.loads(data)["id"] == "a/b"
    assert curator.parse("orders", name, data) == Instance("orders", "a/b", "h", 1)


def test_serverset_parses_a_real_member() -> None:
    instance = serverset.parse("aurora/www-data/prod/hello", "member_0000000003", SERVERSET_MEMBER)
    assert instance is not None
    assert instance.service == "aurora/www-data/prod/hello"
    assert instance.instance_id == "0000000003"
    assert instance.endpoint == ("192.168.33.7", 31337)
    assert instance.health is Health.PASSING
    assert dict(instance.metadata) == {
        "serverset.endpoint.aurora": "192.168.33.7:8081",
        "serverset.endpoint.http": "192.168.33.7:8081",
        "serverset.shard": "0",
    }
    name, data = serverset.render(instance)
    assert name == "member_0000000003"
    assert json.loads(data) == json.loads(SERVERSET_MEMBER)


@pytest.mark.parametrize(
    ("status", "health"),
    [
        ("ALIVE", Health.PASSING),
        ("DEAD", Health.FAILING),
        ("STOPPED", Health.FAILING),
        ("STARTING", Health.UNKNOWN),
        ("STOPPING", Health.UNKNOWN),
        ("WARNING", Health.UNKNOWN),
        ("UNKNOWN", Health.UNKNOWN),
        (None, Health.UNKNOWN),
        (7, Health.UNKNOWN),
    ],
)
def test_serverset_status_maps_to_health(status: object, health: Health) -> None:
    record = {"serviceEndpoint": {"host": "h", "port": 1}, "status": status}
    instance = serverset.parse("s", "member_1", json.dumps(record).encode())
    assert instance is not None
    assert instance.health is health


def test_serverset_renders_unchecked_instances_alive() -> None:
    """Finagle routes only to ALIVE members; registration is liveness."""
    _, data = serverset.render(Instance("s", "1", "h", 1))
    assert json.loads(data)["status"] == "ALIVE"
    _, data = serverset.render(Instance("s", "1", "h", 1, health=Health.FAILING))
    assert json.loads(data)["status"] == "DEAD"


def test_serverset_ignores_non_member_znodes() -> None:
    assert serverset.parse("s", "leader_0000000001", SERVERSET_MEMBER) is None


def test_plain_format() -> None:
    instance = Instance(
        "orders", "i-1", "10.0.0.9", 8080, weight=7, zone="az1", metadata={"v": "1.4.2"}
    )
    name, data = plain.render(instance)
    assert name == "i-1"
    assert json.loads(data) == {
        "host": "10.0.0.9",
        "port": 8080,
        "weight": 7,
        "zone": "az1",
        "metadata": {"v": "1.4.2"},
    }
    assert plain.parse(
        "orders", "i-1", b'{"host":"h","port":"80","metadata":{"n":3,"b":true}}'
    ) == (Instance("orders", "i-1", "h", 80, metadata={"n": "3", "b": "true"}))


def test_layout_registry() -> None:
    for name in layouts.NAMES:
        layout = layouts.get(name)
        assert name == layout.NAME
        for attribute in ("directory", "service_of", "parse", "render"):
            assert callable(getattr(layout, attribute))
    with pytest.raises(ConfigError, match=r"unknown layout 'etcd' \(known: curator, dubbo, "):
        layouts.get("etcd")


# --- round trips ---------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
HOSTS = st.sampled_from(["10.0.0.1", "fe80::1", "host-a.example.com", "localhost"])
PORTS = st.integers(0, 65535)


def _metadata(keys: st.SearchStrategy[str], values: st.SearchStrategy[str]) -> Any:
    return st.dictionaries(keys, values, max_size=4)


plain_instances = st.builds(
    Instance,
    TEXT,
    TEXT,
    HOSTS,
    PORTS,
    weight=st.integers(0, 1000),
    zone=st.text(max_size=5),
    metadata=_metadata(st.text(max_size=6), st.text(max_size=6)),
)
curator_instances = st.builds(
    Instance,
    TEXT,
    TEXT,
    HOSTS,
    PORTS,
    protocol=st.sampled_from(["", "http", "https", "grpc"]),
    metadata=_metadata(
        st.text(max_size=6).filter(lambda k: k != "@class" and not k.startswith("curator.")),
        st.text(max_size=6),
    ),
)
serverset_instances = st.builds(
    Instance,
    TEXT,
    TEXT,
    HOSTS,
    PORTS,
    health=st.sampled_from([Health.PASSING, Health.FAILING]),
    metadata=_metadata(
        st.text(max_size=6).filter(lambda k: not k.startswith("serverset.")), st.text(max_size=6)
    ),
)
SAFE_KEY = st.text(max_size=6).filter(
    lambda k: (
        k
        and k == k.strip("".join(map(chr, range(0x21))))
        and not any(c in k for c in "&;=")
        and k not in {"weight", "zone", "enabled", "disabled", "default.weight"}
    )
)
# Dubbo trims values as Java's String.trim does and never writes an empty one.
SAFE_VALUE = st.text(max_size=6).filter(
    lambda v: "&" not in v and ";" not in v and v == v.strip("".join(map(chr, range(0x21)))) != ""
)


@st.composite
def dubbo_instances(draw: st.DrawFn) -> Instance:
    host = draw(HOSTS)
    port = draw(PORTS)
    return Instance(
        draw(st.from_regex(r"[a-z][a-z0-9_.$]{0,20}", fullmatch=True)),
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        host,
        port,
        weight=draw(st.integers(0, 1000)),
        zone=draw(SAFE_VALUE | st.just("")),
        protocol=draw(st.sampled_from(["dubbo", "tri", "rest", "grpc"])),
        metadata=draw(_metadata(SAFE_KEY, SAFE_VALUE)),
        health=draw(st.sampled_from([Health.UNKNOWN, Health.FAILING])),
    )


ROUND_TRIPS = [
    (plain, plain_instances),
    (curator, curator_instances),
    (serverset, serverset_instances),
    (dubbo, dubbo_instances()),
]


@pytest.mark.parametrize(("layout", "strategy"), ROUND_TRIPS, ids=lambda v: getattr(v, "NAME", ""))
def test_render_then_parse_gives_the_same_instance(layout: Any, strategy: Any) -> None:
    @given(strategy)
    def check(instance: Instance) -> None:
        name, data = layout.render(instance)
        assert "/" not in name
        assert name not in {"", ".", ".."}
        expected = instance
        if layout is dubbo:  # a Dubbo URL always names its interface
            metadata = {"interface": instance.service, **instance.metadata}
            expected = attrs.evolve(instance, metadata=metadata)
        assert layout.parse(instance.service, name, data) == expected
        assert layout.render(instance) == (name, data)  # deterministic

    check()


@given(TEXT)
def test_node_names_are_valid_and_reversible(text: str) -> None:
    name = node_name(text)
    assert "/" not in name
    assert name not in {".", ".."}
    assert not any(ord(c) < 0x20 for c in name)
    assert node_text(name) == text


# --- garbage -------------------------------------------------------------------

GARBAGE_DATA = [
    b"",
    b"\xff\xfe\x00",
    b"null",
    b"[]",
    b'"a string"',
    b"{",
    b"[" * 100_000,
    b'{"host": "h", "port": 99999}',
    b'{"host": "h", "port": true}',
    b'{"host": "h", "port": NaN}',
    b'{"host": "", "port": 80}',
    b'{"host": ["h"], "port": 80}',
    b'{"host": "h", "port": 80, "weight": -5}',
    b'{"address": "h", "port": "eighty"}',
    b'{"serviceEndpoint": {"host": "h", "port": "x"}}',
    b'{"serviceEndpoint": "h:80"}',
    b'{"address": null, "port": 80}',
]
GARBAGE_NAMES = [
    "",
    "member_",
    "%ZZ",
    "%FF",
    "dubbo%3A%2F%2Fh",
    "dubbo%3A%2F%2Fh%3Abad%2Fx",
    "dubbo%3A%2F%2Fh%3A70000%2Fx",
    "%3A%2F%2Fh%3A1%2Fx",
    "not a url",
]
ALL = [dubbo, curator, serverset, plain]


@pytest.mark.parametrize("layout", ALL, ids=lambda v: v.NAME)
@pytest.mark.parametrize("data", GARBAGE_DATA, ids=lambda v: repr(v[:24]))
def test_garbage_data_returns_none(layout: Any, data: bytes) -> None:
    name = "member_1" if layout is serverset else "x"
    assert layout.parse("svc", name, data) is None


@pytest.mark.parametrize("name", GARBAGE_NAMES)
def test_garbage_dubbo_names_return_none(name: str) -> None:
    assert dubbo.parse("svc", name, b"") is None


@pytest.mark.parametrize("layout", ALL, ids=lambda v: v.NAME)
def test_parse_never_raises(layout: Any) -> None:
    @given(st.text(max_size=40), st.text(max_size=40), st.binary(max_size=80))
    def check(service: str, name: str, data: bytes) -> None:
        result = layout.parse(service, name, data)
        assert result is None or isinstance(result, Instance)

    @given(
        st.text(max_size=10),
        st.text(max_size=10),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "host",
                            "port",
                            "address",
                            "name",
                            "id",
                            "payload",
                            "serviceEndpoint",
                            "additionalEndpoints",
                            "metadata",
                            "uriSpec",
                            "parts",
                            "value",
                            "variable",
                            "shard",
                            "status",
                            "sslPort",
                            "weight",
                            "zone",
                            "enabled",
                        ]
                    ),
                    children,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ),
    )
    def check_json(service: str, name: str, record: object) -> None:
        data = json.dumps(record).encode()
        result = layout.parse(service, "member_" + name, data)
        assert result is None or isinstance(result, Instance)

    check()
    check_json()


# --- the real Curator ----------------------------------------------------------

_JARS = [
    Path("/usr/share/java") / f"{name}.jar"
    for name in (
        "curator-x-discovery",
        "curator-framework",
        "curator-client",
        "guava",
        "jackson-databind",
        "jackson-core",
        "jackson-annotations",
        "zookeeper",
    )
]

_CHECKER = """
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.util.Map;

public class Check {
  public static void main(String[] args) throws Exception {
    JsonInstanceSerializer<Map> serializer = new JsonInstanceSerializer<>(Map.class);
    BufferedReader in =
        new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    PrintStream out = new PrintStream(System.out, true, "UTF-8");
    String line;
    while ((line = in.readLine()) != null) {
      try {
        ServiceInstance<Map> i = serializer.deserialize(line.getBytes(StandardCharsets.UTF_8));
        out.println(new String(serializer.serialize(i), StandardCharsets.UTF_8));
      } catch (Exception e) {
        out.println("ERROR " + e);
      }
    }
  }
}
"""


@pytest.mark.skipif(
    shutil.which("java") is None or not all(jar.exists() for jar in _JARS),
    reason="needs a JDK and Debian's libcurator-discovery-java",
)
def test_real_curator_reads_what_we_render(tmp_path: Path) -> None:
    """Curator 5.4 deserializes our JSON and, re-serializing it, says the same thing."""
    instances = [
        Instance("orders", "a", "10.0.0.1", 8080),
        Instance("orders", "b/c", "10.0.0.2", 8081, protocol="grpc", metadata={"ü": "ß"}),
        Instance(
            "orders",
            "d",
            "10.0.0.3",
            8082,
            protocol="https",  # what {scheme} means with an sslPort
            metadata={
                "k": "v",
                "curator.sslPort": "8443",
                "curator.serviceType": "STATIC",
                "curator.registrationTimeUTC": "1700000000000",
                "curator.uriSpec": "{scheme}://{address}:{ssl-port}/x",
            },
        ),
    ]
    source = tmp_path / "Check.java"
    source.write_text(_CHECKER)
    lines = "".join(curator.render(i)[1].decode() + "\n" for i in instances)
    result = subprocess.run(
        ["java", "-cp", ":".join(map(str, _JARS)), str(source)],
        input=lines.encode(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    echoed = result.stdout.decode().splitlines()
    assert len(echoed) == len(instances), result.stderr.decode()
    for instance, line in zip(instances, echoed, strict=True):
        assert not line.startswith("ERROR"), line
        assert curator.parse("orders", curator.render(instance)[0], line.encode()) == instance
        assert line.encode() == curator.render(instance)[1]
