"""Per-consumer views of projected providers: mesh onboarding in the ZooKeeper face.

A consumer switched on (:mod:`dispatcher.governance.mesh`) that reads a service's instance
directory in a projection (Dubbo's ``<root>/<service>/providers``) sees its own host's
sidecar proxy among the providers:

* Dubbo (a layout with weights): the true providers unchanged, plus the sidecar at weight
  ``round(R / (100 - R) * sum of the true providers' weights)``, so R% of the weighted picks
  go through it. R = 100: the sidecar alone. R = 0, no sidecar registered for the host and
  service, or no true provider to weigh against (0 < R < 100): the true providers.
* other layouts: R applies per consumer instance, hashed on (application, host, service):
  an instance in the R% sees the sidecar alone, the others the true instances.

A proxy registers its listen address for a service as the data (``HOST:PORT``) of the znode
``<[mesh] sidecars>/<host>/<service>`` (ephemeral, made through this ZooKeeper face: see
``zkgate proxy --register``).

A view is a function of (service snapshot, mesh version, consumer); the encoded children of
a view are cached and shared by every session that holds it. A session is served from the
views once a switch names its application for that service, and from then on for that
directory (so its stats stay on one count): the directory's stat is the true one with
``cversion`` raised by this directory's view epoch (bumped at each mesh or sidecar change
that concerns its service, and at each instance change that changes some view of it),
``pzxid`` at least the zxid of
that bump, and ``numChildren`` the view's. Both terms only grow, so a session's stats never
go backwards, whichever views it moves between. Its child watches are kept here, not in the
engine: a change fires exactly the sessions whose children changed (compared with what each read).

A change costs in proportion to the sessions of the services it concerns, not to every
connected client: a mesh change re-decides only the directories of the services its diff
names, a sidecar change those of the services registered or gone, and the sessions still
served by the engine are found through the engine's child-watch table of that directory
(sessions by directory), never by walking every connection.

Sidecar registrations are followed through the engine's ``changed`` hook, in the step that
commits them: a registration, a change of its address, or its deletion (the proxy's session
closed or expired) re-decides the views of that service at once, before any later request
is answered, and nothing wakes up periodically to look. Closed sessions are forgotten when
a change of their directory meets them and, so that the bookkeeping stays bounded under
session churn, whenever as many new readers have come as were kept at the last sweep.

Limits: a session's watch set before it was view-served stays in the engine (and fires on
true changes); after a reconnection, ``setWatches`` is answered from the true tree; the
sidecar's own znode is not readable (Dubbo consumers only list names); sidecars registered
under a mirrored subtree (``[[mirror]]``) are not seen.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Iterator
from typing import Any, Final

import attrs
import trio

from dispatcher.core.fanin import EXPORTED_BY
from dispatcher.core.model import Health, Instance, Metadata
from dispatcher.core.subscriptions import EVERYTHING
from dispatcher.faces.mesh.config import MeshConfig
from dispatcher.faces.mesh.consumers import Consumer, identify, refusal
from dispatcher.faces.projection import Projection
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshError, MeshSettings, diff
from dispatcher.wire import parse_address
from dispatcher.zk.codec.paths import join
from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    GetChildren2Response,
    GetChildrenResponse,
    GetDataResponse,
    Stat,
    StatResponse,
)
from dispatcher.zk.server.engine import Client, Engine
from dispatcher.zk.server.tree import Trigger
from dispatcher.zk.server.watches import Mode, WatcherType

__all__ = [
    "SIDECAR_MARK",
    "MeshViews",
    "ViewKey",
    "hashed_onto_sidecar",
    "sidecar_weight",
]

log = logging.getLogger(__name__)

SIDECAR_MARK: Final = "zkgate.sidecar"
"""Metadata key set on a rendered sidecar provider."""
MAX_RENDERINGS: Final = 4096
"""Cached view renderings; the oldest go first."""
MAX_WEIGHT: Final = 2**31 - 1
"""Dubbo keeps a weight in a Java int."""
MIN_SWEEP: Final = 256
"""New readers that may come before closed sessions are swept out, however few are kept."""


def sidecar_weight(ratio: int, weights: list[int]) -> int | None:
    """The sidecar's weight for ``ratio`` R beside providers of ``weights``; None: no sidecar
    (R = 0, or nothing to weigh against); 100 alone at R = 100."""
    total = sum(weights)
    if ratio <= 0 or (ratio < 100 and total <= 0):
        return None
    if ratio >= 100:
        return 100
    return max(1, min(MAX_WEIGHT, round(ratio * total / (100 - ratio))))


def hashed_onto_sidecar(application: str, host: str, service: str, ratio: int) -> bool:
    """Whether the consumer instance (``application`` on ``host``) is among the ``ratio``
    percent that a layout without weights shows the sidecar alone for ``service``.

    A stable hash, so an instance keeps its side across reads, restarts and Dispatchers;
    raising R only adds instances (each instance's bucket is fixed, R is the threshold)."""
    token = f"{application}|{host}|{service}".encode()
    bucket = int.from_bytes(hashlib.sha256(token).digest()[:8], "big") % 100
    return bucket < ratio


@attrs.frozen
class ViewKey:
    """What a view depends on besides the snapshot: the sidecar shown (None: the true
    providers) and the ratio it is weighted at (100: alone)."""

    sidecar: str | None = None
    ratio: int = 0


TRUE_VIEW: Final = ViewKey()


@attrs.frozen
class Decision:
    """A consumer's view of one service and why (for ``zkgate mesh consumers``)."""

    key: ViewKey
    mode: str
    ratio: int
    state: str
    reason: str | None = None


@attrs.define(eq=False)
class _Directory:
    projection: Projection
    service: str
    epoch: int = 0
    epoch_zxid: int = 0
    #: Sessions served from views here, each with the children it last read.
    served: dict[Client, tuple[str, ...] | None] = attrs.Factory(dict)
    #: Of those, the ones holding a child watch.
    watching: set[Client] = attrs.Factory(set)


class MeshViews:
    """The engine's :class:`~dispatcher.zk.server.engine.ReadHook` for mesh onboarding."""

    def __init__(
        self,
        engine: Engine,
        projections: list[Projection],
        feed: GovernanceFeed | None,
        config: MeshConfig,
    ) -> None:
        self.engine = engine
        self.projections = tuple(projections)
        self.feed = feed
        self.config = config
        self.settings = MeshSettings()
        self.version = 0
        self._dubbo_roots = tuple(p.root for p in projections if p.layout.NAME == "dubbo")
        self._directories: dict[str, _Directory] = {}
        #: The directory paths of each service (one per projection that shows it).
        self._paths_by_service: dict[str, list[str]] = {}
        self._renderings: collections.OrderedDict[tuple[Any, ...], tuple[str, ...]] = (
            collections.OrderedDict()
        )
        #: Views computed, and how many came from the cache (shared renderings).
        self.rendered = 0
        self.shared = 0
        #: Watch events sent because a view changed.
        self.fired = 0
        #: Engine-held child watches moved onto views (a session's first view change).
        self.moved = 0
        #: Live sessions that read a projected directory, for ``zkgate mesh consumers``.
        self._readers: dict[Client, set[str]] = {}
        #: New readers until the next sweep of closed sessions (see :meth:`_prune`).
        self._until_sweep = MIN_SWEEP
        self._sidecar_prefix = self.config.sidecars.rstrip("/") + "/"

    # ------------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the mesh settings, the snapshot and the sidecars until cancelled."""
        if self.feed is None or not self.projections:
            # No switch can be on, or nothing to show one in: every view is the true one.
            task_status.started()
            return
        engine = self.engine
        if engine.changed is not None:
            raise RuntimeError("the engine's change hook is taken already")
        await self.feed.loaded.wait()
        self._apply(self.feed.current)
        engine.changed = self._tree_changed
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_settings, self.feed)
                async with self.projections[0].fanin.subscribe([EVERYTHING]) as updates:
                    task_status.started()
                    async for update in updates:
                        self.refresh(self._paths_of(update.service), bump=False)
        finally:
            engine.changed = None

    async def _follow_settings(self, feed: GovernanceFeed) -> None:
        async with feed.subscribe() as revisions:
            async for revision in revisions:
                if revision.version > self.version:
                    services = self._apply(revision)
                    self.refresh(self._paths_of_services(services), bump=True)

    def _apply(self, revision: Any) -> set[str]:
        """Take ``revision``'s settings; the services whose switches it changed."""
        if revision is None:
            return set()
        try:
            settings = MeshSettings.from_json(revision.body)
        except MeshError as exc:
            log.error("the mesh document does not parse; the last good one stays",
                      extra={"version": revision.version, "error": str(exc)[:500]})  # fmt: skip
            return set()
        changed = {change.service for change in diff(self.settings, settings)}
        self.settings = settings
        self.version = revision.version
        return changed

    def _tree_changed(self, triggers: list[Trigger]) -> None:
        """The engine's ``changed`` hook: re-decide the views of the services whose sidecar
        registrations (``<sidecars>/<host>/<service>``) came, went or changed address.

        Runs inside the committing write, so it costs a prefix test per trigger unless a
        registration changed; a failure here is logged and leaves the write alone (it is
        committed, and its client must hear so)."""
        prefix = self._sidecar_prefix
        services: set[str] | None = None
        for trigger in triggers:
            path = trigger.path
            if not path.startswith(prefix) or trigger.event is EventType.NODE_CHILDREN_CHANGED:
                continue
            _, _, service = path[len(prefix) :].partition("/")
            if service and "/" not in service:
                if services is None:
                    services = set()
                services.add(service)
        if services is None:
            return
        try:
            self.refresh(self._paths_of_services(services), bump=True)
        except Exception:
            log.exception("a sidecar change could not reach the mesh views",
                          extra={"services": sorted(services)[:20]})  # fmt: skip

    def _prune(self) -> None:
        """Forget closed sessions everywhere (amortized: see :attr:`_until_sweep`)."""
        for directory in self._directories.values():
            for client in [c for c in directory.served if c.closed]:
                del directory.served[client]
                directory.watching.discard(client)
        for client in [c for c in self._readers if c.closed]:
            del self._readers[client]
        self._until_sweep = max(MIN_SWEEP, len(self._readers))

    # -------------------------------------------------------------------- reads

    def read(self, client: Client, xid: int, opcode: int, path: str, watch: bool) -> bool:
        """Answer ``opcode`` on ``path`` from ``client``'s view; False: the engine answers."""
        if not self.projections:
            return False
        directory = self._directory(path)
        if directory is None:
            return self._read_sidecar(client, xid, opcode, path)
        readers = self._readers.get(client)
        if readers is None:
            readers = self._readers[client] = set()
            self._until_sweep -= 1
            if self._until_sweep <= 0:
                self._prune()
        if len(readers) < 1024:
            readers.add(directory.service)
        node = self.engine.tree.get(path)
        if node is None:
            return False
        served = client in directory.served
        decision = self.decide(client, directory)
        if decision.key == TRUE_VIEW and not served:
            return False
        children = self._children(directory, decision.key)
        stat = self._stat(directory, node.stat(), len(children))
        if opcode in (OpCode.GET_CHILDREN, OpCode.GET_CHILDREN2):
            directory.served[client] = children
            if watch:
                directory.watching.add(client)
            body: Any = (
                GetChildrenResponse(children)
                if opcode == OpCode.GET_CHILDREN
                else GetChildren2Response(children, stat)
            )
        else:
            directory.served.setdefault(client, None)
            if watch:
                self.engine.watches.add_data(path, client)
            body = (
                GetDataResponse(node.data, stat)
                if opcode == OpCode.GET_DATA
                else StatResponse(stat)
            )
        self.engine.reply(client, xid, Err.OK, body)
        return True

    def _read_sidecar(self, client: Client, xid: int, opcode: int, path: str) -> bool:
        """Answer a read of the sidecar's own znode in ``client``'s view of its directory.

        Clients that read each instance's data after listing the directory (Curator's
        ServiceDiscovery, its ServiceCache) would otherwise get NONODE for the sidecar and
        drop it. The znode exists only in the views, so no watch is kept on it: its name
        is its address, and a change of address is a change of the directory's children.
        """
        if opcode not in (OpCode.GET_DATA, OpCode.EXISTS):
            return False
        parent, _, name = path.rpartition("/")
        directory = self._directories.get(parent)
        if directory is None or self.engine.tree.get(path) is not None:
            return False
        parent_node = self.engine.tree.get(parent)
        if parent_node is None:
            return False
        key = self.decide(client, directory).key
        if key.sidecar is None:
            return False
        rendered = self._sidecar_node(directory, key)
        if rendered is None or rendered[0] != name:
            return False
        data = rendered[1]
        # Made when this directory's view last changed: no older than anything listed there.
        made = max(parent_node.pzxid, directory.epoch_zxid)
        stat = Stat(
            czxid=made, mzxid=made, ctime=parent_node.mtime, mtime=parent_node.mtime,
            version=0, cversion=0, aversion=0, ephemeral_owner=0, data_length=len(data),
            num_children=0, pzxid=made,
        )  # fmt: skip
        body: Any = GetDataResponse(data, stat) if opcode == OpCode.GET_DATA else StatResponse(stat)
        self.engine.reply(client, xid, Err.OK, body)
        return True

    def _directory(self, path: str) -> _Directory | None:
        known = self._directories.get(path)
        if known is not None:
            return known
        for projection in self.projections:
            root = projection.root
            if not path.startswith(root + "/"):
                continue
            service_of = getattr(projection.layout, "service_of", None)
            service = None if service_of is None else service_of(path[len(root) + 1 :])
            if service is None or join(root, projection.layout.directory(service)) != path:
                return None
            if self.engine.tree.get(path) is None:
                return None  # not kept for a directory that does not exist
            directory = self._directories[path] = _Directory(projection, service)
            self._paths_by_service.setdefault(service, []).append(path)
            return directory
        return None

    def _paths_of(self, service: str) -> list[str]:
        return list(self._paths_by_service.get(service, ()))

    def _paths_of_services(self, services: set[str]) -> list[str]:
        return [path for service in sorted(services) for path in self._paths_of(service)]

    @property
    def sessions(self) -> int:
        """Sessions served from views now (each counted once per directory)."""
        return sum(len(directory.served) for directory in self._directories.values())

    # ---------------------------------------------------------------- decisions

    def consumer_of(self, client: Client) -> Consumer:
        registrations = self.engine.tree.ephemerals.get(client.session.id, ())
        return identify(registrations, self._dubbo_roots, client.peer.remote_ip, self.config)

    def decide(self, client: Client, directory: _Directory) -> Decision:
        return self.decision(self.consumer_of(client), directory.projection, directory.service)

    def decision(self, consumer: Consumer, projection: Projection, service: str) -> Decision:
        """What ``consumer`` sees of ``service`` in ``projection``, and why."""
        switch = None
        if consumer.application is not None:
            switch = self.settings.switch(consumer.application, service)
        if switch is None or switch.mode == "off":
            return Decision(TRUE_VIEW, "off", 0, "off")
        refused = refusal(consumer, self.config)
        if refused is not None:
            return Decision(TRUE_VIEW, "on", switch.ratio, "refused", refused)
        sidecar = self.sidecar(consumer.host, service)
        if sidecar is None:
            reason = f"no sidecar registered at {join(self.config.sidecars, consumer.host)}"
            return Decision(TRUE_VIEW, "on", switch.ratio, "waiting", reason)
        ratio = switch.ratio
        if ratio == 0:
            return Decision(TRUE_VIEW, "on", 0, "on")
        if projection.layout.NAME != "dubbo" and ratio < 100:
            # No weights in this layout: the ratio picks consumer instances, stably.
            if not hashed_onto_sidecar(consumer.application or "", consumer.host, service, ratio):
                return Decision(TRUE_VIEW, "on", ratio, "on", "hashed to the direct path")
            ratio = 100
        return Decision(ViewKey(sidecar, ratio), "on", switch.ratio, "on")

    def sidecar(self, host: str, service: str) -> str | None:
        """The listen address the proxy on ``host`` registered for ``service``."""
        if "/" in service or "/" in host:
            return None
        node = self.engine.tree.get(join(join(self.config.sidecars, host), service))
        if node is None:
            return None
        try:
            address = (node.data or b"").decode().strip()
            parse_address(address)
        except (UnicodeDecodeError, ValueError):
            return None
        return address

    # ---------------------------------------------------------------- rendering

    def _children(self, directory: _Directory, key: ViewKey) -> tuple[str, ...]:
        projection, service = directory.projection, directory.service
        entry = projection.fanin.snapshot.get(service)
        cache_key = (id(projection), service, None if entry is None else entry.version, key)
        cached = self._renderings.get(cache_key)
        if cached is not None:
            self.shared += 1
            self._renderings.move_to_end(cache_key)
            return cached
        self.rendered += 1
        _, true = projection.rendered(service)
        names = set(true)
        sidecar = self._sidecar_node(directory, key)
        if sidecar is not None:
            if key.ratio >= 100:
                names.clear()
            names.add(sidecar[0])
        children = tuple(sorted(names))
        self._renderings[cache_key] = children
        if len(self._renderings) > MAX_RENDERINGS:
            self._renderings.popitem(last=False)
        return children

    def _sidecar_node(self, directory: _Directory, key: ViewKey) -> tuple[str, bytes] | None:
        """The sidecar's znode (name, data) in the view ``key`` of ``directory``; None when
        that view shows no sidecar."""
        if key.sidecar is None:
            return None
        projection, service = directory.projection, directory.service
        entry = projection.fanin.snapshot.get(service)
        shown = [
            instance
            for instance in (() if entry is None else entry.instances.values())
            if not (projection.hide_failing and instance.health is Health.FAILING)
        ]
        weight = (
            100
            if key.ratio >= 100
            else sidecar_weight(key.ratio, [instance.weight for instance in shown])
        )
        if weight is None:
            return None
        return self._render_sidecar(projection, service, key.sidecar, weight, shown)

    @staticmethod
    def _render_sidecar(
        projection: Projection, service: str, address: str, weight: int, shown: list[Instance]
    ) -> tuple[str, bytes]:
        host, port = parse_address(address)
        marks = {SIDECAR_MARK: "true", EXPORTED_BY: projection.node_id}
        if shown:
            # The first true provider's parameters (methods, serialization...), so a
            # consumer builds the same invoker for the sidecar as for a direct provider.
            template = min(shown, key=lambda instance: instance.instance_id)
            instance = attrs.evolve(
                template, instance_id=address, host=host, port=port, weight=weight,
                health=Health.UNKNOWN, metadata=Metadata({**template.metadata, **marks}),
            )  # fmt: skip
        else:
            instance = Instance(service, address, host, port, weight=weight, metadata=marks)
        name, data = projection.layout.render(instance)
        return str(name), bytes(data)

    def _stat(self, directory: _Directory, true: Stat, count: int) -> Stat:
        return attrs.evolve(
            true,
            cversion=true.cversion + directory.epoch,
            pzxid=max(true.pzxid, directory.epoch_zxid),
            num_children=count,
        )

    # ----------------------------------------------------------------- changes

    def refresh(self, paths: list[str], *, bump: bool) -> None:
        """Re-decide the view-served sessions of ``paths``; fire the child watches of those
        whose children changed. ``bump``: a mesh or sidecar change (the view epoch of every
        directory moves)."""
        for path in paths:
            directory = self._directories.get(path)
            if directory is None:
                continue
            # A mesh or sidecar change may move a session onto a view at its next read:
            # the epoch moves first, so what it reads then counts above what it read before.
            changed = bump
            fire = []
            for client, seen in list(directory.served.items()):
                if client.closed:
                    del directory.served[client]
                    directory.watching.discard(client)
                    continue
                children = self._children(directory, self.decide(client, directory).key)
                if children != seen:
                    changed = True
                    if client in directory.watching:
                        fire.append(client)
            if bump:
                fire.extend(self._moving_onto_views(path, directory))
            if changed:
                directory.epoch += 1
                directory.epoch_zxid = self.engine.zxid
            for client in fire:
                directory.watching.discard(client)
                self.fired += 1
                self.engine.notify(client, EventType.NODE_CHILDREN_CHANGED, path)

    def _moving_onto_views(self, path: str, directory: _Directory) -> Iterator[Client]:
        """Sessions served by the engine so far whose view now differs: their one-shot child
        watch moves here (to be fired), and they are view-served from now on.

        Only the engine's watchers of ``path`` are looked at (its child-watch table is the
        index of sessions by directory). A persistent watch (``addWatch``) stays in the
        engine: it is not used up by an event, so it cannot move."""
        watches = self.engine.watches
        modes = watches.child_table.modes
        for watcher in list(watches.child.get(path, ())):
            if not isinstance(watcher, Client):
                continue
            client = watcher
            if client in directory.served or client.closed:
                continue
            if modes.get((client, path), Mode.STANDARD) is not Mode.STANDARD:
                continue
            if self.decide(client, directory).key == TRUE_VIEW:
                continue
            watches.remove(path, client, WatcherType.CHILDREN)
            directory.served[client] = None
            directory.watching.add(client)
            self.moved += 1
            yield client

    # ------------------------------------------------------------------ listing

    def consumers(self) -> list[dict[str, Any]]:
        """Every known consumer (by application, host and version) with its sessions and
        what it sees of each service it registered for, read, or has a switch for."""
        groups: dict[Consumer, dict[str, Any]] = {}
        for client in sorted(self.engine.clients, key=lambda c: c.session.id):
            if client.closed:
                continue
            consumer = self.consumer_of(client)
            read = self._readers.get(client, set())
            if consumer.source == "address" and not read:
                continue
            group = groups.setdefault(consumer, {"sessions": [], "services": set()})
            group["sessions"].append(f"0x{client.session.id:x}")
            group["services"].update(read)
            group["services"].update(self._registered_services(client))
        listing = []
        for consumer, group in groups.items():
            services: set[str] = group["services"]
            if consumer.application is not None:
                services.update(self.settings.services_of(consumer.application))
            rows = []
            for service in sorted(services):
                projection = self._projection_of(service)
                if projection is None:
                    continue
                decision = self.decision(consumer, projection, service)
                rows.append({
                    "service": service, "mode": decision.mode, "ratio": decision.ratio,
                    "state": decision.state, "reason": decision.reason,
                    "sidecar": decision.key.sidecar or self.sidecar(consumer.host, service),
                })  # fmt: skip
            listing.append({
                **attrs.asdict(consumer), "sessions": group["sessions"],
                "refused": refusal(consumer, self.config), "services": rows,
            })  # fmt: skip
        listing.sort(key=lambda c: (c["application"] or "", c["host"], c["version"] or ""))
        return listing

    def _registered_services(self, client: Client) -> Iterator[str]:
        for path in self.engine.tree.ephemerals.get(client.session.id, ()):
            parent = path.rpartition("/")[0]
            if parent.endswith("/consumers"):
                service_path = parent.rpartition("/")[0]
                for projection in self.projections:
                    if service_path.startswith(projection.root + "/"):
                        service_of = getattr(projection.layout, "service_of", None)
                        relative = service_path[len(projection.root) + 1 :] + "/providers"
                        service = None if service_of is None else service_of(relative)
                        if service is not None:
                            yield service

    def _projection_of(self, service: str) -> Projection | None:
        """The projection whose view of ``service`` is listed: a Dubbo one if any."""
        for projection in self.projections:
            if projection.layout.NAME == "dubbo" and self._directory(
                join(projection.root, projection.layout.directory(service))
            ):
                return projection
        return self.projections[0] if self.projections else None
