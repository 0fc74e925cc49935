"""``zkgate status`` and ``zkgate check-config``, run as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.servers import ServerFactory, ZkgateServer, free_port, wait_for

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
    for name in ("zkgate.toml", "dispatcher-1.toml", "dispatcher-2.toml"):
        result = _zkgate("check-config", str(REPO / "docker" / "config" / name))
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout
        if name == "dispatcher-1.toml":
            assert "mirror: /services from zookeeper:2181" in result.stdout
    assert _zkgate("check-config", "--meta", str(REPO / "docker/config/meta.toml")).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstream]]\nname = "e"\nkind = "etcd"\nendpoint = "x:1"\nprefixes = 3\n')
    result = _zkgate("check-config", str(bad))
    assert result.returncode == 2
    assert "upstream[0]" in result.stderr and "prefixes" in result.stderr
