"""Per-opcode request counts and latency histograms of the ZooKeeper engine.

Everything else the admin endpoint exports is read live at scrape time (see
:mod:`dispatcher.faces.admin.prometheus`); these are the one exception,
because the engine keeps no per-opcode counts of its own.
:meth:`RequestMetrics.observe` is the engine's observer hook
(``Engine.observer(opcode, seconds)``, called once per handled request) and
runs on the hot path: a dict lookup, a bisect and two increments. The
Prometheus families are built from the counts only when scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Final

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from dispatcher.zk.codec.protocol import OpCode

__all__ = ["LATENCY_BUCKETS", "RequestMetrics", "opcode_label"]

LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
"""Upper bounds (seconds) of the request latency histogram. The engine answers
from memory, so most requests land in the first few buckets; the tail is for
writes that wait on the disk."""

_OTHER_OPCODE: Final = -1000
"""Where observations of opcodes that are not ZooKeeper's go: one series, so
that a client sending garbage opcodes cannot grow the label set."""

_KNOWN_OPCODES: Final = frozenset(int(op) for op in OpCode)


class _OpLatency:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        #: Observations per bucket (not cumulative; the last is +Inf).
        self.counts = [0] * buckets
        self.total = 0.0


class RequestMetrics:
    """Requests handled by the ZooKeeper engine, by opcode, with latency histograms.

    Pass :meth:`observe` as the engine's observer; it runs on the hot path,
    so it only counts, and the collector turns counts into Prometheus
    families at scrape time.
    """

    __slots__ = ("_ops", "buckets")

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._ops: dict[int, _OpLatency] = {}

    def observe(self, opcode: int, seconds: float) -> None:
        """Count one request of ``opcode`` that took ``seconds`` to handle."""
        op = self._ops.get(opcode)
        if op is None:
            if opcode not in _KNOWN_OPCODES:
                opcode = _OTHER_OPCODE
            op = self._ops.get(opcode)
            if op is None:
                op = self._ops[opcode] = _OpLatency(len(self.buckets) + 1)
        # bisect_left: the first bound >= seconds, as Prometheus' "le" means.
        op.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        op.total += seconds

    def count(self, opcode: int) -> int:
        """Requests of ``opcode`` observed so far."""
        op = self._ops.get(opcode)
        return sum(op.counts) if op is not None else 0

    def families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        """The counter and histogram families, labelled by opcode name."""
        requests = CounterMetricFamily(
            "zkgate_zk_requests", "ZooKeeper requests handled, by opcode", labels=["opcode"]
        )
        latency = HistogramMetricFamily(
            "zkgate_zk_request_duration_seconds",
            "Time the engine took to handle a ZooKeeper request, by opcode",
            labels=["opcode"],
        )
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        for opcode in sorted(self._ops):
            op = self._ops[opcode]
            name = opcode_label(opcode)
            cumulative: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(bounds, op.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            requests.add_metric([name], running)
            latency.add_metric([name], cumulative, op.total)
        return requests, latency


def opcode_label(opcode: int) -> str:
    """``get_data`` for 4, ``other`` for anything that is not a ZooKeeper opcode."""
    if opcode in _KNOWN_OPCODES:
        return OpCode(opcode).name.lower()
    return "other"
