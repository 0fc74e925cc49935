"""The mesh's automatic rollback: outcomes proxies report, judged per consumer, over a window.

Sidecar proxies report what became of the calls they carried (:class:`dispatcher.wire.Outcomes`:
per service and consumer application, counts of successes, connect failures, resets and
timeouts, and a latency histogram), as increments, every second or so. A Dispatcher with
``[mesh] rollback`` (:class:`~dispatcher.faces.mesh.config.RollbackConfig`) keeps them in an
:class:`OutcomeWindow` (per application, service and path, one bucket per second for the
last ``window`` seconds) and, at each mesh report, :func:`judge` says whether that pair's
mesh path misbehaves: its failure ratio or p99 above the absolute thresholds, or above
``relative_to_direct`` times the same pair's direct path where that is known.

When it does, :class:`MeshRollback` writes the mesh document (kind ``mesh`` of the governance
store) with that pair ``{"mode": "off", "locked": true, "reason": ...}``, the same reason and
figures as the revision's ``why``. The pairs judged while a write is under way go together
in the next one (a sidecar's failure trips every consumer application it carries at once;
one revision per pair would queue them behind each other's round trips to the store). The
write names the version it read (``expected_version``) and, on a
:class:`~dispatcher.governance.store.Conflict`, reads again and re-applies the change to the
newer document; a pair found already off is left alone, so two Dispatchers that judge at
once write one rollback. The views follow the mesh feed, so the consumer's sessions go
direct at their next read.

No flapping: the rule only ever turns pairs off, it ignores the mesh reports of a pair that
is not on (they are what is left of the traffic before the rollback), and a locked pair
stays off until an operator writes it on again. Nothing in the data path waits for any of
this: :meth:`MeshRollback.record` only adds to counters and, at worst, queues the pair for
the writer task (a bounded set).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
import trio

from dispatcher import wire
from dispatcher.backoff import Backoff
from dispatcher.faces.mesh.config import RollbackConfig
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshError, MeshSettings, Switch
from dispatcher.governance.store import MAX_WHY, Conflict, GovernanceError, Revision

__all__ = ["Figures", "MeshRollback", "OutcomeWindow", "judge"]

log = logging.getLogger(__name__)

MAX_SERIES: Final = 10_000
"""(application, service, path) series kept at once; reports for more are dropped (counted)."""
MAX_PENDING: Final = 1024
"""Pairs waiting for their rollback to be written; a full queue drops the newest (counted)."""
MAX_ATTEMPTS: Final = 10
"""Writes tried for one rollback (conflicts and an unreachable store) before it is given up
(it is judged again at the pair's next mesh report)."""
RELATIVE_P99_FLOOR_MS: Final = 10.0
"""A mesh p99 is compared with the direct one only when it is this much above it: latencies
closer than that are within the latency buckets' resolution."""

_FAILURES: Final = tuple(kind for kind in wire.OUTCOME_KINDS if kind != "success")
_BUCKETS: Final = len(wire.LATENCY_BUCKETS_MS) + 1


@attrs.frozen
class Figures:
    """One path's outcomes over the window."""

    counts: Mapping[str, int]
    #: The latency bucket's upper bound (ms) holding the 99th percentile; None: no latency
    #: measured; ``inf``: above the last bucket.
    p99_ms: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failures(self) -> int:
        return sum(self.counts.get(kind, 0) for kind in _FAILURES)

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.total if self.total else 0.0

    def __str__(self) -> str:
        parts = [f"{self.total} calls"]
        parts += [f"{self.counts[kind]} {kind}" for kind in wire.OUTCOME_KINDS
                  if self.counts.get(kind)]  # fmt: skip
        parts.append(f"failure ratio {self.failure_ratio:.2f}")
        if self.p99_ms is not None:
            shown = ">60000" if math.isinf(self.p99_ms) else f"<={self.p99_ms:g}"
            parts.append(f"p99 {shown} ms")
        return ", ".join(parts)


def p99(latency: Sequence[int]) -> float | None:
    """The upper bound (ms) of the bucket holding the 99th percentile of ``latency``."""
    total = sum(latency)
    if total == 0:
        return None
    rank = math.ceil(0.99 * total)
    seen = 0
    for index, count in enumerate(latency):
        seen += count
        if seen >= rank:
            return (
                wire.LATENCY_BUCKETS_MS[index]
                if index < len(wire.LATENCY_BUCKETS_MS)
                else (math.inf)
            )
    return math.inf  # not reached: the ranks add up to the total


@attrs.define
class _Bucket:
    second: int
    counts: list[int] = attrs.Factory(lambda: [0] * len(wire.OUTCOME_KINDS))
    latency: list[int] = attrs.Factory(lambda: [0] * _BUCKETS)


class OutcomeWindow:
    """Outcomes per (application, service, path) over the last ``window`` seconds.

    One bucket per whole second of trio's clock; an outcome added at time ``t`` counts while
    ``floor(now) - floor(t) < window``. Bounded: at most :data:`MAX_SERIES` series of at most
    ``ceil(window)`` buckets.
    """

    def __init__(self, window: float, *, max_series: int = MAX_SERIES) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 second, not {window!r}")
        self.seconds = math.ceil(window)
        self.max_series = max_series
        self._series: dict[tuple[str, str, str], collections.deque[_Bucket]] = {}
        #: Reports dropped because :data:`MAX_SERIES` series were kept already.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._series)

    def add(self, application: str, service: str, path: str, counts: Mapping[str, int],
            latency: Sequence[int], now: float) -> None:  # fmt: skip
        """Add one report's increments at ``now``."""
        key = (application, service, path)
        series = self._series.get(key)
        if series is None:
            self._expire_all(now)
            if len(self._series) >= self.max_series:
                self.dropped += 1
                return
            series = self._series[key] = collections.deque()
        second = math.floor(now)
        self._expire(series, second)
        if not series or series[-1].second != second:
            series.append(_Bucket(second))
        bucket = series[-1]
        for index, kind in enumerate(wire.OUTCOME_KINDS):
            bucket.counts[index] += counts.get(kind, 0)
        for index, count in enumerate(latency[:_BUCKETS]):
            bucket.latency[index] += count

    def figures(self, application: str, service: str, path: str, now: float) -> Figures:
        """The path's outcomes over the window ending at ``now``."""
        counts = [0] * len(wire.OUTCOME_KINDS)
        latency = [0] * _BUCKETS
        series = self._series.get((application, service, path))
        if series is not None:
            self._expire(series, math.floor(now))
            for bucket in series:
                counts = [a + b for a, b in zip(counts, bucket.counts, strict=True)]
                latency = [a + b for a, b in zip(latency, bucket.latency, strict=True)]
        return Figures(dict(zip(wire.OUTCOME_KINDS, counts, strict=True)), p99(latency))

    def forget(self, application: str, service: str, path: str | None = None) -> None:
        """Drop what is kept of the pair (one path, or both)."""
        for one in wire.OUTCOME_PATHS if path is None else (path,):
            self._series.pop((application, service, one), None)

    def _expire(self, series: collections.deque[_Bucket], second: int) -> None:
        while series and second - series[0].second >= self.seconds:
            series.popleft()

    def _expire_all(self, now: float) -> None:
        second = math.floor(now)
        for key in [k for k, s in self._series.items() if not s or second - s[-1].second
                    >= self.seconds]:  # fmt: skip
            del self._series[key]


def judge(config: RollbackConfig, mesh: Figures, direct: Figures | None) -> str | None:
    """Why the mesh path of a pair must be rolled back (the rule and its figures), or None.

    See :class:`~dispatcher.faces.mesh.config.RollbackConfig` for the rule; ``direct`` is
    the same pair's direct path (None or too few outcomes: unknown).
    """
    if mesh.total < config.min_requests:
        return None
    known = direct is not None and direct.total >= config.min_requests
    tripped = None
    if mesh.failure_ratio > config.max_failure_ratio:
        tripped = f"mesh failure ratio {mesh.failure_ratio:.2f} > {config.max_failure_ratio:g}"
    elif mesh.p99_ms is not None and mesh.p99_ms > config.max_p99_ms:
        tripped = f"mesh p99 {_ms(mesh.p99_ms)} > {config.max_p99_ms:g} ms"
    elif config.relative_to_direct is not None and known:
        assert direct is not None
        relative = config.relative_to_direct
        floor = max(direct.failures, 1) / direct.total
        if mesh.failure_ratio > relative * floor:
            tripped = (f"mesh failure ratio {mesh.failure_ratio:.2f} > {relative:g} x the "
                       f"direct path's {direct.failure_ratio:.2f}")  # fmt: skip
        elif (
            mesh.p99_ms is not None
            and direct.p99_ms is not None
            and mesh.p99_ms > relative * direct.p99_ms
            and mesh.p99_ms - direct.p99_ms >= RELATIVE_P99_FLOOR_MS
        ):
            tripped = (f"mesh p99 {_ms(mesh.p99_ms)} > {relative:g} x the direct path's "
                       f"{_ms(direct.p99_ms)}")  # fmt: skip
    if tripped is None:
        return None
    shown = str(direct) if known and direct is not None else "unknown"
    return (f"automatic rollback: {tripped} over the last {config.window:g} s "
            f"(mesh: {mesh}; direct: {shown})")  # fmt: skip


def _ms(value: float) -> str:
    return ">60000 ms" if math.isinf(value) else f"{value:g} ms"


class MeshRollback:
    """The rule of one Dispatcher: fed by :meth:`record`, writing from :meth:`run`."""

    def __init__(self, config: RollbackConfig, *, who: str) -> None:
        self.config = config
        self.who = who
        self.window = OutcomeWindow(config.window)
        self.feed: GovernanceFeed | None = None
        self._settings: tuple[int, MeshSettings] = (0, MeshSettings())
        self._pending: dict[tuple[str, str], str] = {}
        self._wake = trio.Event()
        #: Rollbacks this Dispatcher wrote, and the last one's revision.
        self.rolled_back = 0
        self.last: Revision | None = None
        #: Reports that named no application (nothing to switch off), and rollbacks dropped
        #: because :data:`MAX_PENDING` were waiting.
        self.unattributed = 0
        self.dropped = 0

    def settings(self) -> MeshSettings:
        """The mesh document the feed holds (the last one that parsed)."""
        feed = self.feed
        if feed is None or feed.current is None:
            return self._settings[1]
        if feed.current.version != self._settings[0]:
            try:
                settings = MeshSettings.from_json(feed.current.body)
            except MeshError:
                settings = self._settings[1]  # the views log it; the last good one stays
            self._settings = (feed.current.version, settings)
        return self._settings[1]

    def record(self, outcomes: wire.Outcomes, application: str) -> None:
        """Take one report (the subscription server's ``on_outcomes``); never blocks."""
        if not application:
            self.unattributed += 1
            return
        service = outcomes.service
        if outcomes.path == "mesh":
            switch = self.settings().switch(application, service)
            if switch is None or switch.mode != "on":
                # The tail of traffic from before a rollback (or a pair nobody switched
                # on): judging it could only lock again what is off already.
                self.window.forget(application, service, "mesh")
                return
        now = trio.current_time()
        self.window.add(application, service, outcomes.path, outcomes.counts,
                        outcomes.latency, now)  # fmt: skip
        if outcomes.path == "mesh":
            self._consider(application, service, now)

    def _consider(self, application: str, service: str, now: float) -> None:
        pair = (application, service)
        if pair in self._pending:
            return
        mesh = self.window.figures(application, service, "mesh", now)
        direct = self.window.figures(application, service, "direct", now)
        reason = judge(self.config, mesh, direct)
        if reason is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        log.warning("mesh path misbehaves; rolling the consumer back",
                    extra={"application": application, "service": service,
                           "reason": reason})  # fmt: skip
        self._pending[pair] = reason
        self._wake.set()

    async def run(
        self, feed: GovernanceFeed, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the rollbacks :meth:`record` decides, until cancelled."""
        self.feed = feed
        task_status.started()
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            # Every pair judged meanwhile goes in one revision: an anomaly of one sidecar
            # trips each consumer application it carries at once, and one write per pair
            # would queue them behind each other's store round trips.
            batch = dict(self._pending)
            try:
                await self.roll_back_all(batch)
            finally:
                for pair in batch:
                    self._pending.pop(pair, None)

    async def roll_back(self, application: str, service: str, reason: str) -> Revision | None:
        """Write the pair off and locked with ``reason``; None if it was not on any more
        (or the store could not take it within :data:`MAX_ATTEMPTS`)."""
        return await self.roll_back_all({(application, service): reason})

    async def roll_back_all(self, reasons: Mapping[tuple[str, str], str]) -> Revision | None:
        """Write each (application, service) pair of ``reasons`` off and locked with its
        reason, in one revision; the pairs no longer on are left alone. None if none was on
        any more (or the store could not take it within :data:`MAX_ATTEMPTS`)."""
        feed = self.feed
        if feed is None or not reasons:
            return None
        store = feed.store
        backoff = Backoff(initial=0.1, maximum=2.0)
        shown = {"pairs": len(reasons), "first": "/".join(next(iter(reasons)))}
        for _ in range(MAX_ATTEMPTS):
            try:
                head = await store.current()
                settings = MeshSettings() if head is None else MeshSettings.from_json(head.body)
                written = {}
                for (application, service), reason in reasons.items():
                    switch = settings.switch(application, service)
                    if switch is None or switch.mode != "on":
                        continue  # turned off meanwhile (an operator, another Dispatcher)
                    settings = settings.with_switch(application, service,
                                                    Switch("off", 0, True, reason))  # fmt: skip
                    written[(application, service)] = reason
                if not written:
                    return None
                revision = await store.write(
                    settings.to_json(), expected_version=0 if head is None else head.version,
                    who=self.who, why=_why(written),
                )  # fmt: skip
            except Conflict:
                continue  # someone wrote in between: apply the change to the newer document
            except MeshError as exc:
                log.error("the mesh document does not parse; cannot roll back",
                          extra={**shown, "error": str(exc)[:500]})  # fmt: skip
                return None
            except GovernanceError as exc:
                log.warning("cannot write a rollback yet; retrying",
                            extra={**shown, "error": str(exc)})  # fmt: skip
                await backoff.sleep()
                continue
            self.rolled_back += len(written)
            self.last = revision
            for (application, service), reason in written.items():
                self.window.forget(application, service)
                log.warning("consumer rolled back to the direct path",
                            extra={"application": application, "service": service,
                                   "version": revision.version, "reason": reason})  # fmt: skip
            return revision
        log.error("gave up writing a rollback; it is judged again at the next report",
                  extra=shown)  # fmt: skip
        return None


def _why(written: Mapping[tuple[str, str], str]) -> str:
    """The revision's ``why``: the one pair's reason, or each pair's, within
    :data:`~dispatcher.governance.store.MAX_WHY` characters."""
    if len(written) == 1:
        return next(iter(written.values()))[:MAX_WHY]
    prefix = "automatic rollback: "
    head = f"automatic rollback of {len(written)} consumers: "
    why = head + "; ".join(f"{application} {service}: {reason.removeprefix(prefix)}"
                           for (application, service), reason in written.items())  # fmt: skip
    return why if len(why) <= MAX_WHY else why[: MAX_WHY - 3] + "..."
