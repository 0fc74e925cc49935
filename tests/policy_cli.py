"""What the policy end-to-end tests share: the write token, the static registry they
rewrite, and ``zkgate policy`` run as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import REPO_ROOT

__all__ = ["POLICY_TOKEN", "policy_cli", "write_static_registry"]

POLICY_TOKEN = "policy-write-token"
"""The ``[governance]`` write token; the tests keep it in ``<tmp>/policy-token``."""


def write_static_registry(path: Path, entries: list[tuple[str, int, str]]) -> None:
    """The static registry: ``(service, port, version tag)`` per instance, written
    atomically (the adapter never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(
        f'[[instance]]\nservice = "{service}"\nid = "{service}-{port}"\nhost = "127.0.0.1"\n'
        f'port = {port}\nhealth = "passing"\nmetadata = {{ version = "{version}" }}\n\n'
        for service, port, version in entries
    ))  # fmt: skip
    tmp.rename(path)


def policy_cli(tmp: Path, admin: str, *args: str) -> str:
    """``zkgate policy ARGS --admin ADMIN`` with the write token of ``tmp``; its stdout.
    Must succeed."""
    if args[0] in ("set", "rollback"):
        args = (*args, "--token-file", str(tmp / "policy-token"))
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "policy", *args, "--admin", admin],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout
