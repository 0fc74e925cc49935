"""Central health checking: each instance probed once per interval, by its service's owner.

When every proxy probes every instance, probes grow with proxies times instances.
Here the Dispatcher that owns a service (see :mod:`dispatcher.core.ownership`)
probes each of its instances once per interval and puts the verdict into its
snapshot (:meth:`FanIn.set_probe_health <dispatcher.core.fanin.FanIn.set_probe_health>`),
so every subscriber learns it from the deltas it already receives: probes
per interval equal the number of instances, whatever the number of proxies.

Schedule. Time is cut into wall-clock slots: instance ``i`` of service ``s``
is probed in slot ``k`` at ``phase(s, i) + k * interval + jitter(s, i, k)``,
where the phase (in ``[0, interval)``) and the jitter (in
``[0, jitter * interval)``) come from a stable hash (BLAKE2b, not Python's
per-process ``hash``) of the service, the instance id and, for the jitter,
``k``. Phases spread the probes evenly over the interval, so a big fleet is
probed at a steady rate instead of in bursts; the jitter keeps a probe from
always landing at the same instant of an instance's own periodic work. Every
Dispatcher computes the same slot times without talking to the others, and
the slot is probed by whoever is the service's *prober* (below) when the
slot comes, asked at that moment. That is the whole hand-over protocol: a
new owner needs no record of when the old one last probed, because the
previous slot's time is a function of the instance, so an instance is
probed exactly once per slot across all Dispatchers, also across a change
of ownership. To that end every instance of the snapshot is scheduled,
owned or not; slots of services probed elsewhere cost a heap operation and
one ownership question. (Exactness assumes the Dispatchers agree on the
prober when they fire the slot, which is up to :data:`TICK` after its time,
later on a CPU-starved host; a change of prober within that window of a
slot, or a membership change that reaches the Dispatchers at different
moments, can make that one slot probed by both or by neither.)

The prober is the Dispatcher that owns the service (:meth:`Ownership.owns`),
unless the ownership object also has a ``probes(service) -> bool`` method,
which then decides. An ownership whose hand-over lets two Dispatchers serve
a service for a while (the old owner until the new one has loaded it, as
:mod:`dispatcher.sharding.ownership` does) needs it: two servers, but one prober, the
one the assignment names. A Dispatcher that serves a service without being
its prober keeps its last verdicts on it (its subscribers still read them)
and acts on reports (see below); one that stops serving it drops them.

State machine, per instance, on the owner::

    unknown --first result--> passing | failing
    passing --fall failures in a row--> failing
    failing --rise passes in a row--> passing

From ``unknown`` the first result decides: unknown means "no information",
and one refused connection is information. It matters most at a hand-over,
where the new owner starts from unknown and would otherwise route to a dead
endpoint for ``fall`` more intervals. The verdict (passing or failing) is the
checker's *probe health*; the fan-in combines it with the registry's own
health by :func:`dispatcher.core.fanin.combine_health` (source failing wins,
else the probe result, else the source's health). A Dispatcher that stops
owning a service withdraws its verdicts on that service's instances (its
snapshot falls back to the source's health, as on any non-owner), and so
does a checker that stops running.

Detection bound. An endpoint that stops accepting at time ``c`` is failing
after ``fall`` failed probes, the last of which is due before
``c + fall * interval + jitter * interval``, starts at most :data:`TICK`
later (more if the process is short of CPU: ``metrics.lag_max``) and takes
at most ``timeout``; the snapshot changes at most :data:`FLUSH_DELAY` after
that. A refused connect takes microseconds, so for the usual failure (a
process died, its port refuses) the bound is within ``fall * interval +
timeout`` as long as ``jitter * interval`` is below ``timeout``, as it is
with the defaults (0.5 s against 1 s).

Anomaly-driven re-check. :meth:`HealthChecker.on_report` (a proxy's
:class:`~dispatcher.wire.Report` that an endpoint failed) probes that
instance at once, outside its slots. Reports for an instance are merged
into its probe in flight or its re-check already planned. Report-triggered
probes of one instance are at least ``recheck`` seconds apart (a report
earlier than that plans one re-check at the end of the gap), so a proxy
cannot turn reports into a probe flood. While a report-triggered probe
fails and the instance is not failing yet, it is re-probed every
``recheck`` seconds until it fails ``fall`` times or passes: a reported
failure is confirmed in about ``fall * recheck`` instead of
``fall * interval``. Reports without an authenticated client id are
refused; reports for services this Dispatcher does not own, or instances it
does not know, are ignored.

Probes. ``tcp``: a TCP connect, closed at once with a reset (SO_LINGER 0, as
HAProxy's checks do) so that thousands of probes a second leave no
TIME_WAIT sockets behind; a connect that reached its own socket (possible
for a free port of this very host) fails. ``http``: ``GET path HTTP/1.1`` with
``Connection: close``; a status 2xx or 3xx passes. Only the status line is
read, by hand: a probe needs nothing of HTTP beyond it, which is why no
HTTP library is used. ``none``: the service is not probed. A probe that
does not finish in ``timeout`` fails. At most ``concurrency`` probes are in
flight (a :class:`trio.CapacityLimiter`), so a slow fleet queues probes
instead of exhausting sockets; an instance whose previous probe is still
queued or in flight when its next slot comes skips that slot (counted), so
the queue never holds more than one probe per instance.

Metrics are plain attributes of :attr:`HealthChecker.metrics`.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import heapq
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

import attrs
import trio

from dispatcher.core.fanin import FanIn, endpoint_id
from dispatcher.core.health_config import HealthConfig, ServiceProbe
from dispatcher.core.model import Health
from dispatcher.core.ownership import Ownership
from dispatcher.core.snapshot import ServiceEntry

__all__ = [
    "FLUSH_DELAY",
    "TICK",
    "HealthChecker",
    "HealthMetrics",
    "InstanceState",
    "first_slot",
    "http_probe",
    "phase",
    "slot_time",
    "tcp_probe",
]

log = logging.getLogger(__name__)

FLUSH_DELAY: Final = 0.01
"""Seconds verdicts are gathered before they go into the snapshot as one version.

