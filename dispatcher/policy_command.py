"""``zkgate policy get|set|diff|history|rollback``: the governance policies of a running
Dispatcher, through its admin endpoint's policy API (:mod:`dispatcher.faces.admin.policies`).

The actions, options and exit codes of :mod:`dispatcher.document_command` (0 done,
1 refused, 2 usage, 3 unreachable) on ``/policies``; ``FILE`` is a policy document
(:mod:`dispatcher.governance.policy`) in TOML (``.toml``) or JSON (anything else).
"""

from __future__ import annotations

import argparse
from typing import Final

from dispatcher import document_command
from dispatcher.document_command import DocumentCommand

__all__ = ["COMMAND", "add_command"]

COMMAND: Final = DocumentCommand(
    name="policy",
    prefix="/policies",
    help="read, diff, set, list and roll back the governance policies",
    description="Read and change the policies of a running Dispatcher through its admin "
    "endpoint. Exit 0 done, 1 refused (invalid, conflict, token), 3 unreachable.",
    nothing_yet="no policies written yet (version 0)",
)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``zkgate policy`` on the ``zkgate`` parser."""
    document_command.add_command(commands, COMMAND)
