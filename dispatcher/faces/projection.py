"""The unified registry rendered as read-only znodes in a layout clients parse.

A :class:`Projection` keeps one subtree of the ZooKeeper face (its ``root``)
equal to the fan-in's snapshot rendered in one layout (Dubbo, Curator service
discovery, ServerSet, plain JSON), so a Dubbo consumer or a Curator
ServiceDiscovery finds a gRPC service registered in etcd without knowing etcd
exists. Each change of a service becomes one ZooKeeper transaction under the
root: created, changed and deleted znodes fire the child and data watches
clients set, and unchanged znodes keep their stats, so versions move only when
the rendered bytes do.

Instances rendered here carry ``zkgate.exported-by = <node id>`` in their
metadata (where the layout has room for metadata), so if this subtree is
ever read back through an upstream, the fan-in recognises them and does not
import them again. Failing instances are left out, except in the ServerSet
layout, whose ``status`` field says DEAD instead.

A layout whose clients write into the registry themselves says so with two
optional module attributes, which the Dubbo layout has: ``CLIENT_PATHS``
(the paths below the root that clients may write, ``*`` for any one name)
and ``categories(service)`` (the directories kept beside the instance
directory). For such a layout the projection keeps a service's directories
while the service is in the snapshot, even with nothing to show (a Dubbo
consumer watches ``providers``, ``configurators`` and ``routers`` and fails
to subscribe without them), and clients write where ``CLIENT_PATHS`` allow,
with ZooKeeper's answers: a Dubbo consumer's ephemeral ``consumer://`` znode
is owned by its session, seen and watched by every reader, and gone with
the session. When a service leaves the snapshot its instance znodes go, and
its directories go too unless a client's znode is still in them: a
registered consumer keeps them (with an empty ``providers``, which is what
its child watch shows) and the projection never deletes a client's znode.
Directories kept that way stay after the last consumer goes, until the
service returns or zkgate restarts. Instance directories stay read-only:
a write there gets NOAUTH.

Policies. A layout that knows how its consumers read governance policies says
so with a third optional attribute, ``governance(service, instances, policy)``
(the Dubbo layout's: override URLs in ``configurators``, condition routes in
``routers``): given a feed of policy documents (``run(policies)``), each
service's directories beside its instances hold what the service's policy
renders to, in the same transaction as its instances, re-rendered when a new
governance version changes that service's policy and emptied when the policy
is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs
import trio

from dispatcher.core.fanin import EXPORTED_BY, FanIn
from dispatcher.core.model import Health, Instance, Metadata
from dispatcher.core.snapshot import ServiceEntry
from dispatcher.core.subscriptions import EVERYTHING
from dispatcher.core.upstream import Layout
from dispatcher.faces.policy_feed import policy_sets
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import PolicySet
from dispatcher.zk.codec.paths import join, parent_of
from dispatcher.zk.codec.protocol import Perm
from dispatcher.zk.codec.records import ACL, Id
from dispatcher.zk.server.engine import Engine
from dispatcher.zk.server.tree import OPEN_WORLD, READ_ONLY_WORLD

log = logging.getLogger(__name__)

# A service's znode in a layout clients write into: listed by anyone, and
# anyone may create the category directories a client expects in it (they
# exist, so such a create gets NODEEXISTS, as from ZooKeeper).
_READ_CREATE_WORLD = (ACL(Perm.READ | Perm.CREATE, Id("world", "anyone")),)


@attrs.frozen
class Rendering:
    """One service rendered from one snapshot entry: its instance directory and
    znodes (name -> data). ``entry`` is the snapshot's entry it was made from
    (compared by identity: entries never change), None for no entry."""

    entry: ServiceEntry | None
    directory: str
    children: Mapping[str, bytes]


class Projection:
    """Keeps ``engine``'s subtree at ``root`` equal to ``fanin``'s snapshot in ``layout``."""

    def __init__(
        self, engine: Engine, fanin: FanIn, root: str, layout: Layout, node_id: str,
        *, hide_failing: bool = True,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.fanin = fanin
        self.root = root
        self.layout = layout
        self.node_id = node_id
        # ServerSet members carry a status, so failing ones are shown as DEAD.
        self.hide_failing = hide_failing and layout.NAME != "serverset"
        self.client_paths: tuple[str, ...] = tuple(getattr(layout, "CLIENT_PATHS", ()))
        #: The policies rendered now, and their governance version (0: none).
        self.policies = PolicySet()
        self.policy_version = 0
        #: Per service in the snapshot, what :meth:`render` last wrote of it,
        #: so that inspection compares the tree with it instead of rendering
        #: every znode again. Its bytes are the tree's own (see :meth:`_remember`):
        #: the memory is one dict per service.
        self._renders: dict[str, Rendering] = {}

    def mount(self) -> None:
        """Reserve the root in the tree; raises ValueError if it is taken."""
        self.engine.mount_projection(self.root, open_paths=self.client_paths)

    async def run(
        self,
        policies: GovernanceFeed | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the fan-in (and ``policies``, where the layout renders them) until
        cancelled."""
        async with trio.open_nursery() as nursery:
            if policies is not None and getattr(self.layout, "governance", None) is not None:
                nursery.start_soon(self._follow_policies, policies)
            async with self.fanin.subscribe([EVERYTHING]) as updates:
                task_status.started()
                async for update in updates:
                    self.render(update.service)

    async def _follow_policies(self, feed: GovernanceFeed) -> None:
        async for version, policies in policy_sets(feed):
            old, self.policies, self.policy_version = self.policies, policies, version
            for service in sorted({name for name, _ in (*old.services, *policies.services)}):
                if old.service(service) != policies.service(service):
                    self.render(service)

    def rendered(self, service: str) -> tuple[str, dict[str, bytes]]:
        """``(directory, {znode name: data})``: what the current snapshot
        makes of ``service`` under this root (inspection compares the tree with it)."""
        children: dict[str, bytes] = {}
        for instance in self._shown(service):
            name, data = self.layout.render(self._marked(instance))
            children[name] = data
        return join(self.root, self.layout.directory(service)), children

    def rendering(self, service: str) -> Rendering:
        """What the tree should hold for ``service`` now: what :meth:`render` wrote,
        while the snapshot still holds the entry it rendered (the same entry
        renders the same bytes), else the current snapshot rendered anew (not
        kept: only what was written is)."""
        entry = self.fanin.snapshot.get(service)
        known = self._renders.get(service)
        if known is not None and known.entry is entry:
            return known
        directory, children = self.rendered(service)
        return Rendering(entry, directory, children)

    def _shown(self, service: str) -> list[Instance]:
        entry = self.fanin.snapshot.get(service)
        return [
            instance
            for instance in (() if entry is None else entry.instances.values())
            if not (self.hide_failing and instance.health is Health.FAILING)
        ]

    def governance(self, service: str) -> dict[str, dict[str, bytes]]:
        """``{directory: {znode name: data}}``: what the service's policy renders to in
        this layout (nothing for a layout without ``governance``)."""
        render = getattr(self.layout, "governance", None)
        if render is None:
            return {}
        rendered = render(service, self._shown(service), self.policies.effective(service))
        return {join(self.root, relative): children for relative, children in rendered.items()}

    def render(self, service: str) -> None:
        """Re-render one service from the current snapshot."""
        entry = self.fanin.snapshot.get(service)
        directory, children = self.rendered(service)
        self.engine.sync_projection(
            directory, children, keep=entry is not None and bool(self.client_paths),
            beside=self._beside(service, directory), beside_children=self.governance(service),
        )  # fmt: skip
        self._remember(service, entry, directory, children)
        log.debug("projected a service", extra={
            "service": service, "instances": len(children), "path": directory,
        })  # fmt: skip

    def _remember(
        self, service: str, entry: ServiceEntry | None, directory: str, children: dict[str, bytes]
    ) -> None:
        """Keep what was just written, for :meth:`rendering`. A znode whose bytes
        did not change keeps the object kept before, which is the one the tree
        holds (the tree keeps unchanged data, and stores new data as given), so
        the bytes are not held twice."""
        if entry is None:
            self._renders.pop(service, None)  # nothing to show renders to nothing: cheap
            return
        known = self._renders.get(service)
        if known is not None:
            before = known.children
            for name, data in children.items():
                kept = before.get(name)
                if kept is not None and kept == data:
                    children[name] = kept  # a value replaced, no key added: safe while iterating
        self._renders[service] = Rendering(entry, directory, children)

    def _beside(self, service: str, directory: str) -> dict[str, tuple[ACL, ...]]:
        """The znodes kept with ``directory``, with their ACLs: the service's own
        znode and its other category directories (Dubbo's), open to clients'
        registrations where clients write and read-only elsewhere."""
        categories = getattr(self.layout, "categories", None)
        if categories is None:
            return {}
        beside: dict[str, tuple[ACL, ...]] = {parent_of(directory): _READ_CREATE_WORLD}
        for relative in categories(service):
            path = join(self.root, relative)
            opened = _opens_children(self.client_paths, relative)
            beside[path] = OPEN_WORLD if opened else READ_ONLY_WORLD
        return beside

    def _marked(self, instance: Instance) -> Instance:
        metadata = Metadata({**instance.metadata, EXPORTED_BY: self.node_id})
        return attrs.evolve(instance, metadata=metadata)


def _opens_children(patterns: tuple[str, ...], relative: str) -> bool:
    """Whether ``patterns`` let clients make any child of the directory ``relative``."""
    names = relative.split("/")
    return any(
        len(pattern) == len(names) + 1
        and pattern[-1] == "*"
        and all(want in ("*", name) for want, name in zip(pattern, names, strict=False))
        for pattern in (p.split("/") for p in patterns)
    )
