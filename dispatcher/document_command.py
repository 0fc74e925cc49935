"""``zkgate KIND get|diff|set|history|rollback``: one kind of governance document of a running
Dispatcher, through its admin endpoint's document API (:mod:`dispatcher.faces.admin.documents`).

::

    zkgate KIND get      [--admin HOST:PORT] [--json]
    zkgate KIND diff     FILE [--admin HOST:PORT]
    zkgate KIND set      FILE --why TEXT [--dry-run] [--expected-version N] [--who NAME]
                         [--admin HOST:PORT] [--token-file FILE]
    zkgate KIND history  [--limit N] [--admin HOST:PORT] [--json]
    zkgate KIND rollback VERSION --why TEXT [--expected-version N] [--who NAME]
                         [--admin HOST:PORT] [--token-file FILE]

A thin module per kind (:mod:`dispatcher.policy_command`, :mod:`dispatcher.mesh_command`)
describes it with a :class:`DocumentCommand` and may add actions of its own.

``FILE`` is a document in TOML (``.toml``) or JSON (anything else). ``set`` prints the
changes from the current version before it writes them, and writes them on top of that
version (a change someone made meanwhile makes it fail with a conflict rather than be
overwritten); ``--dry-run`` stops after the changes. Writes present the token read from
``--token-file`` (surrounding whitespace stripped). Every action takes ``--tls-ca FILE``
(and ``--tls-cert FILE --tls-key FILE`` where the endpoint verifies clients) to reach an
admin endpoint that serves TLS; its writes are refused beyond loopback without it.

Exit codes: 0 done, 1 refused (an invalid document, a conflict, a wrong or missing token,
the kind unavailable: the server's message is printed), 2 usage, 3 the admin endpoint
cannot be reached.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import socket
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

import attrs

from dispatcher import admin_client
from dispatcher.admin_client import Refused, Unreachable
from dispatcher.tls import add_client_arguments, client_context_from_args

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Action",
    "DocumentCommand",
    "Refused",
    "Unreachable",
    "Usage",
    "add_command",
    "call",
    "dump",
]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

_TIMEOUT: Final = 30.0
"""Seconds one request may take: a write waits for the store's atomic commit."""

Action = Callable[["DocumentCommand", argparse.Namespace, TextIO], int]
"""One action of a command: its exit code, its output written to the stream."""


class Usage(Exception):
    """The command line cannot be carried out as given."""


@attrs.frozen
class DocumentCommand:
    """One ``zkgate`` subcommand over a kind of governance document."""

    #: The subcommand: ``policy``.
    name: str
    #: The URL prefix of the kind's admin API: ``/policies``.
    prefix: str
    #: The subcommand's one-line help and its description.
    help: str
    description: str
    #: What ``get`` and ``history`` print before the first write.
    nothing_yet: str
    #: Appended to :attr:`nothing_yet` by ``get``: what having no document means.
    nothing_means: str = ""
    #: Whether ``diff FILE`` is offered.
    with_diff: bool = True


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], command: DocumentCommand
) -> Callable[[str, str, Action], argparse.ArgumentParser]:
    """Register ``zkgate NAME`` on the ``zkgate`` parser with the document actions; answers
    a function that adds one more action (``name, help, action``) with ``--admin``."""
    parser = commands.add_parser(command.name, help=command.help, description=command.description)
    actions = parser.add_subparsers(dest="document_action", required=True, metavar="ACTION")

    def action(
        name: str, help_text: str, run_action: Action, *, writes: bool = False
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--admin",
            default="127.0.0.1:8081",
            metavar="HOST:PORT",
            help="the Dispatcher's admin endpoint (default: %(default)s)",
        )
        # Writes are refused beyond loopback unless the endpoint serves TLS, so a remote
        # operator needs these to write at all.
        add_client_arguments(parser, "the admin endpoint")
        if writes:
            parser.add_argument(
                "--token-file",
                type=Path,
                metavar="FILE",
                help="file holding the [governance] write token",
            )
            parser.add_argument("--why", metavar="TEXT", help="why (required for a write)")
            parser.add_argument(
                "--who", metavar="NAME", help="the author recorded (default: user@host)"
            )
            parser.add_argument(
                "--expected-version",
                type=int,
                metavar="N",
                help="write on top of version N (default: the version the diff was made on)",
            )
        parser.set_defaults(run=functools.partial(run, command, run_action))
        return parser

    get = action("get", "print the current version and its document", _get)
    get.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    if command.with_diff:
        diff = action("diff", "print the changes FILE would make to the current version", _diff)
        diff.add_argument("file", type=Path, metavar="FILE")
    put = action("set", "write FILE as the next version (prints the diff first)", _set, writes=True)
    put.add_argument("file", type=Path, metavar="FILE")
    put.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    history = action("history", "list the kept versions, newest first", _history)
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    rollback = action(
        "rollback", "write an earlier version's document again", _rollback, writes=True
    )
    rollback.add_argument("version", type=int, metavar="VERSION")
    return lambda name, help_text, run_action: action(name, help_text, run_action)