A mass failure (a rack going dark) changes thousands of verdicts within a
second; one snapshot version each would copy a big service's instance map
thousands of times. Ten milliseconds caps that at 100 versions a second and
is noise next to any interval."""

_POLL: Final = 0.1
"""Seconds between looks at the snapshot and the ownership epoch while idle."""

TICK: Final = 0.01
"""Slots are fired in batches of this many seconds (they fire up to this late).

At 2,000 probes a second, waking once per slot costs a scheduler pass (an
``epoll_wait``, a cancel scope, a task switch) per probe, which was most of
the checker's CPU; probes started together also share their passes
through the I/O loop. Ten milliseconds is noise next to the jitter."""

_DETECTION_BOUNDS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))

_MAX_STATUS_LINE: Final = 4096

_LINGER_RESET: Final = struct.pack("ii", 1, 0)


# ----------------------------------------------------------------- schedule


def _unit(*parts: object) -> float:
    """A stable number in [0, 1) from ``parts``, the same in every process."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def phase(service: str, instance_id: str, interval: float) -> float:
    """The instance's offset in ``[0, interval)`` within every interval."""
    return _unit(service, instance_id) * interval


def _slot_time(
    service: str, instance_id: str, offset: float, k: int, interval: float, jitter: float
) -> float:
    # slot_time with the phase already computed (it is fixed per instance).
    if jitter:
        return offset + k * interval + _unit(service, instance_id, k) * jitter * interval
    return offset + k * interval


def slot_time(service: str, instance_id: str, k: int, interval: float, jitter: float) -> float:
    """Wall-clock time (``time.time()`` scale) of the instance's probe in slot ``k``.

    Slot ``k`` lies in ``[k * interval, (k + 1 + jitter) * interval)``: the
    phase plus a jitter of up to ``jitter * interval`` derived from ``k``.
    """
    offset = phase(service, instance_id, interval)
    return _slot_time(service, instance_id, offset, k, interval, jitter)


