"""The inspector: runs the layers' comparisons, confirms, reports and repairs.

A pass over a layer compares every service once. A difference is not yet
a divergence: a change may be on its way (an upstream event not yet
applied, a projection not yet re-rendered). So the services that differ
are compared again ``grace`` seconds later, and only the instances that
differ both times are divergences. For the upstream layer, records the
fan-in got after the direct read (a newer revision) are not compared at
all. The cost is one comparison of everything plus, for the services that
differ, a second one of just those.

A divergence is logged (one warning per service: layer, target, service,
instances that differ, age), counted per layer, kept for ``/status`` (the
last pass of each layer) and, in scheduled passes, repaired: the upstream
layer replaces the fan-in's view of that service by the direct read (a
re-list of that service), the projection layer re-renders that service's
znodes, the mirror layer reloads the stale cache entries (their missed
watches fire), the xDS layer resends the resources to that stream; each is
compared again at once and the log says whether it holds.
A pass on demand (``POST /inspect``, ``zkgate inspect``) reports without
repairing: it reads, it does not change state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from dispatcher.core.fanin import FanIn
from dispatcher.faces.projection import Projection
from dispatcher.inspection.config import InspectionConfig
from dispatcher.inspection.difference import Check, Difference
from dispatcher.inspection.mirrors import MirrorLayer
from dispatcher.inspection.model import (
    LAYERS,
    PASS_LAYERS,
    Divergence,
    Layer,
    LayerStats,
    PassReport,
)
from dispatcher.inspection.projections import ProjectionLayer
from dispatcher.inspection.upstreams import UpstreamLayer
from dispatcher.inspection.xds import XdsLayer

if TYPE_CHECKING:
    from dispatcher.faces.xds.server import XdsServer
    from dispatcher.zk.mirror import Mirror

__all__ = ["Inspector"]

log = logging.getLogger(__name__)

#: Ids named per divergence in a log line or report; the counts say the rest.
_MAX_IDS = 20
#: Divergences kept per layer found outside passes (for /status).
_MAX_RECENT = 20


class _LayerCheck(Protocol):
    layer: str

    async def check(self, services: frozenset[str] | None) -> Check: ...


class Inspector:
    """Inspects ``fanin``'s upstreams and ``projections`` on ``config``'s schedule."""

    def __init__(
        self,
        fanin: FanIn,
        projections: Sequence[Projection],
        config: InspectionConfig,
        node_id: str,
        *,
        mirrors: Callable[[], Sequence[Mirror]] = tuple,
        xds: Callable[[], XdsServer | None] = lambda: None,
    ) -> None:
        """``mirrors`` and ``xds`` give the mounted mirrors and the xDS server
        (None: no xDS face) as they are at each pass: both start after this."""
        self.config = config
        self._layers: dict[Layer, _LayerCheck] = {
            "upstream": UpstreamLayer(fanin, node_id),
            "projection": ProjectionLayer(projections),
            "mirror": MirrorLayer(mirrors),
            # A repair waits for the client's ACK at most as long as a difference may last.
            "xds": XdsLayer(xds, settle=max(1.0, config.grace)),
        }
        self.stats: dict[Layer, LayerStats] = {layer: LayerStats() for layer in LAYERS}
        # One pass at a time: a pass on demand waits for a scheduled one.
        self._lock = trio.Lock()

    def proxy_checked(self, divergence: Divergence | None) -> None:
        """Note one comparison of a proxy's table (at its Ack): consistent (None),
        or a divergence, already logged and, if ``repaired``, being repaired."""
        stats = self.stats["proxy"]
        stats.passes += 1
        stats.last_success = time.time()
        if divergence is None:
            return
        stats.divergences_total += 1
        stats.repairs_total += bool(divergence.repaired)
        stats.recent.append(divergence)
        del stats.recent[:-_MAX_RECENT]

    def status(self) -> dict[str, Any]:
        """``/status``'s section: the schedule, and each layer's counters and last pass."""
        return {
            "enabled": self.config.enabled,
            "interval": self.config.interval,
            "grace": self.config.grace,
            "layers": {
                layer: {
                    "passes": stats.passes,
                    "divergences_total": stats.divergences_total,
                    "repairs_total": stats.repairs_total,
                    "last_success": stats.last_success or None,
                    "last": None if stats.last is None else stats.last.to_json(),
                    "recent": [d.to_json() for d in stats.recent],
                }
                for layer, stats in self.stats.items()
            },
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pass over every layer each ``interval`` seconds, repairing, until cancelled."""
        task_status.started()
        while True:
            started = trio.current_time()
            await self.inspect(repair=True)
            await trio.sleep_until(started + self.config.interval)

    async def inspect(self, *, repair: bool = False) -> tuple[PassReport, ...]:
        """One pass over every layer; its reports, in layer order."""
        async with self._lock:
            return tuple([await self._pass(layer, repair) for layer in PASS_LAYERS])

    async def _pass(self, layer: Layer, repair: bool) -> PassReport:
        check = self._layers[layer]
        stats = self.stats[layer]
        started_wall = time.time()
        started = trio.current_time()
        try:
            first = await check.check(None)
            reads = first.reads
            divergences: list[Divergence] = []
            if first.differences:
                await trio.sleep(self.config.grace)
                services = frozenset(d.service for d in first.differences)
                second = await check.check(services)
                reads += second.reads
                earlier = {d.key: d for d in first.differences}
                for later in second.differences:
                    seen = earlier.get(later.key)
                    if seen is None:
                        continue
                    persisting = seen.persisting(later)
                    if persisting:
                        age = trio.current_time() - started
                        divergences.append(await self._report(layer, persisting, age, repair))
        except Exception as exc:
            log.exception("inspection pass failed", extra={"layer": layer})
            report = PassReport(
                layer, started_wall, trio.current_time() - started, 0, 0, (), (), repr(exc)
            )
            stats.passes += 1
            stats.last = report
            return report
        report = PassReport(
            layer, started_wall, trio.current_time() - started, first.services, reads,
            tuple(divergences), first.skipped,
        )  # fmt: skip
        stats.passes += 1
        stats.divergences_total += len(divergences)
        stats.repairs_total += sum(1 for d in divergences if d.repaired)
        stats.last_success = time.time()
        stats.last = report
        return report

    async def _report(
        self, layer: Layer, found: Difference, age: float, repair: bool
    ) -> Divergence:
        repaired = None
        if repair and found.repair is not None:
            outcome = found.repair()
            repaired = await outcome if isawaitable(outcome) else outcome
        divergence = Divergence(
            layer, found.target, found.service, _ids(found.missing), _ids(found.extra),
            _ids(found.differing), round(age, 3), repaired,
        )  # fmt: skip
        log.warning(
            "inspection found a divergence",
            extra={
                "layer": layer, "target": found.target, "service": found.service,
                "missing": ",".join(divergence.missing), "extra": ",".join(divergence.extra),
                "differing": ",".join(divergence.differing),
                "instances": len(found.missing) + len(found.extra) + len(found.differing),
                "age_seconds": divergence.age,
                "repaired": "not tried" if repaired is None else repaired,
            },
        )  # fmt: skip
        return divergence


def _ids(ids: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(ids)[:_MAX_IDS])
