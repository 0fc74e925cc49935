"""``zkgate mesh get|set|history|rollback|consumers``: mesh onboarding of a running
Dispatcher, through its admin endpoint's mesh API (:mod:`dispatcher.faces.admin.mesh`).

The actions, options and exit codes of :mod:`dispatcher.document_command` (0 done,
1 refused, 2 usage, 3 unreachable) on ``/mesh``, and one more::

    zkgate mesh consumers [--admin HOST:PORT] [--json]

``FILE`` is a mesh document (:mod:`dispatcher.governance.mesh`) in TOML or JSON.
"""

from __future__ import annotations

import argparse
from typing import Final, TextIO

from dispatcher import document_command
from dispatcher.document_command import EXIT_OK, DocumentCommand, call, dump

__all__ = ["COMMAND", "add_command"]

COMMAND: Final = DocumentCommand(
    name="mesh",
    prefix="/mesh",
    help="switch consumers onto the mesh, set ratios, list consumers",
    description="Read and change the mesh settings of a running Dispatcher through its "
    "admin endpoint. Exit 0 done, 1 refused (invalid, conflict, token), 3 unreachable.",
    nothing_yet="no mesh settings written yet (version 0)",
    nothing_means=": every consumer is off",
    with_diff=False,
)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``zkgate mesh`` on the ``zkgate`` parser."""
    action = document_command.add_command(commands, COMMAND)
    consumers = action(
        "consumers", "list the consumers known, their sessions and versions", _consumers
    )
    consumers.add_argument("--json", action="store_true", help="print the API's answer as JSON")


def _consumers(command: DocumentCommand, args: argparse.Namespace, out: TextIO) -> int:
    answer = call(args, "GET", f"{command.prefix}/consumers")
    if args.json:
        return dump(answer, out)
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
