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
"""

from __future__ import annotations

import logging

import attrs
import trio

from dispatcher.fanin import EXPORTED_BY, FanIn
from dispatcher.model import Health, Instance, Metadata
from dispatcher.subscriptions import EVERYTHING
from dispatcher.upstream import Layout
from dispatcher.zk.engine import Engine
from dispatcher.zk.paths import join

log = logging.getLogger(__name__)


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

    def mount(self) -> None:
        """Reserve the root in the tree; raises ValueError if it is taken."""
        self.engine.mount_projection(self.root)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.fanin.subscribe([EVERYTHING]) as updates:
            task_status.started()
            async for update in updates:
                self.render(update.service)

    def render(self, service: str) -> None:
        """Re-render one service from the current snapshot."""
        entry = self.fanin.snapshot.get(service)
        children: dict[str, bytes] = {}
        for instance in () if entry is None else entry.instances.values():
            if self.hide_failing and instance.health is Health.FAILING:
                continue
            name, data = self.layout.render(self._marked(instance))
            children[name] = data
        directory = join(self.root, self.layout.directory(service))
        self.engine.sync_projection(directory, children)
        log.debug("projected a service", extra={
            "service": service, "instances": len(children), "path": directory,
        })  # fmt: skip

    def _marked(self, instance: Instance) -> Instance:
        metadata = Metadata({**instance.metadata, EXPORTED_BY: self.node_id})
        return attrs.evolve(instance, metadata=metadata)
