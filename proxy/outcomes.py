"""What became of the calls a sidecar carried, reported to the Dispatchers each second.

A sidecar registered for mesh onboarding (``zkgate proxy --register``) carries the *mesh path*
of its host's consumer application (``--application``). Each service's forwarder counts, per
accepted connection (this proxy sees connections, not requests):

* ``success``: spliced to an endpoint and ended without an error;
* ``connect_failure``: no endpoint could be reached (every attempt failed, none appeared in
  time, or the policy's circuit breaking refused it);
* ``reset``: spliced, then ended by an error on either side;
* ``timeout``: no answer within the policy's request timeout;

and its latency: from the accept to the endpoint's connect (and, under a request timeout, to
its first byte back; a timed-out connection counts its whole wait), in the buckets of
:data:`dispatcher.wire.LATENCY_BUCKETS_MS`.

:class:`OutcomeReporter` sends what was counted since the last send as one
:class:`~dispatcher.wire.Outcomes` per service, every ``interval`` seconds, to the Dispatcher
that owns the service, if its Welcome said it takes them; otherwise (no such Dispatcher, or
not connected) the increments are dropped: the Dispatcher judges a sliding window, which
late figures would only blur. Nothing here waits on the data path: counting is a few
integer additions on the trio thread.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Final

import trio

from dispatcher import wire

__all__ = ["DEFAULT_INTERVAL", "OutcomeCounter", "OutcomeReporter"]

DEFAULT_INTERVAL: Final = 1.0
"""Seconds between two reports of a service."""

Send = Callable[[wire.Outcomes], bool]
"""Hands one report to the service's Dispatcher session; False: dropped."""


class OutcomeCounter:
    """One service's outcomes since the last report."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._counts = dict.fromkeys(wire.OUTCOME_KINDS, 0)
        self._latency = [0] * (len(wire.LATENCY_BUCKETS_MS) + 1)
        #: Over the proxy's life (for status and tests).
        self.totals = dict.fromkeys(wire.OUTCOME_KINDS, 0)

    def outcome(self, kind: str) -> None:
        """Count one connection that ended as ``kind`` (one of OUTCOME_KINDS)."""
        self._counts[kind] += 1
        self.totals[kind] += 1

    def latency(self, seconds: float) -> None:
        """Count one latency measurement."""
        self._latency[bisect.bisect_left(wire.LATENCY_BUCKETS_MS, seconds * 1000.0)] += 1

    def take(self, application: str, path: str) -> wire.Outcomes | None:
        """The report of what was counted since the last one (then reset); None: nothing."""
        if not any(self._counts.values()) and not any(self._latency):
            return None
        counts = {kind: count for kind, count in self._counts.items() if count}
        report = wire.Outcomes(self.service, application, path, counts, tuple(self._latency))
        self._counts = dict.fromkeys(wire.OUTCOME_KINDS, 0)
        self._latency = [0] * len(self._latency)
        return report


class OutcomeReporter:
    """Sends each service's :class:`OutcomeCounter` increments every ``interval`` seconds."""

    def __init__(
        self,
        counters: Mapping[str, OutcomeCounter],
        send: Callable[[str, wire.Outcomes], bool],
        *,
        application: str,
        path: str = "mesh",
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if path not in wire.OUTCOME_PATHS:
            raise ValueError(f"path must be one of {', '.join(wire.OUTCOME_PATHS)}")
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        self.counters = dict(counters)
        self.send = send
        self.application = application
        self.path = path
        self.interval = interval
        #: Reports handed to a Dispatcher, and dropped (none there to take them).
        self.sent = 0
        self.dropped = 0

    def flush(self) -> None:
        """Send what every service counted since the last flush."""
        for service, counter in self.counters.items():
            report = counter.take(self.application, self.path)
            if report is None:
                continue
            if self.send(service, report):
                self.sent += 1
            else:
                self.dropped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            self.flush()