def first_slot(service: str, instance_id: str, after: float, interval: float, jitter: float) -> int:
    """The first slot of the instance whose time is at or after ``after``."""
    offset = phase(service, instance_id, interval)
    # Slot k (below) starts no later than ``after``; jitter may push it, or
    # at most the next one, behind ``after``.
    k = int((after - offset) // interval)
    while _slot_time(service, instance_id, offset, k, interval, jitter) < after:
        k += 1
    return k


# ----------------------------------------------------------------- probes


def _literal_family(host: str) -> int | None:
    """The address family of an IP literal; None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def _connect(host: str, port: int) -> trio.socket.SocketType | trio.SocketStream:
    """A connected socket to an IP literal, or a stream to a name.

    Registries hold addresses, and a plain ``connect`` to one costs a third
    of :func:`trio.open_tcp_stream`, whose name resolution and happy eyeballs
    (a nursery per call) are only needed for names; at thousands of probes a
    second that difference is most of the checker's CPU.
    """
    family = _literal_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_probe(host: str, port: int) -> str | None:
    """Connect and reset. None when the connection was accepted, else why not."""
    try:
        connection = await _connect(host, port)
    except OSError as exc:
        return f"connect: {exc}"
    sock = connection.socket if isinstance(connection, trio.SocketStream) else connection
    try:
        # A connect to a free port of this very host can pick that same port
        # as its own source and connect to itself (TCP simultaneous open):
        # a "pass" with nothing listening.
        if sock.getsockname() == sock.getpeername():
            return "connect: connected to itself (nothing listens)"
    except OSError as exc:
        return f"connect: {exc}"  # reset between the connect and now
    finally:
        # Should the option fail, a plain close still frees the socket.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if isinstance(connection, trio.SocketStream):
            await connection.aclose()
        else:
            connection.close()
    return None


async def http_probe(host: str, port: int, path: str) -> str | None:
    """``GET path``; None for a 2xx or 3xx status, else why the probe failed."""
    try:
        connection = await _connect(host, port)
    except OSError as exc:
        return f"connect: {exc}"
    stream = connection
    if not isinstance(stream, trio.SocketStream):
        stream = trio.SocketStream(stream)
    async with stream:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {endpoint_id(host, port)}\r\n"
            "User-Agent: zkgate-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        try:
            await stream.send_all(request.encode("ascii", "replace"))
            received = b""
            while b"\r\n" not in received:
                data = await stream.receive_some(1024)
                if not data:
                    return "http: connection closed before the status line"
                received += data
                if len(received) > _MAX_STATUS_LINE:
                    return "http: status line too long"
        except (OSError, trio.BrokenResourceError) as exc:
            return f"http: {exc}"
        line = received.split(b"\r\n", 1)[0]
        parts = line.split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            return f"http: not a status line: {line[:80]!r}"
        status = int(parts[1])
        if 200 <= status < 400:
            return None
        return f"http: status {status}"


# ----------------------------------------------------------------- state


class _Kind(enum.Enum):
    SLOT = "slot"
    REPORT = "report"
    RECHECK = "recheck"


class _Target:
    """The checker's bookkeeping for one instance (not shared outside)."""

    __slots__ = (
        "fails",
        "health",
        "host",
        "in_flight",
        "instance_id",
        "last_pass",
        "last_probe",
        "last_report_probe",
        "passes",
        "path",
        "phase",
        "port",
        "probe",
        "probes",
        "recheck_at",
        "removed",
        "service",
        "slot",
    )

    def __init__(
        self, service: str, instance_id: str, host: str, port: int, spec: ServiceProbe,
        phase: float,
    ) -> None:  # fmt: skip
        self.service = service
        self.instance_id = instance_id
        self.host = host
        self.port = port
        self.probe = spec.probe
        self.path = spec.path
        self.phase = phase
        self.health = Health.UNKNOWN
        self.passes = 0
        self.fails = 0
        self.in_flight = False
        self.removed = False
        #: The next slot index this checker will fire for the instance.
        self.slot = 0
        self.probes = 0
        self.last_probe: float | None = None
        self.last_pass: float | None = None
        self.last_report_probe: float | None = None
        self.recheck_at: float | None = None


@attrs.frozen
class InstanceState:
    """What the checker knows about one instance, for operators and tests.

    ``health`` is the checker's own verdict (``unknown`` until the first
    result on this owner); ``passes``/``fails`` the current run of equal
    results; ``probes`` how many probes this checker started; times are
    wall-clock (``time.time()``); ``next_slot`` is the time of the next slot
    this checker will fire (it probes only if it is the service's prober then).
    """

    health: Health
    passes: int
    fails: int
    probes: int
    in_flight: bool
    last_probe: float | None
    next_slot: float


@attrs.define
class HealthMetrics:
    """Counters (monotonic) and gauges of one checker, for metrics and tests."""

    #: Probes started, of every kind.
    probes: int = 0
    #: Probes started for a slot.
    probes_scheduled: int = 0
    #: Probes started because of a report, or a re-check after one.
    probes_reported: int = 0
    #: Probe results that failed / passed.
    failures: int = 0
    passes: int = 0
    #: Verdict changes to failing / to passing.
    to_failing: int = 0
    to_passing: int = 0
    #: Slots of services owned elsewhere (nothing done).
    skipped_not_owned: int = 0
    #: Slots skipped because the instance's previous probe had not finished.
    skipped_in_flight: int = 0
    #: Reports accepted, merged into a probe in flight or planned, refused
    #: (no authenticated client), ignored (not owned, unknown instance).
    reports: int = 0
    reports_merged: int = 0
    reports_refused: int = 0
    reports_ignored: int = 0
    #: Slot probes in the last complete cycle (one interval of slot indexes),
    #: and that cycle's index; -1 until one completed.
    probes_per_cycle: int = 0
    cycle: int = -1
    #: Gauges: probes in flight or waiting for the limiter; instances tracked.
    in_flight: int = 0
    tracked: int = 0
    #: The latest any slot fired after its time, in seconds (TICK is normal;
    #: more means the process is short of CPU). Reset it to watch a period.
    lag_max: float = 0.0
    #: Time to detect, per change to failing: from the last passing result to
    #: the failing verdict, an upper bound of the time from the endpoint's
    #: failure. Count, sum, max, counts per upper bound (seconds, the last
    #: infinite), and the most recent values.
    detection_count: int = 0
    detection_sum: float = 0.0
    detection_max: float = 0.0
    detection_buckets: dict[float, int] = attrs.field(
        factory=lambda: dict.fromkeys(_DETECTION_BOUNDS, 0)
    )
    recent_detections: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=1024)
    )

    def observe_detection(self, seconds: float) -> None:
        self.detection_count += 1
        self.detection_sum += seconds
        self.detection_max = max(self.detection_max, seconds)
        for bound in _DETECTION_BOUNDS:
            if seconds <= bound:
                self.detection_buckets[bound] += 1
                break
        self.recent_detections.append(seconds)


