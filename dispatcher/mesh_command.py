"""``zkgate mesh get|set|history|rollback|consumers``: mesh onboarding of a running
Dispatcher, through its admin endpoint's mesh API (:mod:`dispatcher.faces.admin.mesh`).

::

    zkgate mesh get       [--admin HOST:PORT] [--json]
    zkgate mesh set       FILE --why TEXT [--dry-run] [--expected-version N] [--who NAME]
                          [--admin HOST:PORT] [--token-file FILE]
    zkgate mesh history   [--limit N] [--admin HOST:PORT] [--json]
    zkgate mesh rollback  VERSION --why TEXT [--expected-version N] [--who NAME]
                          [--admin HOST:PORT] [--token-file FILE]
    zkgate mesh consumers [--admin HOST:PORT] [--json]

``FILE`` is a mesh document (:mod:`dispatcher.governance.mesh`) in TOML or JSON. Exit codes
as ``zkgate policy``: 0 done, 1 refused, 2 usage, 3 unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final, TextIO

from dispatcher.policy_command import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    _call,
    _print_changes,
    _read_document,
    _Refused,
    _require_why,
    _revision_line,
    _Unreachable,
    _Usage,
    _who,
)

__all__ = ["add_command", "run"]


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``zkgate mesh`` on the ``zkgate`` parser."""
    mesh = commands.add_parser(
        "mesh",
        help="switch consumers onto the mesh, set ratios, list consumers",
        description="Read and change the mesh settings of a running Dispatcher through its "
        "admin endpoint. Exit 0 done, 1 refused (invalid, conflict, token), 3 unreachable.",
    )
    actions = mesh.add_subparsers(dest="mesh_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, *, writes: bool = False) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--admin",
            default="127.0.0.1:8081",
            metavar="HOST:PORT",
            help="the Dispatcher's admin endpoint (default: %(default)s)",
        )
        if writes:
            parser.add_argument("--token-file", type=Path, metavar="FILE",
                                help="file holding the [governance] write token")  # fmt: skip
            parser.add_argument("--why", metavar="TEXT", help="why (required for a write)")
            parser.add_argument("--who", metavar="NAME", help="the author (default: user@host)")
            parser.add_argument("--expected-version", type=int, metavar="N",
                                help="write on top of version N")  # fmt: skip
        parser.set_defaults(run=run)
        return parser

    get = action("get", "print the current version and its document")
    get.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    put = action("set", "write FILE as the next version (prints the diff first)", writes=True)
    put.add_argument("file", type=Path, metavar="FILE")
    put.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    history = action("history", "list the kept versions, newest first")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    rollback = action("rollback", "write an earlier version's document again", writes=True)
    rollback.add_argument("version", type=int, metavar="VERSION")
    consumers = action("consumers", "list the consumers known, their sessions and versions")
    consumers.add_argument("--json", action="store_true", help="print the API's answer as JSON")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one ``zkgate mesh`` action; the exit code."""
    try:
        return _ACTIONS[args.mesh_action](args, out)
    except _Refused as exc:
        print(f"zkgate mesh: refused: {exc}", file=err)
        return EXIT_REFUSED
    except _Unreachable as exc:
        print(f"zkgate mesh: cannot reach the admin endpoint at {args.admin}: {exc}", file=err)
        return EXIT_UNREACHABLE
    except _Usage as exc:
        print(f"zkgate mesh: error: {exc}", file=err)
        return EXIT_USAGE


def _dump(answer: Any, out: TextIO) -> int:
    json.dump(answer, out, indent=2, ensure_ascii=False)
    print(file=out)
    return EXIT_OK


def _get(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "GET", "/mesh")
    if args.json:
        return _dump(answer, out)
    if not answer["version"]:
        print("no mesh settings written yet (version 0): every consumer is off", file=out)
        return EXIT_OK
    print(_revision_line(answer), file=out)
    json.dump(answer["document"], out, indent=2, ensure_ascii=False, sort_keys=True)
    print(file=out)
    return EXIT_OK


def _set(args: argparse.Namespace, out: TextIO) -> int:
    document = _read_document(args.file)
    if not args.dry_run:
        _require_why(args)
    answer = _call(args, "POST", "/mesh/diff", document)
    _print_changes(answer, out)
    if args.dry_run:
        print("dry run: nothing written", file=out)
        return EXIT_OK
    expected = answer["base_version"] if args.expected_version is None else args.expected_version
    written = _call(args, "PUT", "/mesh", {
        "document": document, "expected_version": expected, "why": args.why, "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    return EXIT_OK


def _history(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "GET", f"/mesh/history?limit={args.limit}")
    if args.json:
        return _dump(answer, out)
    if not answer["versions"]:
        print("no mesh settings written yet (version 0)", file=out)
    for revision in answer["versions"]:
        print(_revision_line(revision), file=out)
    return EXIT_OK


def _rollback(args: argparse.Namespace, out: TextIO) -> int:
    _require_why(args)
    expected = args.expected_version
    if expected is None:
        expected = _call(args, "GET", "/mesh")["version"]
    written = _call(args, "POST", "/mesh/rollback", {
        "to_version": args.version, "expected_version": expected, "why": args.why,
        "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    for change in written.get("changes", []):
        print(f"  {change}", file=out)
    return EXIT_OK


def _consumers(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "GET", "/mesh/consumers")
    if args.json:
        return _dump(answer, out)
    if not answer["consumers"]:
        print("no consumers known", file=out)
    for consumer in answer["consumers"]:
        version = consumer["version"] or "version unknown"
        print(f"{consumer['application'] or '(no application)'}  {consumer['host']}  "
              f"{consumer['framework'] or '-'} {version}  sessions "
              f"{','.join(consumer['sessions'])}  ({consumer['source']})", file=out)  # fmt: skip
        for row in consumer["services"]:
            line = f"  {row['service']}: {row['state']}"
            if row["mode"] == "on":
                line += f" (ratio {row['ratio']}%, sidecar {row['sidecar'] or 'none'})"
            if row["reason"]:
                line += f": {row['reason']}"
            print(line, file=out)
    return EXIT_OK


_ACTIONS: Final = {
    "get": _get, "set": _set, "history": _history, "rollback": _rollback,
    "consumers": _consumers,
}  # fmt: skip
