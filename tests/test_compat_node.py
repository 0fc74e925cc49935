"""npm's node-zookeeper-client (pure JavaScript) against zkgate and real ZooKeeper.

Node.js services reach ZooKeeper through this library, whose wire code shares
nothing with the Java client or kazoo, so it is an independent witness of
zkgate's protocol. ``tests/compat/node/compat.js`` exercises create, getData /
getChildren / exists with watchers, setData, remove, transactions, ACLs with
addAuthInfo, and ephemerals going away with their session; each check it
prints is asserted here by name, against real ZooKeeper (the reference) and
zkgate. The library is installed from the committed package-lock.json with
``npm ci`` into ``tests/compat/node/node_modules`` (git-ignored) the first time
a session needs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.compat.harness import (
    TARGET_KINDS,
    Target,
    failed_checks,
    make_target,
    parse_report,
    run_client,
)

NODE_DIR = Path(__file__).parent / "compat" / "node"
LIBRARY = "node-zookeeper-client"

#: Every check each scenario must print ``OK`` for, in the script's order.
CHECKS: dict[str, tuple[str, ...]] = {
    "basic": (
        "create",
        "create_existing",
        "create_without_parent",
        "get_data",
        "exists",
        "set_data",
        "set_data_bad_version",
        "sequential",
        "get_children",
        "remove_not_empty",
        "remove_bad_version",
        "remove",
        "remove_missing",
        "mkdirp",
        "create_without_data",
    ),
    "watches": (
        "data_watch",
        "data_watch_one_shot",
        "get_children_with_watcher",
        "child_watch",
        "exists_watch_on_missing_node",
        "exists_watch_created",
        "exists_watch_data_changed",
        "delete_fires_data_and_child_watches",
        "watch_sees_other_session",
    ),
    "transaction": (
        "commit_result_types",
        "commit_result_paths",
        "commit_set_data_stat",
        "committed",
        "failed_commit_error",
        "failed_commit_results",
        "failed_commit_rolled_back",
    ),
    "acl": (
        "create_with_digest_acl",
        "owner_reads",
        "get_acl",
        "stranger_get_data",
        "stranger_set_data",
        "stranger_get_acl",
        "wrong_password",
        "add_auth_info",
        "set_acl_bad_version",
        "set_acl",
        "world_read_only",
        "set_acl_needs_admin",
        "invalid_acl",
        "unknown_auth_scheme_fails",
    ),
    "ephemeral": (
        "ephemeral_sequential_name",
        "ephemeral_owner",
        "no_children_for_ephemerals",
        "children_before_close",
        "close_fires_delete_watch",
        "close_fires_child_watch",
        "ephemerals_removed_on_close",
    ),
}

#: The script gives each scenario 45 s of its own; this only catches a wedged process.
RUN_TIMEOUT = 60.0


def _installed_version() -> str | None:
    manifest = NODE_DIR / "node_modules" / LIBRARY / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def node_client_dir() -> Path:
    """tests/compat/node with its pinned library installed (``npm ci``, only if missing)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed: scripts/test installs nodejs and npm")
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"][LIBRARY]
    if _installed_version() != pinned:
        install = run_client(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            timeout=300.0,
        )
        assert install.returncode == 0, f"npm ci failed in {NODE_DIR}\n{install.tail()}"
        assert _installed_version() == pinned, f"npm ci did not install {LIBRARY} {pinned}"
    return NODE_DIR


@pytest.fixture(params=TARGET_KINDS)
def target(request: pytest.FixtureRequest, unique_path: str) -> Target:
    return make_target(request, request.param, unique_path)


@pytest.mark.parametrize("scenario", list(CHECKS))
def test_node_zookeeper_client(scenario: str, target: Target, node_client_dir: Path) -> None:
    run = run_client(
        ["node", "compat.js", target.address, target.base, scenario],
        cwd=node_client_dir,
        timeout=RUN_TIMEOUT,
    )
    problems = failed_checks(parse_report(run.stdout), CHECKS[scenario], scenario)
    assert not problems, (
        f"node-zookeeper-client {scenario} against {target.describe()}:\n  "
        + "\n  ".join(problems)
        + f"\n{run.tail()}"
    )
    assert run.returncode == 0, f"compat.js exited {run.returncode}\n{run.tail()}"