def run(
    command: DocumentCommand,
    run_action: Action,
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run one action of ``zkgate NAME``; the exit code."""
    try:
        return run_action(command, args, out)
    except Refused as exc:
        print(f"zkgate {command.name}: refused: {exc}", file=err)
        return EXIT_REFUSED
    except Unreachable as exc:
        print(
            f"zkgate {command.name}: cannot reach the admin endpoint at {args.admin}: {exc}",
            file=err,
        )
        return EXIT_UNREACHABLE
    except Usage as exc:
        print(f"zkgate {command.name}: error: {exc}", file=err)
        return EXIT_USAGE


# --------------------------------------------------------------------- actions


def _get(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    answer = call(args, "GET", command.prefix)
    if args.json:
        return dump(answer, out)
    if not answer["version"]:
        print(command.nothing_yet + command.nothing_means, file=out)
        return EXIT_OK
    print(_revision_line(answer), file=out)
    json.dump(answer["document"], out, indent=2, ensure_ascii=False, sort_keys=True)
    print(file=out)
    return EXIT_OK


def _diff(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    answer = call(args, "POST", f"{command.prefix}/diff", _read_document(args.file))
    _print_changes(answer, out)
    return EXIT_OK


def _set(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    document = _read_document(args.file)
    if not args.dry_run:
        _require_why(args)
    answer = call(args, "POST", f"{command.prefix}/diff", document)
    _print_changes(answer, out)
    if args.dry_run:
        print("dry run: nothing written", file=out)
        return EXIT_OK
    expected = answer["base_version"] if args.expected_version is None else args.expected_version
    written = call(args, "PUT", command.prefix, {
        "document": document, "expected_version": expected, "why": args.why, "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    return EXIT_OK


def _history(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    answer = call(args, "GET", f"{command.prefix}/history?limit={args.limit}")
    if args.json:
        return dump(answer, out)
    if not answer["versions"]:
        print(command.nothing_yet, file=out)
    for revision in answer["versions"]:
        print(_revision_line(revision), file=out)
    return EXIT_OK


def _rollback(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    _require_why(args)
    expected = args.expected_version
    if expected is None:
        expected = call(args, "GET", command.prefix)["version"]
    written = call(args, "POST", f"{command.prefix}/rollback", {
        "to_version": args.version, "expected_version": expected, "why": args.why,
        "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    for change in written.get("changes", []):
        print(f"  {change}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------- helpers


def dump(answer: Any, out: TextIO) -> int:
    """Print the API's answer as JSON (``--json``); exit 0."""
    json.dump(answer, out, indent=2, ensure_ascii=False)
    print(file=out)
    return EXIT_OK


def _revision_line(revision: dict[str, Any]) -> str:
    restores = revision.get("restores")
    line = f"version {revision['version']}  {revision['when']}  by {revision['who']}"
    if restores is not None:
        line += f"  (restores version {restores})"
    return f"{line}: {revision['why']}"


def _print_changes(answer: dict[str, Any], out: TextIO) -> None:
    changes = answer["changes"]
    base = answer["base_version"]
    if not changes:
        print(f"no changes from version {base}", file=out)
        return
    print(f"changes from version {base}:", file=out)
    for change in changes:
        print(f"  {change['text']}", file=out)


def _read_document(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Usage(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(data.decode())
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise Refused(f"{path}: not valid {kind}: {exc}") from None


def _require_why(args: argparse.Namespace) -> None:
    if not args.why or not args.why.strip():
        raise Usage("--why TEXT is required for a write (it is kept in the history)")


def _who(args: argparse.Namespace) -> str:
    if args.who:
        return str(args.who)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container, say)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _token(args: argparse.Namespace) -> str | None:
    path: Path | None = args.token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Usage(f"cannot read --token-file {str(path)!r}: {exc}") from None
    if not token:
        raise Usage(f"--token-file {str(path)!r} is empty")
    return token


def call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, *, write: bool = False
) -> Any:
    """``method path`` on the admin endpoint ``args.admin``; the JSON answer, or
    :class:`Refused` with the server's message, or :class:`Unreachable`. A ``write``
    presents the token of ``args.token_file``."""
    headers = {"accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    if write:
        token = _token(args)
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
    try:
        context = client_context_from_args(args)
    except (ValueError, OSError) as exc:
        raise Usage(str(exc)) from None
    return admin_client.call(
        args.admin, method, path, body=data, headers=headers, context=context, timeout=_TIMEOUT
    )
