"""The sidecar process: one control plane, one table and one forwarder per service.

:class:`Sidecar` wires the pieces together and owns their tasks:
the :class:`~proxy.control.ControlPlane` fills the
:class:`~proxy.endpoints.ServiceTable` of each configured service, and the
:class:`~proxy.forward.ServiceForwarder` of that service routes the
application's connections with it. An endpoint the forwarder ejects is
reported through the control plane to the Dispatcher that owns the service.
The policies the Dispatchers send (:mod:`proxy.policy`) are applied to each
service's forwarder as they arrive, and acknowledged.

The listeners open first, before the control plane has answered, so an
application that starts alongside its sidecar can connect at once; its
first connections wait (``ForwardSettings.endpoint_wait``) for endpoints.

Registered for mesh onboarding (``SidecarConfig.register``), the sidecar also writes its
listen address for each service into zkgate's ZooKeeper face (:mod:`proxy.registration`),
and reports each service's outcomes on the mesh path to the Dispatchers
(:mod:`proxy.outcomes`), which roll the consumer back to the direct path when they are bad.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

import attrs
import trio

from dispatcher import wire
from proxy import balancer
from proxy.control import ControlPlane, ControlSettings
from proxy.endpoints import ServiceTable
from proxy.forward import ForwardSettings, ListenAddress, ServiceForwarder
from proxy.outcomes import OutcomeCounter, OutcomeReporter
from proxy.outlier import OutlierDetector, OutlierPolicy
from proxy.policy import Defaults, ServicePolicy
from proxy.registration import RegistrationSettings, SidecarRegistration
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
    #: The zone this proxy runs in, for the policies' zone affinity ("" unknown).
    zone: str = ""
    #: Register in zkgate's ZooKeeper face as this host's sidecar (and report the mesh
    #: path's outcomes); None: neither.
    register: RegistrationSettings | None = None

    def __attrs_post_init__(self) -> None:
        if not self.services:
            raise ValueError("at least one --service NAME=LISTEN is needed")
        if self.balancer not in balancer.BALANCERS:
            raise ValueError(f"unknown balancer {self.balancer!r}; "
                             f"expected one of {', '.join(balancer.BALANCERS)}")  # fmt: skip
        if len(self.control.application) > wire.MAX_CLIENT_ID:
            raise ValueError(f"the application name is longer than {wire.MAX_CLIENT_ID} "
                             "characters")  # fmt: skip
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; expected one of "
                             f"{', '.join(ENGINES)}")  # fmt: skip
        if self.register is not None:
            unix = sorted(name for name, address in self.services.items() if address.is_unix)
            if unix:
                raise ValueError(f"a registered sidecar listens on TCP (consumers connect to "
                                 f"it): service {unix[0]!r} listens on a Unix socket")  # fmt: skip


class Sidecar:
    """A running proxy; see the module docstring."""

    def __init__(self, config: SidecarConfig, *, rng: random.Random | None = None) -> None:
        """``rng`` draws the balancers' and splits' choices (seeded in tests)."""
        self.config = config
        rng = rng or random.Random()
        self.tables = {name: ServiceTable(name) for name in config.services}
        defaults = Defaults(config.forward, config.balancer, config.outlier, config.zone)
        #: Each service's governance policy (none until its Dispatcher sends one).
        self.policies = {name: ServicePolicy(name, defaults, rng) for name in config.services}
        self.control = ControlPlane(config.meta, self.tables, config.control,
                                    on_policy=self._apply_policy)  # fmt: skip
        self.outlier = OutlierDetector(config.outlier)
        #: The copying thread of the "epoll" engine (shared by every service).
        self.splicer = EpollSplicer(config.forward.chunk) if config.engine == "epoll" else None
        #: Each service's outcomes on the mesh path (registered sidecars only).
        self.outcomes: dict[str, OutcomeCounter] = {}
        if config.register is not None:
            self.outcomes = {name: OutcomeCounter(name) for name in config.services}
        self.reporter = OutcomeReporter(
            self.outcomes, self.control.send_outcomes, application=config.control.application
        )
        #: The registration in the ZooKeeper face, once running (registered sidecars only).
        self.registration: SidecarRegistration | None = None
        self.forwarders = {
            name: ServiceForwarder(
                self.tables[name], balancer.make(config.balancer, rng), self.outlier,
                config.forward, on_eject=self.control.report, splicer=self.splicer,
                policy=self.policies[name], outcomes=self.outcomes.get(name),
            )
            for name in config.services
        }  # fmt: skip
        #: Where each service listens, once :meth:`run` started (the real port for port 0).
        self.listening: dict[str, ListenAddress] = {}

    def _apply_policy(self, service: str, version: int, policy: Mapping[str, Any]) -> bool:
        found = self.policies.get(service)
        return found is not None and found.apply(version, policy)

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
            if self.config.register is not None:
                self.registration = SidecarRegistration(self.config.register, {
                    name: wire.join_address(
                        self.config.register.host if _wildcard(address.host) else address.host,
                        address.port,
                    )
                    for name, address in self.listening.items()
                })  # fmt: skip
                await nursery.start(self.registration.run)
                await nursery.start(self.reporter.run)
            task_status.started(dict(self.listening))


def _wildcard(host: str) -> bool:
    """A listen host that is no address a consumer could connect to."""
    return host in ("", "0.0.0.0", "::")
