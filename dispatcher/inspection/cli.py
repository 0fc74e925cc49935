"""``zkgate inspect``: one inspection pass on demand against a running Dispatcher.

Exit codes: 0 every layer consistent, 1 divergences found (printed) or a
pass failed, 2 a usage error, 3 the admin endpoint could not be reached
(or refused the request).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Final, TextIO

from dispatcher import admin_client
from dispatcher.tls import add_client_arguments, client_context_from_args

__all__ = ["add_command", "inspect"]

EXIT_CONSISTENT: Final = 0
EXIT_DIVERGED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inspect`` to the ``zkgate`` command line (``commands``: its subparsers)."""
    parser = commands.add_parser(
        "inspect",
        help="check once that every layer of a running node shows what the registries hold",
        description="Ask a running zkgate (POST /inspect on its admin endpoint) to compare "
        "each upstream read directly with its snapshot, and the snapshot with each "
        "projection's znodes. Nothing is repaired. Exit 0 when consistent, 1 when "
        "divergences were found (printed), 3 when the node cannot be reached.",
    )
    parser.add_argument(
        "--admin", default="127.0.0.1:8081", metavar="HOST:PORT",
        help="the node's admin endpoint (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE",
        help="the admin endpoint's write token ([governance] token), if it has one; "
        "else $ZKGATE_TOKEN",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS",
        help="how long to wait for the pass (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_client_arguments(parser, "the admin endpoint")
    parser.set_defaults(run=inspect)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        return str(args.token_file.read_text(encoding="utf-8").strip())
    return os.environ.get("ZKGATE_TOKEN") or None


def inspect(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the pass and print it; the exit code as in the module docstring."""
    try:
        token = _token(args)
    except OSError as exc:
        print(f"zkgate: error: cannot read --token-file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        context = client_context_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"zkgate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        answer: dict[str, Any] = admin_client.call(
            args.admin, "POST", "/inspect", body=b"", headers=headers, context=context,
            timeout=args.timeout,
        )  # fmt: skip
    except admin_client.Refused as exc:
        print(f"zkgate: the admin endpoint at {args.admin} refused: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except admin_client.Unreachable as exc:
        print(f"zkgate: cannot reach the admin endpoint at {args.admin}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        json.dump(answer, out, indent=2)
        print(file=out)
    else:
        _print(answer, out)
    return EXIT_CONSISTENT if answer.get("consistent") else EXIT_DIVERGED


def _print(answer: dict[str, Any], out: TextIO) -> None:
    for layer in answer.get("layers", []):
        state = "consistent" if layer["consistent"] else "DIVERGED"
        print(f"{layer['layer']}: {state} ({layer['services']} services, "
              f"{layer['reads']} upstream reads, {layer['duration']:.3f} s)", file=out)  # fmt: skip
        if layer.get("error"):
            print(f"  pass failed: {layer['error']}", file=out)
        for skipped in layer.get("skipped", []):
            print(f"  not compared: {skipped}", file=out)
        for d in layer.get("divergences", []):
            parts = [f"{kind} {','.join(d[kind])}" for kind in ("missing", "extra", "differing")
                     if d[kind]]  # fmt: skip
            print(f"  {d['target']} {d['service']}: {'; '.join(parts)} "
                  f"(seen for {d['age']:.1f} s)", file=out)  # fmt: skip
