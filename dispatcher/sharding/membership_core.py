"""The values every membership backend shares: records, views, the feed, the store interface.

:mod:`dispatcher.sharding.membership` is the public face (it re-exports these, parses the
``[membership]`` table and opens a backend); the backends live beside it, one module each
(:mod:`~dispatcher.sharding.membership_zookeeper`, :mod:`~dispatcher.sharding.membership_etcd`,
:mod:`~dispatcher.sharding.membership_memory`), and import only from here, never from each
other, so none of them can reach into another's state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from types import MappingProxyType
from typing import Final, Protocol

import attrs
import trio

from dispatcher.sharding.assignment import Member

__all__ = [
    "BATCH",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_ROOT",
    "DEFAULT_SESSION_TIMEOUT",
    "SUBSCRIBE",
    "ZOOKEEPER",
    "Bell",
    "MembershipStore",
    "PendingWrites",
    "Registration",
    "View",
    "ViewFeed",
    "owner_endpoints",
    "quote_service",
    "unquote_service",
]

# One logger for the whole family, under the public module's name: a logging configuration
# written for the single module it used to be keeps working.
log = logging.getLogger("dispatcher.sharding.membership")

DEFAULT_ROOT: Final = "/zkgate"
SUBSCRIBE: Final = "subscribe"
"""The :class:`Member` endpoint name of a Dispatcher's subscription port."""
ZOOKEEPER: Final = "zookeeper"
"""The :class:`Member` endpoint name of a Dispatcher's ZooKeeper face."""

DEFAULT_SESSION_TIMEOUT: Final = 10.0
DEFAULT_REQUEST_TIMEOUT: Final = 5.0
MAX_PENDING_SERVICES: Final = 100_000
"""Catalog additions waiting to be written; more are dropped (with a log line) until the store
has caught up, so a flood of new names cannot grow memory without bound."""
BATCH: Final = 256
"""Requests pipelined in one round trip to the store."""


def quote_service(name: str) -> str:
    """The name as it appears in the store: percent-encoded, so ``/`` and control characters
    (which a znode name cannot hold) become ``%2F`` and the like. ``.`` and ``..`` are refused:
    ZooKeeper reserves them as path components."""
    if not name or name in (".", ".."):
        raise ValueError(f"service name {name!r} cannot be cataloged")
    return urllib.parse.quote(name, safe="")


def unquote_service(text: str) -> str:
    return urllib.parse.unquote(text)


