"""``zkgate policy get|set|diff|history|rollback``: the governance policies of a running
Dispatcher, through its admin endpoint's policy API (:mod:`dispatcher.faces.admin.policies`).

::

    zkgate policy get      [--admin HOST:PORT] [--json]
    zkgate policy diff     FILE [--admin HOST:PORT]
    zkgate policy set      FILE --why TEXT [--dry-run] [--expected-version N] [--who NAME]
                           [--admin HOST:PORT] [--token-file FILE]
    zkgate policy history  [--limit N] [--admin HOST:PORT] [--json]
    zkgate policy rollback VERSION --why TEXT [--expected-version N] [--who NAME]
                           [--admin HOST:PORT] [--token-file FILE]

``FILE`` is a policy document in TOML (``.toml``) or JSON (anything else).
``set`` prints the changes from the current version before it writes them, and writes them
on top of that version (a change someone made meanwhile makes it fail with a conflict rather
than be overwritten); ``--dry-run`` stops after the changes. Writes present the token read
from ``--token-file`` (surrounding whitespace stripped).

Exit codes: 0 done, 1 refused (an invalid document, a conflict, a wrong or missing token,
policies unavailable: the server's message is printed), 2 usage, 3 the admin endpoint cannot
be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final, TextIO

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE", "EXIT_USAGE", "add_command", "run"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

_TIMEOUT: Final = 30.0
"""Seconds one request may take: a write waits for the store's atomic commit."""


class _Refused(Exception):
    """The server (or the input) refused the operation; the message says why."""


class _Unreachable(Exception):
    """The admin endpoint could not be reached."""


class _Usage(Exception):
    """The command line cannot be carried out as given."""


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``zkgate policy`` on the ``zkgate`` parser."""
    policy = commands.add_parser(
        "policy",
        help="read, diff, set, list and roll back the governance policies",
        description="Read and change the policies of a running Dispatcher through its admin "
        "endpoint. Exit 0 done, 1 refused (invalid, conflict, token), 3 unreachable.",
    )
    actions = policy.add_subparsers(dest="policy_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, *, writes: bool = False) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--admin",
            default="127.0.0.1:8081",
            metavar="HOST:PORT",
            help="the Dispatcher's admin endpoint (default: %(default)s)",
        )
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
        parser.set_defaults(run=run)
        return parser

    get = action("get", "print the current version and its document")
    get.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    diff = action("diff", "print the changes FILE would make to the current version")
    diff.add_argument("file", type=Path, metavar="FILE")
    put = action("set", "write FILE as the next version (prints the diff first)", writes=True)
    put.add_argument("file", type=Path, metavar="FILE")
    put.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    history = action("history", "list the kept versions, newest first")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    rollback = action("rollback", "write an earlier version's document again", writes=True)
    rollback.add_argument("version", type=int, metavar="VERSION")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one ``zkgate policy`` action; the exit code."""
    try:
        return _ACTIONS[args.policy_action](args, out)
    except _Refused as exc:
        print(f"zkgate policy: refused: {exc}", file=err)
        return EXIT_REFUSED
    except _Unreachable as exc:
        print(f"zkgate policy: cannot reach the admin endpoint at {args.admin}: {exc}", file=err)
        return EXIT_UNREACHABLE
    except _Usage as exc:
        print(f"zkgate policy: error: {exc}", file=err)
        return EXIT_USAGE


# --------------------------------------------------------------------- actions


def _get(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "GET", "/policies")
    if args.json:
        json.dump(answer, out, indent=2, ensure_ascii=False)
        print(file=out)
        return EXIT_OK
    if not answer["version"]:
        print("no policies written yet (version 0)", file=out)
        return EXIT_OK
    print(_revision_line(answer), file=out)
    json.dump(answer["document"], out, indent=2, ensure_ascii=False, sort_keys=True)
    print(file=out)
    return EXIT_OK


def _diff(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "POST", "/policies/diff", _read_document(args.file))
    _print_changes(answer, out)
    return EXIT_OK


def _set(args: argparse.Namespace, out: TextIO) -> int:
    document = _read_document(args.file)
    if not args.dry_run:
        _require_why(args)
    answer = _call(args, "POST", "/policies/diff", document)
    _print_changes(answer, out)
    if args.dry_run:
        print("dry run: nothing written", file=out)
        return EXIT_OK
    expected = answer["base_version"] if args.expected_version is None else args.expected_version
    written = _call(args, "PUT", "/policies", {
        "document": document, "expected_version": expected, "why": args.why, "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    return EXIT_OK


def _history(args: argparse.Namespace, out: TextIO) -> int:
    answer = _call(args, "GET", f"/policies/history?limit={args.limit}")
    if args.json:
        json.dump(answer, out, indent=2, ensure_ascii=False)
        print(file=out)
        return EXIT_OK
    if not answer["versions"]:
        print("no policies written yet (version 0)", file=out)
    for revision in answer["versions"]:
        print(_revision_line(revision), file=out)
    return EXIT_OK


def _rollback(args: argparse.Namespace, out: TextIO) -> int:
    _require_why(args)
    expected = args.expected_version
    if expected is None:
        expected = _call(args, "GET", "/policies")["version"]
    written = _call(args, "POST", "/policies/rollback", {
        "to_version": args.version, "expected_version": expected, "why": args.why,
        "who": _who(args),
    }, write=True)  # fmt: skip
    print(f"written: {_revision_line(written)}", file=out)
    for change in written.get("changes", []):
        print(f"  {change}", file=out)
    return EXIT_OK


_ACTIONS: Final = {
    "get": _get, "diff": _diff, "set": _set, "history": _history, "rollback": _rollback,
}  # fmt: skip


# --------------------------------------------------------------------- helpers


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
        raise _Usage(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(data.decode())
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise _Refused(f"{path}: not valid {kind}: {exc}") from None


def _require_why(args: argparse.Namespace) -> None:
    if not args.why or not args.why.strip():
        raise _Usage("--why TEXT is required for a write (it is kept in the history)")


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
        raise _Usage(f"cannot read --token-file {str(path)!r}: {exc}") from None
    if not token:
        raise _Usage(f"--token-file {str(path)!r} is empty")
    return token


def _call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, *, write: bool = False
) -> Any:
    """``method path`` on the admin endpoint; the JSON answer, or _Refused with the server's
    message, or _Unreachable."""
    headers = {"accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    if write:
        token = _token(args)
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{args.admin}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raise _Refused(f"HTTP {exc.code}: {_message(exc.read())}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise _Unreachable(str(getattr(exc, "reason", exc))) from None
    except ValueError as exc:
        raise _Unreachable(f"not a policy API answer: {exc}") from None


def _message(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return body.decode(errors="replace").strip()
