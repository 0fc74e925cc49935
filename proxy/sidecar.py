"""The sidecar process: one control plane, one table and one forwarder per service.

:class:`Sidecar` wires the pieces together and owns their tasks:
the :class:`~proxy.control.ControlPlane` fills the
:class:`~proxy.endpoints.ServiceTable` of each configured service, and the
:class:`~proxy.forward.ServiceForwarder` of that service routes the
application's connections with it. An endpoint the forwarder ejects is
reported through the control plane to the Dispatcher that owns the service.

The listeners open first, before the control plane has answered, so an
application that starts alongside its sidecar can connect at once; its
first connections wait (``ForwardSettings.endpoint_wait``) for endpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs
import trio

from proxy import balancer
from proxy.control import ControlPlane, ControlSettings
from proxy.endpoints import ServiceTable
from proxy.forward import ForwardSettings, ListenAddress, ServiceForwarder
from proxy.outlier import OutlierDetector, OutlierPolicy
from proxy.splicer import EpollSplicer

__all__ = ["ENGINES", "Sidecar", "SidecarConfig"]

#: Data-plane engines (``--engine``).
ENGINES: Final = ("epoll", "trio")


@attrs.frozen
class SidecarConfig:
    """Everything ``zkgate proxy`` is told on its command line."""

    meta: str
    #: Service name -> where the application reaches it through this proxy.
    services: Mapping[str, ListenAddress]
    balancer: str = "wrr"
    control: ControlSettings = attrs.field(factory=ControlSettings)
    forward: ForwardSettings = attrs.field(factory=ForwardSettings)
    outlier: OutlierPolicy = attrs.field(factory=OutlierPolicy)
    #: The data-plane engine: "epoll" (one copying thread; see proxy.splicer) or
    #: "trio" (a pair of tasks per connection; see proxy.forward).
    engine: str = "epoll"

    def __attrs_post_init__(self) -> None:
        if not self.services:
            raise ValueError("at least one --service NAME=LISTEN is needed")
        if self.balancer not in balancer.BALANCERS:
            raise ValueError(f"unknown balancer {self.balancer!r}; "
                             f"expected one of {', '.join(balancer.BALANCERS)}")  # fmt: skip
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; expected one of "
                             f"{', '.join(ENGINES)}")  # fmt: skip


class Sidecar:
    """A running proxy; see the module docstring."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.tables = {name: ServiceTable(name) for name in config.services}
        self.control = ControlPlane(config.meta, self.tables, config.control)
        self.outlier = OutlierDetector(config.outlier)
        #: The copying thread of the "epoll" engine (shared by every service).
        self.splicer = EpollSplicer(config.forward.chunk) if config.engine == "epoll" else None
        self.forwarders = {
            name: ServiceForwarder(
                self.tables[name], balancer.make(config.balancer), self.outlier,
                config.forward, on_eject=self.control.report, splicer=self.splicer,
            )
            for name in config.services
        }  # fmt: skip
        #: Where each service listens, once :meth:`run` started (the real port for port 0).
        self.listening: dict[str, ListenAddress] = {}

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, ListenAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and route until cancelled; ``task_status.started(listen addresses)``."""
        async with trio.open_nursery() as nursery:
            if self.splicer is not None:
                await nursery.start(self.splicer.run)
            for name, address in self.config.services.items():
                self.listening[name] = await nursery.start(self.forwarders[name].serve, address)
            await nursery.start(self.control.run)
            task_status.started(dict(self.listening))
