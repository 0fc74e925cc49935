"""The Prometheus view of a gateway: one collector that reads live values at scrape time.

Nothing on a request path updates a Prometheus object: the values already
exist in the engine, the fan-in, the subscription hub and server, the health
checker and the admin server itself, and :class:`GatewayCollector` reads them
when ``/metrics`` is scraped (it never changes anything). The one exception,
per-opcode request counts, lives in :mod:`dispatcher.faces.admin.metrics`.

Two things the fan-in does not remember, which upstreams have ever connected
and since when the snapshot has had its version, are kept by
:class:`GatewayObserver`; readiness (``/ready``) and ``/status`` read it too.
The collector sees the admin server only through :class:`AdminSource`, so
this module does not depend on the HTTP server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dispatcher.containment import InternalErrors
from dispatcher.core.model import Health
from dispatcher.core.snapshot import Snapshot
from dispatcher.faces.admin.metrics import RequestMetrics

if TYPE_CHECKING:
    from dispatcher.core.subscriptions import Subscription
    from dispatcher.faces.subscription_server import SubscriberConnection
    from dispatcher.gateway import Gateway

__all__ = ["AdminSource", "GatewayCollector", "GatewayObserver", "proxy_lag"]


class GatewayObserver:
    """What the fan-in does not remember: which upstreams ever connected, and
    since when the snapshot has had its current version.

    The fan-in keeps only each upstream's current state, so the admin server
    samples it (every ``sample_interval``, on every request and on every
    scrape). An upstream that connected and disconnected again between two
    samples before its first sample is counted as not yet connected:
    readiness errs on the side of "not ready" until it reconnects.
    ``clock`` is monotonic time.
    """

    def __init__(self, gateway: Gateway, clock: Callable[[], float]) -> None:
        self._gateway = gateway
        self._clock = clock
        self.ever_connected: set[str] = set()
        self.version = -1
        self.changed_at = clock()

    def sample(self) -> None:
        """Note the upstreams connected now and the snapshot's version."""
        fanin = self._gateway.fanin
        for name, state in fanin.status.items():
            if state.connected:
                self.ever_connected.add(name)
        version = fanin.snapshot.version
        if version != self.version:
            self.version = version
            self.changed_at = self._clock()

    def snapshot_age(self) -> float:
        """Seconds since the snapshot's version last changed (or since start)."""
        return max(0.0, self._clock() - self.changed_at)

    def not_ready(self) -> list[str]:
        """Why the gateway is not ready; empty when it is."""
        gateway = self._gateway
        reasons = []
        if gateway.port is None:
            reasons.append("the ZooKeeper port is not bound yet")
        status = gateway.fanin.status
        for upstream in gateway.config.upstreams:
            if upstream.name in self.ever_connected:
                continue
            state = status.get(upstream.name)
            detail = state.detail if state is not None else "not started"
            reasons.append(f"upstream {upstream.name!r} has not connected yet: {detail}")
        return reasons


class AdminSource(Protocol):
    """What :class:`GatewayCollector` reads of the admin server (read-only)."""

    @property
    def gateway(self) -> Gateway: ...

    @property
    def observer(self) -> GatewayObserver: ...

    @property
    def requests(self) -> RequestMetrics: ...

    @property
    def refused(self) -> int:
        """Connections refused (503) at a connection cap."""
        ...

    @property
    def evicted(self) -> int:
        """Connections closed to make room for a new one."""
        ...

    @property
    def timed_out(self) -> int:
        """Requests whose head or body did not arrive in time (408)."""
        ...

    @property
    def served(self) -> Mapping[str, int]:
        """Requests answered, by route."""
        ...

    @property
    def internal_errors(self) -> InternalErrors: ...

    def subscriptions(self) -> Iterator[Subscription]:
        """Every open subscription of the fan-in's hub, once each."""
        ...


