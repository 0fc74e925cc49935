"""A gRPC service registered in etcd, found by a Curator ServiceDiscovery client and
a Dubbo-style kazoo consumer through zkgate's projections.

The promise of a projection: clients keep the discovery code they have. Here
the instance is written into a real etcd in etcd's own gRPC naming format, and
the readers are Apache Curator 5.4's ServiceDiscovery (Debian's jars, run as
a Java source file) and a kazoo consumer that parses Dubbo provider URLs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from kazoo.client import KazooClient

from tests.compat.harness import CURATOR_JARS
from tests.servers import EtcdServer, ServerFactory, ZkgateServer, wait_for

JARS = [*CURATOR_JARS, "/usr/share/java/slf4j-simple.jar"]

DISCOVERY_QUERY = """
import java.util.Map;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryOneTime;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;

public class DiscoveryQuery {
    public static void main(String[] args) throws Exception {
        CuratorFramework client = CuratorFrameworkFactory.newClient(args[0], new RetryOneTime(100));
        client.start();
        client.blockUntilConnected();
        ServiceDiscovery<Map> discovery = ServiceDiscoveryBuilder.builder(Map.class)
            .client(client).basePath(args[1])
            .serializer(new JsonInstanceSerializer<>(Map.class)).build();
        discovery.start();
        for (String name : discovery.queryForNames()) {
            for (ServiceInstance<Map> instance : discovery.queryForInstances(name)) {
                System.out.println(name + " " + instance.getAddress() + " " + instance.getPort());
            }
        }
        discovery.close();
        client.close();
    }
}
"""


@pytest.fixture
def bridged(
    etcd: EtcdServer, zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path
) -> tuple[ZkgateServer, str]:
    prefix = f"/grpc-{uuid.uuid4().hex[:8]}/"
    config = tmp_path / "zkgate.toml"
    config.write_text(f"""
[[upstream]]
name = "etcd"
kind = "etcd"
endpoint = "{etcd.endpoint}"
prefixes = [{{ prefix = "{prefix}", layout = "grpc" }}]

[[projection]]
root = "/services"
layout = "curator"

[[projection]]
root = "/dubbo"
layout = "dubbo"
""")
    result = subprocess.run(
        ["etcdctl", f"--endpoints={etcd.endpoint}", "put", f"{prefix}orders/10.2.0.7:50051",
         json.dumps({"Op": 0, "Addr": "10.2.0.7:50051", "Metadata": None})],
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return zkgate_factory(["--config", str(config)]), prefix


def test_a_kazoo_dubbo_consumer_finds_the_etcd_instance(bridged: tuple[ZkgateServer, str]) -> None:
    server, _ = bridged
    zk = KazooClient(hosts=server.address, timeout=10)
    zk.start(timeout=10)
    try:
        providers = "/dubbo/orders/providers"
        wait_for(lambda: zk.exists(providers) and zk.get_children(providers), timeout=15,
                 message="the etcd instance to appear as a Dubbo provider")  # fmt: skip
        (name,) = zk.get_children(providers)
        url = urlparse(unquote(name))
        assert (url.hostname, url.port, url.path) == ("10.2.0.7", 50051, "/orders")
    finally:
        zk.stop()
        zk.close()


@pytest.mark.skipif(
    shutil.which("java") is None or not all(Path(jar).exists() for jar in JARS),
    reason="needs a JDK and Debian's libcurator-discovery-java (scripts/test installs both)",
)
def test_curator_service_discovery_finds_the_etcd_instance(
    bridged: tuple[ZkgateServer, str], tmp_path: Path
) -> None:
    server, _ = bridged
    source = tmp_path / "DiscoveryQuery.java"
    source.write_text(DISCOVERY_QUERY)

    def query() -> str:
        result = subprocess.run(
            ["java", "-cp", ":".join(JARS), str(source), server.address, "/services"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    # Curator lists what the projection holds: the instance registered in etcd.
    wait_for(lambda: "orders 10.2.0.7 50051" in query().splitlines(), timeout=60,
             message="Curator's ServiceDiscovery to find the etcd instance")  # fmt: skip
