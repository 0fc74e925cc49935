"""A layout installed as a plugin works wherever a built-in layout does.

The plugin is a real distribution on ``sys.path`` (a ``.dist-info`` with an
``entry_points.txt`` in the ``zkgate.layouts`` group), so it is found the way
an operator's ``pip install`` would make it found: configuration checks,
projections and the ZooKeeper adapter all ask the one lookup,
:func:`dispatcher.core.upstream.layout_kind`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from adapters.zookeeper import _Root, parse_config
from dispatcher.config import load_config
from dispatcher.core.model import Instance
from dispatcher.core.upstream import ConfigError, layout_kind
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, wait_for

_MODULE = "zkgate_flat_layout"

# One znode per instance, named by its id, holding "HOST:PORT" as text.
_LAYOUT_SOURCE = """
from __future__ import annotations

from dispatcher.core.model import Instance, Source
from dispatcher.wire import parse_address

NAME = "flat"


def directory(service: str) -> str:
    return service


def service_of(directory: str) -> str | None:
    return directory if directory and "/" not in directory else None


def parse(
    service: str, name: str, data: bytes, *, source: Source | None = None
) -> Instance | None:
    try:
        host, port = parse_address(data.decode("ascii"), default_host=None)
    except (UnicodeDecodeError, ValueError):
        return None
    return Instance(service, name, host, port, source=source)


def render(instance: Instance) -> tuple[str, bytes]:
    return instance.instance_id, f"{instance.host}:{instance.port}".encode("ascii")
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding the ``flat`` layout and the metadata that registers it."""
    root = tmp_path / "plugins"
    root.mkdir()
    (root / f"{_MODULE}.py").write_text(_LAYOUT_SOURCE)
    info = root / "zkgate_flat_layout-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: zkgate-flat-layout\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[zkgate.layouts]\nflat = {_MODULE}\n")
    yield root
    sys.modules.pop(_MODULE, None)


@pytest.fixture
def installed(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(plugin_dir))
    return plugin_dir


def test_an_unknown_layout_names_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match=r"^unknown layout 'flat' \(known: curator, dubbo, "):
        layout_kind("flat")


def test_a_plugin_layout_is_accepted_by_projections_and_the_zookeeper_adapter(
    installed: Path, tmp_path: Path
) -> None:
    layout = layout_kind("flat")
    assert layout.render(Instance("orders", "i-1", "10.0.0.9", 8080)) == ("i-1", b"10.0.0.9:8080")

    config = tmp_path / "zkgate.toml"
    config.write_text(
        '[[upstream]]\nname = "zk"\nkind = "zookeeper"\nhosts = "127.0.0.1:2181"\n'
        'roots = [{ path = "/flatroot", layout = "flat" }]\n'
        '[[projection]]\nroot = "/flat"\nlayout = "flat"\n'
    )
    loaded = load_config(config)
    assert [p.layout for p in loaded.projections] == ["flat"]

    adapter_config = parse_config(
        "zk", {"hosts": "h:1", "roots": [{"path": "/r", "layout": "flat"}]}
    )
    root = _Root.of(adapter_config.roots[0], "")
    assert root.layout is layout
    assert root.layout.parse("orders", "i-1", b"10.0.0.9:8080") == (
        Instance("orders", "i-1", "10.0.0.9", 8080)
    )


def test_a_plugin_layout_is_read_upstream_and_projected(
    plugin_dir: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    """End to end: zkgate reads a ZooKeeper root in the plugin layout and projects
    the same instances in it, through its own ZooKeeper face."""
    upstream = KazooClient(hosts=zookeeper.address, timeout=10)
    upstream.start(timeout=10)
    try:
        upstream.create("/flatroot/orders/i-1", b"10.0.0.9:8080", makepath=True)
        config = tmp_path / "zkgate.toml"
        config.write_text(
            f'node_id = "gw-plugin"\n[[upstream]]\nname = "zk"\nkind = "zookeeper"\n'
            f'hosts = "{zookeeper.address}"\n'
            'roots = [{ path = "/flatroot", layout = "flat" }]\n'
            '[[projection]]\nroot = "/flat"\nlayout = "flat"\n'
        )
        path = os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")]))
        server = zkgate_factory(["--config", str(config)], env={"PYTHONPATH": path})
        face = KazooClient(hosts=server.address, timeout=10)
        face.start(timeout=10)
        try:
            wait_for(lambda: face.exists("/flat/orders") and face.get_children("/flat/orders"),
                     timeout=20, message="the plugin layout's projection")  # fmt: skip
            (name,) = face.get_children("/flat/orders")
            data, _ = face.get(f"/flat/orders/{name}")
            assert data == b"10.0.0.9:8080"
        finally:
            face.stop()
            face.close()
    finally:
        upstream.delete("/flatroot", recursive=True)
        upstream.stop()
        upstream.close()