class GatewayCollector(Collector):
    """Reads the gateway's live values at scrape time (never mutates anything)."""

    def __init__(self, admin: AdminSource) -> None:
        self._admin = admin
        # Counting instances by health walks the snapshot; keep the answer
        # for the snapshot it was counted on (snapshots never change).
        self._counted: tuple[Snapshot, dict[str, int], int] | None = None

    def collect(self) -> Iterator[Metric]:
        admin = self._admin
        gateway = admin.gateway
        admin.observer.sample()
        yield from self._zookeeper(admin)
        fanin = gateway.fanin
        snapshot = fanin.snapshot
        yield GaugeMetricFamily(
            "zkgate_snapshot_version", "Version of the merged snapshot", value=snapshot.version
        )
        yield GaugeMetricFamily(
            "zkgate_snapshot_age_seconds",
            "Seconds since the merged snapshot last changed (or since start)",
            value=admin.observer.snapshot_age(),
        )
        yield GaugeMetricFamily(
            "zkgate_services", "Services with at least one instance", value=len(snapshot)
        )
        by_health, total = self._instances(snapshot)
        yield GaugeMetricFamily("zkgate_instances", "Instances in the snapshot", value=total)
        health = GaugeMetricFamily(
            "zkgate_instances_by_health", "Instances in the snapshot, by health",
            labels=["health"],
        )  # fmt: skip
        for value in Health:
            health.add_metric([value.value], by_health.get(value.value, 0))
        yield health
        yield from self._upstreams(admin)
        yield from self._fanin_counters(admin)
        yield from self._subscribers(admin)
        yield from self._proxies(admin)
        yield from self._health(admin)
        yield from self._xds(admin)
        yield from self._mesh_views(admin)
        yield from self._inspection(admin)
        yield self._internal_errors(admin)
        yield CounterMetricFamily(
            "zkgate_admin_connections_refused",
            "Admin HTTP connections refused because max_connections or "
            "max_connections_per_address were open and busy",
            value=admin.refused,
        )
        yield CounterMetricFamily(
            "zkgate_admin_connections_evicted",
            "Admin HTTP connections closed to make room for a new one "
            "(the one waiting longest for its request)",
            value=admin.evicted,
        )
        yield CounterMetricFamily(
            "zkgate_admin_requests_timed_out",
            "Admin HTTP requests whose head or body did not arrive in time (408)",
            value=admin.timed_out,
        )
        served = CounterMetricFamily(
            "zkgate_admin_requests", "Admin HTTP requests answered, by path", labels=["path"]
        )
        for path, count in admin.served.items():
            served.add_metric([path], count)
        yield served

    def _internal_errors(self, admin: AdminSource) -> Metric:
        gateway = admin.gateway
        family = CounterMetricFamily(
            "zkgate_internal_errors",
            "Unexpected exceptions that closed one connection (not the process), by listener",
            labels=["listener"],
        )
        for listener in (gateway.zookeeper_server, gateway.subscriptions, admin):
            if listener is not None:
                errors = listener.internal_errors
                family.add_metric([errors.listener], errors.count)
        if gateway.xds is not None:
            family.add_metric(["xds"], gateway.xds.metrics.internal_errors)
        return family

    def _instances(self, snapshot: Snapshot) -> tuple[dict[str, int], int]:
        counted = self._counted
        if counted is not None and counted[0] is snapshot:
            return counted[1], counted[2]
        by_health: dict[str, int] = {}
        total = 0
        for service in snapshot:
            for instance in snapshot[service].instances.values():
                key = instance.health.value
                by_health[key] = by_health.get(key, 0) + 1
                total += 1
        self._counted = (snapshot, by_health, total)
        return by_health, total

    def _zookeeper(self, admin: AdminSource) -> Iterator[Metric]:
        engine = admin.gateway.engine
        if engine is None:
            return
        yield GaugeMetricFamily(
            "zkgate_zk_sessions", "Live ZooKeeper sessions", value=len(engine.sessions)
        )
        yield GaugeMetricFamily(
            "zkgate_zk_connections", "Open ZooKeeper client connections", value=len(engine.clients)
        )
        yield GaugeMetricFamily(
            "zkgate_zk_znodes", "Znodes in the embedded tree", value=len(engine.tree.nodes)
        )
        yield GaugeMetricFamily(
            "zkgate_zk_watches",
            "Downstream ZooKeeper watches (data plus child, as mntr's zk_watch_count)",
            value=engine.watches.watch_count,
        )
        stats = engine.stats
        yield CounterMetricFamily(
            "zkgate_zk_packets_received", "ZooKeeper packets received (as mntr; srst resets it)",
            value=stats.packets_received,
        )  # fmt: skip
        yield CounterMetricFamily(
            "zkgate_zk_packets_sent", "ZooKeeper packets sent (as mntr; srst resets it)",
            value=stats.packets_sent,
        )  # fmt: skip
        yield from admin.requests.families()

    def _upstreams(self, admin: AdminSource) -> Iterator[Metric]:
        gateway = admin.gateway
        kinds = {u.name: u.kind for u in gateway.config.upstreams}
        now = time.time()
        connected = GaugeMetricFamily(
            "zkgate_upstream_connected", "1 while the upstream is connected, else 0",
            labels=["upstream", "kind"],
        )  # fmt: skip
        stale = GaugeMetricFamily(
            "zkgate_upstream_stale_seconds",
            "Seconds the upstream's data has been stale (0 while connected)",
            labels=["upstream", "kind"],
        )
        ever = GaugeMetricFamily(
            "zkgate_upstream_ever_connected",
            "1 once the upstream has connected at least once (readiness)",
            labels=["upstream", "kind"],
        )
        for name, state in gateway.fanin.status.items():
            labels = [name, kinds.get(name, "")]
            connected.add_metric(labels, 1 if state.connected else 0)
            stale.add_metric(labels, 0.0 if state.connected else max(0.0, now - state.since))
            ever.add_metric(labels, 1 if name in admin.observer.ever_connected else 0)
        for mirror in gateway.mirrors:
            labels = [f"mirror:{mirror.root}", "mirror"]
            connected.add_metric(labels, 1 if mirror.connected else 0)
            stale.add_metric(labels, mirror.stale_seconds)
            ever.add_metric(labels, 1 if mirror.resyncs else 0)
        yield connected
        yield stale
        yield ever
        if gateway.mirrors:
            cached = GaugeMetricFamily(
                "zkgate_mirror_cached_znodes", "Upstream znodes held in a mirror's cache",
                labels=["root"],
            )  # fmt: skip
            sessions = GaugeMetricFamily(
                "zkgate_mirror_upstream_sessions",
                "Upstream sessions a mirror holds (its own, plus one per client credentials)",
                labels=["root"],
            )
            resyncs = CounterMetricFamily(
                "zkgate_mirror_resyncs", "Times a mirror caught up with its upstream",
                labels=["root"],
            )  # fmt: skip
            for mirror in gateway.mirrors:
                status = mirror.status()
                cached.add_metric([mirror.root], status["zk_mirror_cached_znodes"])
                sessions.add_metric([mirror.root], status["zk_mirror_upstream_sessions"])
                resyncs.add_metric([mirror.root], mirror.resyncs)
            yield cached
            yield sessions
            yield resyncs
        interest = gateway.fanin.interest
        if interest is not None:
            yield GaugeMetricFamily(
                "zkgate_upstream_interest_services",
                'Services the upstreams are asked to watch (interest = "subscribed")',
                value=len(interest),
            )

    def _fanin_counters(self, admin: AdminSource) -> Iterator[Metric]:
        counters = admin.gateway.fanin.counters
        for name, doc, value in (
            ("events", "Upstream events received", counters.events),
            ("batches", "Batches of upstream events applied", counters.batches),
            ("versions", "Batches that made a new snapshot version", counters.versions),
            ("looped_back", "Instances dropped because this node exported them",
             counters.looped_back),
            ("out_of_scope", "Instances dropped from a listing outside its scope",
             counters.out_of_scope),
            ("restarts", "Upstream runs that crashed or returned and were restarted",
             counters.restarts),
        ):  # fmt: skip
            yield CounterMetricFamily(f"zkgate_fanin_{name}", doc, value=value)

    def _subscribers(self, admin: AdminSource) -> Iterator[Metric]:
        hub = admin.gateway.fanin.hub
        yield GaugeMetricFamily(
            "zkgate_subscribers", "Open subscriptions to the snapshot", value=hub.subscriber_count
        )
        yield CounterMetricFamily(
            "zkgate_subscription_interest_added",
            "Times a service gained its first subscriber (one upstream interest created)",
            value=hub.interest_added,
        )
        yield CounterMetricFamily(
            "zkgate_subscription_interest_removed",
            "Times a service lost its last subscriber",
            value=hub.interest_removed,
        )
        pending = [s.pending for s in admin.subscriptions()]
        yield GaugeMetricFamily(
            "zkgate_subscriber_lag_max",
            "Updates waiting for the most lagging subscriber",
            value=max(pending, default=0),
        )
        yield GaugeMetricFamily(
            "zkgate_subscriber_lag",
            "Updates waiting for all subscribers together",
            value=sum(pending),
        )

    def _proxies(self, admin: AdminSource) -> Iterator[Metric]:
        server = admin.gateway.subscriptions
        if server is None:
            return
        connections = server.connections
        yield GaugeMetricFamily(
            "zkgate_subscription_connections", "Proxies connected to the subscription server",
            value=len(connections),
        )  # fmt: skip
        yield CounterMetricFamily(
            "zkgate_subscription_connections_refused",
            "Subscription connections refused because max_connections were open",
            value=server.refused,
        )
        behind, unsent = proxy_lag(admin.gateway.fanin.snapshot, connections)
        yield GaugeMetricFamily(
            "zkgate_subscription_services_behind",
            "(proxy, service) pairs whose acknowledged version is older than the service's",
            value=behind,
        )
        yield GaugeMetricFamily(
            "zkgate_subscription_unsent_bytes_max",
            "Bytes queued for the proxy furthest behind on its socket",
            value=unsent,
        )

    def _inspection(self, admin: AdminSource) -> Iterator[Metric]:
        inspector = admin.gateway.inspector
        if inspector is None:
            return
        divergences = CounterMetricFamily(
            "zkgate_inspection_divergences", "Divergences inspection found, by layer",
            labels=["layer"],
        )  # fmt: skip
        repairs = CounterMetricFamily(
            "zkgate_inspection_repairs", "Divergences repaired and checked equal, by layer",
            labels=["layer"],
        )  # fmt: skip
        passes = CounterMetricFamily(
            "zkgate_inspection_passes", "Inspection passes, by layer", labels=["layer"]
        )
        success = GaugeMetricFamily(
            "zkgate_inspection_last_success_timestamp_seconds",
            "Wall-clock time of the layer's last pass that completed (0: none yet)",
            labels=["layer"],
        )
        duration = GaugeMetricFamily(
            "zkgate_inspection_pass_seconds", "Duration of the layer's last pass",
            labels=["layer"],
        )  # fmt: skip
        reads = GaugeMetricFamily(
            "zkgate_inspection_pass_upstream_reads",
            "Upstream requests the layer's last pass made", labels=["layer"],
        )  # fmt: skip
        for layer, stats in inspector.stats.items():
            divergences.add_metric([layer], stats.divergences_total)
            repairs.add_metric([layer], stats.repairs_total)
            passes.add_metric([layer], stats.passes)
            success.add_metric([layer], stats.last_success)
            last = stats.last
            duration.add_metric([layer], 0.0 if last is None else last.duration)
            reads.add_metric([layer], 0 if last is None else last.reads)
        yield from (divergences, repairs, passes, success, duration, reads)

    def _health(self, admin: AdminSource) -> Iterator[Metric]:
        checker = admin.gateway.health
        if checker is None:
            return
        m = checker.metrics
        for name, doc, value in (
            ("probes", "Health probes started", m.probes),
            ("probes_scheduled", "Health probes started for their slot", m.probes_scheduled),
            ("probes_reported", "Health probes started because of a failure report",
             m.probes_reported),
            ("failures", "Health probe results that failed", m.failures),
            ("passes", "Health probe results that passed", m.passes),
            ("to_failing", "Instances whose verdict changed to failing", m.to_failing),
            ("to_passing", "Instances whose verdict changed to passing", m.to_passing),
            ("skipped_not_owned", "Probe slots of services owned elsewhere", m.skipped_not_owned),
            ("skipped_in_flight", "Probe slots skipped, the previous probe still running",
             m.skipped_in_flight),
            ("reports", "Failure reports from proxies accepted", m.reports),
            ("reports_merged", "Failure reports merged into a probe already due",
             m.reports_merged),
            ("reports_refused", "Failure reports refused (unauthenticated)", m.reports_refused),
            ("reports_ignored", "Failure reports ignored (not owned, unknown instance)",
             m.reports_ignored),
        ):  # fmt: skip
            yield CounterMetricFamily(f"zkgate_health_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "zkgate_health_in_flight", "Health probes running or waiting for a slot",
            value=m.in_flight,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "zkgate_health_tracked", "Instances the health checker tracks", value=m.tracked
        )
        yield GaugeMetricFamily(
            "zkgate_health_probes_per_cycle", "Slot probes in the last complete cycle",
            value=m.probes_per_cycle,
        )  # fmt: skip
        detection = HistogramMetricFamily(
            "zkgate_health_detection_seconds",
            "From an instance's last passing probe to its failing verdict",
        )
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound in sorted(m.detection_buckets):
            running += m.detection_buckets[bound]
            bound_label: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
            cumulative.append((bound_label, running))
        detection.add_metric([], cumulative, m.detection_sum)
        yield detection

    def _xds(self, admin: AdminSource) -> Iterator[Metric]:
        server = admin.gateway.xds
        if server is None:
            return
        m = server.metrics
        yield GaugeMetricFamily(
            "zkgate_xds_streams", "Open xDS (ADS) streams", value=m.streams_active
        )
        for name, doc, value in (
            ("streams_opened", "xDS streams accepted", m.streams_opened),
            ("streams_refused", "xDS streams refused because max_streams were open",
             m.streams_refused),
            ("requests", "xDS discovery requests handled", m.requests),
            ("acks", "xDS responses acknowledged (ACK)", m.acks),
            ("nacks", "xDS responses rejected by the client (NACK; the last version stays)",
             m.nacks),
            ("stale_nonces", "xDS requests answering a superseded response (ignored)",
             m.stale_nonces),
            ("bad_requests", "xDS requests refused as malformed or over a limit",
             m.bad_requests),
            ("pushes", "xDS responses written to streams", m.pushes),
            ("pushed_bytes", "Bytes of xDS responses written to streams", m.bytes_pushed),
            ("encodings", "xDS resources encoded (once per change, shared by every stream)",
             m.encodings),
            ("encoded_bytes", "Bytes of xDS resources encoded", m.bytes_encoded),
        ):  # fmt: skip
            yield CounterMetricFamily(f"zkgate_xds_{name}", doc, value=value)

    def _mesh_views(self, admin: AdminSource) -> Iterator[Metric]:
        views = admin.gateway.mesh_views
        if views is None:
            return
        yield GaugeMetricFamily(
            "zkgate_mesh_view_version", "Mesh settings version the views are computed on",
            value=views.version,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "zkgate_mesh_view_sessions",
            "Sessions served from mesh views, counted once per provider directory they read",
            value=views.sessions,
        )
        for name, doc, value in (
            ("fired", "Watch events sent because a session's mesh view changed", views.fired),
            ("moved", "Engine-held child watches moved onto mesh views", views.moved),
            ("rendered", "Mesh views computed (cache misses)", views.rendered),
            ("shared", "Mesh views served from a rendering another session shares",
             views.shared),
        ):  # fmt: skip
            yield CounterMetricFamily(f"zkgate_mesh_view_{name}", doc, value=value)


def proxy_lag(snapshot: Snapshot, connections: Iterable[SubscriberConnection]) -> tuple[int, int]:
    """(services behind, largest unsent bytes) over the subscription server's connections."""
    behind = 0
    unsent = 0
    for connection in connections:
        unsent = max(unsent, connection.unsent)
        acked = connection.acked
        for service in connection.services:
            if acked.get(service, -1) < snapshot.full(service).version:
                behind += 1
    return behind, unsent