@attrs.frozen
class Registration:
    """What a Dispatcher publishes about itself.

    ``subscribe_address`` and ``zookeeper_address`` are ``host:port`` as proxies and ZooKeeper
    clients should dial them (the advertised addresses, not necessarily the bound ones).
    """

    id: str
    subscribe_address: str = ""
    zookeeper_address: str = ""
    weight: float = attrs.field(default=1.0, converter=float)

    def __attrs_post_init__(self) -> None:
        if not self.id or "/" in self.id or self.id in (".", ".."):
            raise ValueError(f"member id {self.id!r} must be non-empty and contain no '/'")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"member weight must be finite and > 0, got {self.weight!r}")

    def to_json(self) -> bytes:
        return json.dumps(
            {"subscribe_address": self.subscribe_address,
             "zookeeper_address": self.zookeeper_address, "weight": self.weight},
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip

    @classmethod
    def from_json(cls, member_id: str, raw: bytes) -> Registration:
        """Parse a member record; ``ValueError`` if it is not one."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"member {member_id!r}: record is not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"member {member_id!r}: record is not a JSON object")
        subscribe = obj.get("subscribe_address", "")
        zookeeper = obj.get("zookeeper_address", "")
        weight = obj.get("weight", 1.0)
        if not isinstance(subscribe, str) or not isinstance(zookeeper, str):
            raise ValueError(f"member {member_id!r}: addresses must be strings")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"member {member_id!r}: weight must be a number")
        return cls(member_id, subscribe, zookeeper, weight)

    def member(self) -> Member:
        """This registration as :func:`~dispatcher.sharding.assignment.assign` takes it."""
        return Member(
            self.id,
            self.weight,
            {SUBSCRIBE: self.subscribe_address, ZOOKEEPER: self.zookeeper_address},
        )


def owner_endpoints(member: Member) -> tuple[str, str]:
    """``(subscribe_address, zookeeper_address)`` of a member ("" where it published none)."""
    endpoints = dict(member.endpoints)
    return endpoints.get(SUBSCRIBE, ""), endpoints.get(ZOOKEEPER, "")


def _frozen_map(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen(eq=False)
class View:
    """One consistent reading of the store.

    ``members`` are sorted by id; ``catalog`` is the set of service names; ``warm`` maps a
    member id to the inputs epoch for which it has loaded every service assigned to it (a
    member that published none is absent). ``inputs_epoch`` is the epoch of the last change of
    members or catalog (None: the same as ``epoch``). ``connected`` is False while the store
    cannot be reached: the view is then the last one read, kept and served, and marked stale.
    """

    epoch: int
    members: tuple[Member, ...] = ()
    catalog: frozenset[str] = frozenset()
    warm: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_map)
    connected: bool = True
    inputs_epoch: int = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.inputs_epoch is None:
            object.__setattr__(self, "inputs_epoch", self.epoch)

    def same_shards(self, other: View | None) -> bool:
        """True if ``other`` has the same epoch, members and catalog (warm and connected aside)."""
        return (
            other is not None
            and other.epoch == self.epoch
            and other.members == self.members
            and other.catalog == self.catalog
        )

    def same_inputs(self, other: View | None) -> bool:
        """True if ``other`` has the same inputs epoch, members and catalog: the same
        assignment, whatever the epochs and warm markers."""
        return (
            other is not None
            and other.inputs_epoch == self.inputs_epoch
            and other.members == self.members
            and other.catalog == self.catalog
        )

    def member(self, member_id: str) -> Member | None:
        for member in self.members:
            if member.id == member_id:
                return member
        return None


class ViewFeed:
    """The latest :class:`View`, and a way to wait for the next one.

    Only the newest view is kept: a reader that is slow skips the ones in between, which is
    what every reader here wants (they all recompute from the whole view).
    """

    def __init__(self) -> None:
        self._view: View | None = None
        self._serial = 0
        self._changed = trio.Event()

    @property
    def view(self) -> View | None:
        return self._view

    def publish(self, view: View) -> None:
        """Make ``view`` current (a view equal in everything to the current one is dropped)."""
        current = self._view
        if (
            current is not None
            and view.same_shards(current)
            and view.connected == current.connected
            and dict(view.warm) == dict(current.warm)
        ):
            return
        if current is not None and view.epoch < current.epoch:
            # A reconnect may read a store that lost recent writes (a restored backup):
            # an epoch going backwards would make proxies drop every newer answer.
            log.warning(
                "epoch went backwards; keeping the newer one",
                extra={"epoch": view.epoch, "kept_epoch": current.epoch},
            )
            view = attrs.evolve(
                view, epoch=current.epoch, inputs_epoch=min(view.inputs_epoch, current.epoch)
            )
        self._view = view
        self._serial += 1
        self._changed.set()
        self._changed = trio.Event()

    def mark_disconnected(self) -> None:
        if self._view is not None and self._view.connected:
            self.publish(attrs.evolve(self._view, connected=False))

    async def wait_newer(self, serial: int) -> tuple[int, View]:
        """Wait until a view newer than ``serial`` is published; return it with its serial."""
        while self._serial <= serial or self._view is None:
            await self._changed.wait()
        return self._serial, self._view

    async def __aiter__(self) -> AsyncIterator[View]:
        serial = 0
        while True:
            serial, view = await self.wait_newer(serial)
            yield view


class MembershipStore(Protocol):
    """A membership backend: run it in a nursery, then read views and state intents.

    ``run`` connects, keeps the registration (if any) alive, writes what was asked, and
    publishes views into ``feed`` until cancelled; on cancellation it leaves gracefully (the
    member record and warm marker are deleted at once, so its services move without waiting
    for a timeout). It calls ``task_status.started()`` before connecting: a store that is down
    must not stop a Dispatcher or a Meta Server from starting, they serve without a view.

    The other methods only record what is wanted and return at once; ``run`` carries it out,
    also again after a reconnect or a session loss.
    """

    feed: ViewFeed

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def register(self, registration: Registration) -> None:
        """Join as a member (replacing an earlier registration of this handle)."""
        ...

    def set_warm(self, epoch: int) -> None:
        """Publish this member's warm marker: the inputs epoch for which it has loaded every
        service assigned to it (ignored unless registered)."""
        ...

    def add_services(self, names: Iterable[str]) -> None:
        """Add names to the shared catalog (names already there are left alone)."""
        ...


class PendingWrites:
    """What a backend has been asked to write, kept until it is written (and after: a
    reconnect writes the registration and the warm marker again)."""

    def __init__(self) -> None:
        self.registration: Registration | None = None
        self.warm: int | None = None
        self.services: dict[str, None] = {}

    def add_services(self, names: Iterable[str]) -> None:
        for name in names:
            quote_service(name)  # refuse what no store can hold, at the caller
            if len(self.services) >= MAX_PENDING_SERVICES:
                log.warning("too many catalog additions pending; dropping one",
                            extra={"service": name, "pending": len(self.services)})  # fmt: skip
                continue
            self.services[name] = None


class Bell:
    """Wakes a backend's task; ringing never blocks and several rings fold into one."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[None](1)

    def ring(self) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(None)

    async def wait(self) -> None:
        await self._receive.receive()
