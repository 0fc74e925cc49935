"""Unexpected exceptions end one connection, never the process.

Every listener (the ZooKeeper face, the subscription server, the admin
endpoint, the Meta Server, the proxy's control links) handles each peer in a
task of its own nursery; an exception that leaves such a task would cancel
the nursery and with it the whole process. Each listener therefore catches
what its own error handling did not foresee around the work for one peer,
hands it to its :class:`InternalErrors`, answers the peer with an error where
the protocol has one, and closes that connection only.
"""

from __future__ import annotations

import logging

__all__ = ["InternalErrors"]

log = logging.getLogger(__name__)


class InternalErrors:
    """The unexpected exceptions one listener contained, counted for ``/metrics``.

    ``listener`` is the label of ``zkgate_internal_errors_total``.
    """

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.count = 0

    def record(self, exc: BaseException, **fields: object) -> None:
        """Count ``exc`` and log it with its traceback (the repeat limit of the
        log applies, so a peer that triggers it in a loop cannot flood the log)."""
        self.count += 1
        log.error(
            "internal error; closing the connection",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"listener": self.listener, **fields},
        )

    def __repr__(self) -> str:
        return f"<InternalErrors {self.listener}: {self.count}>"
