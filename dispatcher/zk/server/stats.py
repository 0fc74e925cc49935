"""Counters the four-letter words report: packets, latency, connections."""

from __future__ import annotations

import attrs


@attrs.define
class ServerStats:
    packets_received: int = 0
    packets_sent: int = 0
    #: Request latencies in whole milliseconds, as ZooKeeper measures and
    #: reports them in srvr/mntr: min and max are whole, so the average of the
    #: same whole numbers always lies between them as printed.
    min_latency: float = 0.0
    max_latency: float = 0.0
    total_latency: float = 0.0
    latency_count: int = 0

    def record_latency(self, millis: float) -> None:
        millis = float(int(millis))
        if self.latency_count == 0 or millis < self.min_latency:
            self.min_latency = millis
        if millis > self.max_latency:
            self.max_latency = millis
        self.total_latency += millis
        self.latency_count += 1

    @property
    def avg_latency(self) -> float:
        return self.total_latency / self.latency_count if self.latency_count else 0.0

    def reset(self) -> None:
        self.packets_received = self.packets_sent = 0
        self.min_latency = self.max_latency = self.total_latency = 0.0
        self.latency_count = 0