class _AllMine:
    """Ownership without shards: this Dispatcher owns every service."""

    epoch = 0

    def owns(self, service: str) -> bool:
        return True

    def owner_of(self, service: str) -> None:
        return None


# ----------------------------------------------------------------- checker


class HealthChecker:
    """Probes the instances of the services this Dispatcher owns; see the module docstring.

    ``fanin`` supplies the snapshot to probe and receives the verdicts;
    ``ownership`` says which services are ours (None: all of them, a single
    Dispatcher); ``config`` is the ``[health]`` table (``enabled`` is the
    gateway's business and ignored here). ``clock`` is the wall clock the
    slots are computed on; every Dispatcher must use the same one.

    :meth:`run` probes until cancelled. :meth:`on_report` is the callback
    for proxies' failure reports. Everything runs on the trio thread.
    """

    def __init__(
        self,
        fanin: FanIn,
        ownership: Ownership | None,
        config: HealthConfig,
        *,
        clock: Callable[[], float] = time.time,
        flush_delay: float = FLUSH_DELAY,
    ) -> None:
        self.fanin = fanin
        self.ownership: Ownership = ownership if ownership is not None else _AllMine()
        probes = getattr(self.ownership, "probes", None)
        self._probes: Callable[[str], bool] = probes if callable(probes) else self.ownership.owns
        self.config = config
        self.metrics = HealthMetrics()
        self._clock = clock
        self._flush_delay = flush_delay
        self._interval = config.interval
        self._jitter = config.jitter
        self._specs = {spec.name: spec for spec in config.services}
        self._default = ServiceProbe("*", config.probe, config.path)
        self._limiter = trio.CapacityLimiter(config.concurrency)
        self._targets: dict[tuple[str, str], _Target] = {}
        self._by_service: dict[str, dict[str, _Target]] = {}
        # service -> the entry last scanned: unchanged entries are skipped.
        self._entries: dict[str, ServiceEntry] = {}
        self._version = -1
        self._refreshed = float("-inf")
        self._epoch: int | None = None
        self._heap: list[tuple[float, int, _Target, int]] = []
        self._seq = itertools.count()
        self._cycles: dict[int, int] = {}
        self._pending: dict[tuple[str, str], Health | None] = {}
        self._wakeup = trio.Event()
        self._flush_wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._ran = False

    # ------------------------------------------------------------- reading

    def state(self, service: str, instance_id: str) -> InstanceState | None:
        """The checker's view of one instance of the snapshot (None: not tracked)."""
        target = self._targets.get((service, instance_id))
        if target is None:
            return None
        return InstanceState(
            target.health,
            target.passes,
            target.fails,
            target.probes,
            target.in_flight,
            target.last_probe,
            self.slot_time(service, instance_id, target.slot),
        )

    def slot_time(self, service: str, instance_id: str, k: int) -> float:
        """Wall-clock time of the instance's slot ``k`` under this configuration."""
        return slot_time(service, instance_id, k, self._interval, self._jitter)

    def _due(self, target: _Target, k: int) -> float:
        return _slot_time(
            target.service, target.instance_id, target.phase, k, self._interval, self._jitter
        )

    def probe_for(self, service: str) -> ServiceProbe:
        """How the instances of ``service`` are probed."""
        return self._specs.get(service, self._default)

    # ------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe until cancelled; may be called once. Withdraws every verdict on exit."""
        if self._ran:
            raise RuntimeError("HealthChecker.run may be called once")
        self._ran = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flusher)
                task_status.started()
                await self._schedule()
        finally:
            self._nursery = None
            # Verdicts nobody keeps up to date any more must not stay.
            self._pending.clear()
            self.fanin.set_probe_health(
                (t.service, t.instance_id, None)
                for t in self._targets.values()
                if t.health is not Health.UNKNOWN
            )

    async def _schedule(self) -> None:
        heap = self._heap
        while True:
            now = self._clock()
            self._refresh(now)
            while heap and heap[0][0] <= now:
                due, _, target, slot = heapq.heappop(heap)
                if not target.removed:
                    self._fire(target, due, slot, now)
            delay = _POLL if not heap else min(_POLL, heap[0][0] - self._clock())
            with trio.move_on_after(max(delay, TICK)):
                await self._wakeup.wait()
            if self._wakeup.is_set():
                self._wakeup = trio.Event()

    def _push(self, due: float, target: _Target, slot: int) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), target, slot))

    def _fire(self, target: _Target, due: float, slot: int, now: float) -> None:
        if slot < 0:  # a planned re-check
            if target.recheck_at != due:
                return
            target.recheck_at = None
            if not self.ownership.owns(target.service):
                return  # re-checks follow reports, which whoever serves acts on
            if target.in_flight:
                # One probe per instance at a time: re-check after this one.
                self._plan_recheck(target, now + self.config.recheck)
                return
            self._start(target, _Kind.RECHECK, now)
            return
        if slot != target.slot:
            return  # superseded
        if now - due > self.metrics.lag_max:
            self.metrics.lag_max = now - due
        target.slot = slot + 1
        self._push(self._due(target, slot + 1), target, slot + 1)
        if not self._probes(target.service):
            self.metrics.skipped_not_owned += 1
            if target.health is not Health.UNKNOWN and not self.ownership.owns(target.service):
                self._forget(target)
            return
        if target.in_flight:
            self.metrics.skipped_in_flight += 1
            return
        self._count_cycle(slot)
        self._start(target, _Kind.SLOT, now)

    def _count_cycle(self, cycle: int) -> None:
        cycles = self._cycles
        cycles[cycle] = cycles.get(cycle, 0) + 1
        # Slot k's probes all start before (k + 1 + jitter) * interval, so
        # once slot k + 2 fires anywhere, cycle k is complete.
        for done in [k for k in cycles if k <= cycle - 2]:
            count = cycles.pop(done)
            if done > self.metrics.cycle:
                self.metrics.cycle = done
                self.metrics.probes_per_cycle = count

    # ------------------------------------------------------------- tracking

    def _refresh(self, now: float) -> None:
        epoch = self.ownership.epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self._drop_foreign_verdicts()
        snapshot = self.fanin.snapshot
        if snapshot.version == self._version or now - self._refreshed < _POLL:
            return
        self._version = snapshot.version
        self._refreshed = now
        entries: dict[str, ServiceEntry] = {}
        for service in snapshot:
            entry = snapshot[service]
            entries[service] = entry
            if self._entries.get(service) is not entry:
                self._rescan(service, entry, now)
        for service in self._entries.keys() - entries.keys():
            for target in self._by_service.pop(service, {}).values():
                self._untrack(target)
        self._entries = entries
        self.metrics.tracked = len(self._targets)

    def _rescan(self, service: str, entry: ServiceEntry, now: float) -> None:
        spec = self.probe_for(service)
        old = self._by_service.get(service, {})
        new: dict[str, _Target] = {}
        if spec.probe != "none":
            for instance_id, instance in entry.instances.items():
                target = old.get(instance_id)
                if target is None or (target.host, target.port) != instance.endpoint:
                    target = _Target(
                        service, instance_id, instance.host, instance.port, spec,
                        phase(service, instance_id, self._interval),
                    )  # fmt: skip
                    target.slot = first_slot(
                        service, instance_id, now, self._interval, self._jitter
                    )
                    self._push(self._due(target, target.slot), target, target.slot)
                    self._targets[(service, instance_id)] = target
                new[instance_id] = target
        for instance_id, target in old.items():
            if new.get(instance_id) is not target:
                self._untrack(target)
        if new:
            self._by_service[service] = new
        else:
            self._by_service.pop(service, None)

    def _untrack(self, target: _Target) -> None:
        target.removed = True
        key = (target.service, target.instance_id)
        if self._targets.get(key) is target:
            del self._targets[key]
            # A verdict not flushed yet must not land on a re-registration.
            self._pending.pop(key, None)
        # The fan-in drops the verdict of a removed instance by itself.

    def _drop_foreign_verdicts(self) -> None:
        owns = self.ownership.owns
        for service, targets in self._by_service.items():
            if owns(service):
                continue
            for target in targets.values():
                if target.health is not Health.UNKNOWN:
                    self._forget(target)

    def _forget(self, target: _Target) -> None:
        target.health = Health.UNKNOWN
        target.passes = target.fails = 0
        target.last_pass = None
        target.recheck_at = None
        self._publish(target)

    # ------------------------------------------------------------- probing

    def _start(self, target: _Target, kind: _Kind, now: float) -> None:
        assert self._nursery is not None
        target.in_flight = True
        target.probes += 1
        target.last_probe = now
        metrics = self.metrics
        metrics.probes += 1
        metrics.in_flight += 1
        if kind is _Kind.SLOT:
            metrics.probes_scheduled += 1
        else:
            metrics.probes_reported += 1
            target.last_report_probe = now
        self._nursery.start_soon(self._probe, target, kind)

    async def _probe(self, target: _Target, kind: _Kind) -> None:
        try:
            async with self._limiter:
                failure: str | None = "timeout"
                with trio.move_on_after(self.config.timeout):
                    try:
                        if target.probe == "http":
                            failure = await http_probe(target.host, target.port, target.path)
                        else:
                            failure = await tcp_probe(target.host, target.port)
                    except Exception as exc:
                        # A probe bug must cost one verdict, not the checker.
                        log.exception("health probe crashed", extra={
                            "service": target.service, "instance": target.instance_id,
                        })  # fmt: skip
                        failure = f"probe error: {exc!r}"
        finally:
            target.in_flight = False
            self.metrics.in_flight -= 1
        self._record(target, kind, failure, self._clock())

    def _record(self, target: _Target, kind: _Kind, failure: str | None, now: float) -> None:
        metrics = self.metrics
        if failure is None:
            metrics.passes += 1
        else:
            metrics.failures += 1
        if target.removed or not self.ownership.owns(target.service):
            return  # gone, or handed over while the probe ran: not ours to judge
        if failure is None:
            target.passes += 1
            target.fails = 0
            target.last_pass = now
            if target.health is Health.UNKNOWN or (
                target.health is Health.FAILING and target.passes >= self.config.rise
            ):
                if target.health is Health.FAILING:
                    log.info("instance passing again", extra={
                        "service": target.service, "instance": target.instance_id,
                        "passes": target.passes,
                    })  # fmt: skip
                target.health = Health.PASSING
                metrics.to_passing += 1
                self._publish(target)
            return
        target.fails += 1
        target.passes = 0
        if target.health is Health.UNKNOWN or (
            target.health is Health.PASSING and target.fails >= self.config.fall
        ):
            log.warning("instance failing", extra={
                "service": target.service, "instance": target.instance_id,
                "failure": failure, "fails": target.fails,
            })  # fmt: skip
            if target.last_pass is not None:
                metrics.observe_detection(now - target.last_pass)
            target.health = Health.FAILING
            target.recheck_at = None
            metrics.to_failing += 1
            self._publish(target)
        elif (
            kind is not _Kind.SLOT and target.health is Health.PASSING and target.recheck_at is None
        ):
            # A reported failure confirmed once: confirm the rest quickly.
            self._plan_recheck(target, now + self.config.recheck)

    def _plan_recheck(self, target: _Target, due: float) -> None:
        target.recheck_at = due
        self._push(due, target, -1)
        self._wakeup.set()

    # ------------------------------------------------------------- reports

    def on_report(self, service: str, instance_id: str, reason: str, client_id: str | None) -> bool:
        """A proxy reports that ``instance_id`` of ``service`` failed it; True if acted on.

        Probes the instance at once (sync: the probe runs in the checker's
        nursery), merged with its probe in flight or its planned re-check,
        and at least ``recheck`` seconds after the last report-triggered
        probe (an earlier report plans one at the end of that gap).
        ``client_id`` is the authenticated proxy; a report without one is
        refused, one for a service this Dispatcher does not own or an
        instance it does not know is ignored (False).
        """
        metrics = self.metrics
        if not client_id:
            metrics.reports_refused += 1
            log.warning("health refused a failure report without a client id", extra={
                "service": service, "instance": instance_id,
            })  # fmt: skip
            return False
        target = self._targets.get((service, instance_id))
        if target is None or self._nursery is None or not self.ownership.owns(service):
            metrics.reports_ignored += 1
            return False
        metrics.reports += 1
        # Debug: a dying instance can draw a report from every proxy using it.
        log.debug("failure report", extra={
            "service": service, "instance": instance_id, "client": client_id, "reason": reason,
        })  # fmt: skip
        if target.in_flight or target.recheck_at is not None:
            metrics.reports_merged += 1
            return True
        now = self._clock()
        last = target.last_report_probe
        if last is not None and now < last + self.config.recheck:
            self._plan_recheck(target, last + self.config.recheck)
            return True
        self._start(target, _Kind.REPORT, now)
        return True

    # ------------------------------------------------------------- publishing

    def _publish(self, target: _Target) -> None:
        verdict = None if target.health is Health.UNKNOWN else target.health
        self._pending[(target.service, target.instance_id)] = verdict
        self._flush_wanted.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            await trio.sleep(self._flush_delay)
            self._flush_wanted = trio.Event()
            pending, self._pending = self._pending, {}
            self.fanin.set_probe_health(
                (service, instance_id, health) for (service, instance_id), health in pending.items()
            )
