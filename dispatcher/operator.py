"""The operator's subcommands: ``zkgate status`` and ``zkgate check-config``.

``status`` reads a running node's admin endpoint (``/status``, ``/snapshot``,
``/shards``) and prints what an operator asks at 3 a.m.: is it ready, which
upstreams are stale and since when, what services it holds and how healthy
their instances are, and who owns what. Exit codes scripts can use: 0 ready,
1 not ready, 3 unreachable.

``check-config`` loads a configuration exactly as ``serve`` (or ``meta``)
would and says what it found; exit 0 when it is valid, 2 with the message
naming the bad key otherwise.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from dispatcher import admin_client
from dispatcher.config import load_config
from dispatcher.settings import ConfigError
from dispatcher.sharding.membership import MembershipConfigError
from dispatcher.tls import add_client_arguments, client_context_from_args

#: Loaders of other programs' configuration files, by name (``--meta``: "meta").
CONFIG_CHECKS = "zkgate.config_checks"

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_INVALID = 2
EXIT_UNREACHABLE = 3


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="show a running node's services, health, shards and upstreams",
        description="Read a running zkgate's admin endpoint and print its state. "
        "Exit 0 when it is ready, 1 when it is not, 3 when it cannot be reached.",
    )
    status.add_argument(
        "--admin",
        default="127.0.0.1:8081",
        metavar="HOST:PORT",
        help="the node's admin endpoint (default: %(default)s)",
    )
    status.add_argument(
        "--services",
        type=int,
        default=50,
        metavar="N",
        help="list at most N services (default: %(default)s)",
    )
    status.add_argument("--json", action="store_true", help="print /status as JSON")
    add_client_arguments(status, "the admin endpoint")
    check = commands.add_parser(
        "check-config",
        help="validate a configuration file without starting anything",
        description="Load FILE as `zkgate serve --config FILE` (or, with --meta, as "
        "`zkgate meta --config FILE`) would. Exit 0 when valid, 2 otherwise.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--meta", action="store_true", help="check a Meta Server configuration")


def check_config(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        if args.meta:
            # The Meta Server's own loader, found by entry point: the
            # Dispatcher's package does not import the Meta Server's.
            (check,) = metadata.entry_points(group=CONFIG_CHECKS, name="meta")
            check.load()(args.file)
            print(f"{args.file}: valid Meta Server configuration", file=out)
            return EXIT_READY
        config = load_config(args.file)
    except (ConfigError, MembershipConfigError, OSError) as exc:
        print(f"zkgate: error: config {str(args.file)!r}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    upstreams = ", ".join(f"{u.name} ({u.kind})" for u in config.upstreams) or "none"
    print(f"{args.file}: valid", file=out)
    print(f"  node {config.node}, ZooKeeper face on {config.zookeeper.listen}", file=out)
    print(f"  upstreams: {upstreams}", file=out)
    if config.projections:
        roots = ", ".join(f"{p.root} ({p.layout})" for p in config.projections)
        print(f"  projections: {roots}", file=out)
    for mirror in config.mirrors:
        hosts = ",".join(f"{host}:{port}" for host, port in mirror.hosts)
        print(f"  mirror: {mirror.root} from {hosts}", file=out)
    return EXIT_READY


def _get(admin: str, path: str, context: ssl.SSLContext | None = None) -> Any:
    return admin_client.call(admin, "GET", path, context=context, timeout=5)


def status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        context = client_context_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"zkgate: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        state = _get(args.admin, "/status", context)
        snapshot = _get(args.admin, f"/snapshot?limit={args.services}", context)
        shards = _get(args.admin, "/shards", context)
    except (admin_client.Refused, admin_client.Unreachable) as exc:
        print(f"zkgate: cannot reach the admin endpoint at {args.admin}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        json.dump(state, out, indent=2)
        print(file=out)
        return EXIT_READY if state["ready"] else EXIT_NOT_READY
    _print_status(state, snapshot, shards, out)
    return EXIT_READY if state["ready"] else EXIT_NOT_READY


def _print_status(state: dict[str, Any], snapshot: dict[str, Any], shards: dict[str, Any],
                  out: TextIO) -> None:  # fmt: skip
    ready = "ready" if state["ready"] else "NOT READY: " + "; ".join(state["reasons"])
    zk = state["zookeeper"]
    print(f"node {state['node']}: {ready}", file=out)
    print(f"ZooKeeper face on {zk['listen']}: {zk.get('sessions', 0)} sessions, "
          f"{zk.get('znodes', 0)} znodes, {zk.get('watches', 0)} watches", file=out)  # fmt: skip
    snap = state["snapshot"]
    print(f"snapshot version {snap['version']}, {snap['services']} services, "
          f"last change {snap['age_seconds']:.0f}s ago", file=out)  # fmt: skip
    print("\nupstreams:", file=out)
    for upstream in state["upstreams"] or []:
        health = "connected" if upstream["connected"] else (
            f"STALE for {upstream['stale_seconds']:.0f}s")  # fmt: skip
        detail = f" ({upstream['detail']})" if upstream["detail"] else ""
        print(f"  {upstream['name']:<20} {upstream['kind']:<10} {health}{detail}", file=out)
    if not state["upstreams"]:
        print("  none (embedded tree only)", file=out)
    print("\nservices:", file=out)
    owners = shards.get("services", {}) if isinstance(shards, dict) else {}
    for name, entry in snapshot["services"].items():
        counts = Counter(instance["health"] for instance in entry["instances"])
        health = ", ".join(f"{n} {h}" for h, n in sorted(counts.items())) or "no instances"
        owner = f"  owner {owners[name]}" if owners.get(name) else ""
        print(f"  {name:<40} {health}{owner}", file=out)
    if snapshot.get("truncated"):
        print(f"  ... {snapshot['total_services'] - len(snapshot['services'])} more", file=out)
    if shards.get("sharding") == "off":
        print("\nsharding: off", file=out)
    else:
        members = shards.get("members", [])
        print(f"\nshards (epoch {shards.get('epoch')}):", file=out)
        for member in members:
            print(f"  {member.get('id')}: {member.get('services', 0)} services, "
                  f"subscriptions at {member.get('subscribe_address')}", file=out)  # fmt: skip
