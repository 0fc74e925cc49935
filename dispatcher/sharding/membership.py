"""Who the live Dispatchers are, and which services exist: kept in an existing distributed store.

Dispatcher shards register themselves in a store that already solves liveness and agreement
(ZooKeeper's ephemeral znodes, etcd's leases), never in a consensus of our own. Everyone who
needs the shard map (every Dispatcher and every Meta Server) reads the same things from that
store and feeds members and catalog to :func:`dispatcher.sharding.assignment.assign`, so they all
compute the same owner for every service without talking to each other:

* **members**: one record per live Dispatcher: its id, capacity weight, and the addresses of its
  subscription port and its ZooKeeper face;
* **the catalog**: the set of service names to assign. Bounded loads make the owner of one
  service depend on the whole set, so the set must be one shared fact, not each party's own
  idea of which services exist;
* **the epoch**: a number that only grows, and is the same for everyone who saw the same
  state of the store (so a proxy can tell an older answer from a newer one, and two Meta Servers
  answer with the same epoch); and the **inputs epoch**, the epoch of the last change of the
  members or the catalog (what the assignment depends on), equally the same for everyone;
* **warm markers**: each Dispatcher publishes the inputs epoch for which it has loaded every
  service assigned to it. The handover rule in :mod:`dispatcher.sharding.ownership` waits for
  it ("the
  new owner loads and warms a service before the old one drops it"). A marker names an inputs
  epoch, not the reader's own view of things, so a marker left from an earlier membership can
  never pass for a current one, and two readers who skipped different views still agree on
  whether it covers the current assignment.

Publishing a warm marker is an epoch change on purpose: it is the moment a handover completes,
when the old owner's and the new owner's answers change (the Dispatcher's ownership protocol
promises that the epoch grows whenever an answer may change). The assignment itself depends
only on members and catalog, so such an epoch moves no service.

Layout in the store (``root`` defaults to ``/zkgate``)::

    ZooKeeper                                    etcd (keys)
    <root>/members/<id>   ephemeral, JSON        <root>/members/<id>   bound to the member's lease
    <root>/services/<q>   persistent, empty      <root>/services/<q>   no lease, empty value
    <root>/warm/<id>      ephemeral, "<inputs>"  <root>/warm/<id>      bound to the lease
                                                 <root>/epoch          departures (see below)

A member record is ``{"subscribe_address": ..., "zookeeper_address": ..., "weight": ...}``
and never changes while its ZooKeeper session or etcd lease lives (re-registering with other
addresses is a leave and a join). ``<q>`` is the service name percent-encoded
(:func:`quote_service`), since a znode name cannot hold ``/``; etcd uses the same encoding
so that both stores hold the same catalog text.

The catalog only grows: any Dispatcher may add names (:meth:`MembershipStore.add_services`,
used when a subscriber asks a Dispatcher for a service nobody has cataloged, and for the
``[sharding] services`` seed list); only an operator removes them, by deleting the node or key.

The epoch (the inputs epoch is the same without the warm markers' part):

* ZooKeeper: the largest pzxid of ``<root>/members``, ``<root>/services`` and ``<root>/warm``.
  ZooKeeper stores the pzxid with the parent and updates it on every child creation and
  deletion, including the deletion of an ephemeral when its session expires, so every reader
  of the same state reads the same number, and it survives a restart of the ensemble. A warm
  marker is therefore rewritten as a delete and a create in one ``multi``, never a setData.
* etcd: ``max(create_revision of every member and catalog key, mod_revision of every warm
  marker and of <root>/epoch)``. A lease expiry deletes keys and leaves no trace in the key
  space, so a reader who starts after a departure could not tell it happened; every party that
  sees a member, catalog or warm key deleted (at revision D) therefore *stamps* it with one
  transaction, ``if mod_revision(<root>/epoch) < D: put <root>/epoch``, which only the first
  of them wins. Readers hold a view with an unstamped deletion back until the stamp arrives
  (``stamp_grace`` at most, for a store nobody can write to), so the new membership is only
  ever published with the new epoch. A graceful leave deletes its keys and stamps in the same
  transaction. The epoch is a function of the key space alone, so compaction of etcd's history
  does not disturb it. One window remains: a reader that *starts* between a lease expiry and
  its stamp (a few milliseconds) publishes the smaller membership under the old epoch once,
  until the stamp arrives.
* memory: a counter bumped on every change.

Threads: kazoo and python-etcd3 are blocking. Every call runs in a trio worker thread; their
watch callbacks and state listeners (on their own threads) only hand a note to the trio thread
(``TrioToken.run_sync_soon`` / ``trio.from_thread.run_sync``) and never wait, and all state
lives in the trio task. Views are published through :class:`ViewFeed`, which keeps only the
latest: a slow reader skips intermediate views and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol

import attrs
import trio

from dispatcher.sharding.assignment import Member

__all__ = [
    "DEFAULT_ROOT",
    "KINDS",
    "EtcdMembership",
    "MembershipConfig",
    "MembershipConfigError",
    "MembershipStore",
    "MemoryMembership",
    "MemoryStore",
    "Registration",
    "View",
    "ViewFeed",
    "ZooKeeperMembership",
    "open_membership",
    "owner_endpoints",
    "quote_service",
    "unquote_service",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT: Final = "/zkgate"
KINDS: Final = ("zookeeper", "etcd", "memory")
SUBSCRIBE: Final = "subscribe"
"""The :class:`Member` endpoint name of a Dispatcher's subscription port."""
ZOOKEEPER: Final = "zookeeper"
"""The :class:`Member` endpoint name of a Dispatcher's ZooKeeper face."""

_DEFAULT_SESSION_TIMEOUT: Final = 10.0
_DEFAULT_REQUEST_TIMEOUT: Final = 5.0
_MAX_PENDING_SERVICES: Final = 100_000
"""Catalog additions waiting to be written; more are dropped (with a log line) until the store
has caught up, so a flood of new names cannot grow memory without bound."""
_BATCH: Final = 256
"""Requests pipelined in one worker-thread call."""


class MembershipConfigError(ValueError):
    """A ``[membership]`` value is wrong; the message names the key."""


# --------------------------------------------------------------------------- values


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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ...

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


# --------------------------------------------------------------------------- config


@attrs.frozen
class MembershipConfig:
    """The ``[membership]`` table, shared by ``zkgate serve`` and ``zkgate meta``::

        [membership]
        kind = "zookeeper"            # zookeeper | etcd | memory
        address = "127.0.0.1:2181"    # ZooKeeper connect string, or etcd host:port
        root = "/zkgate"              # znode root / etcd key prefix
        session_timeout = 10.0        # ZooKeeper session timeout / etcd lease TTL, seconds
        stamp_grace = 2.0             # etcd: longest wait for a departure's stamp

    A Dispatcher that dies without leaving loses its services after ``session_timeout`` (plus,
    for etcd, up to half a second of lease-expiry granularity).
    """

    kind: str
    address: str = ""
    root: str = DEFAULT_ROOT
    session_timeout: float = _DEFAULT_SESSION_TIMEOUT
    stamp_grace: float = 2.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "membership") -> MembershipConfig:
        known = ("kind", "address", "root", "session_timeout", "stamp_grace")
        for key in table:
            if key not in known:
                raise MembershipConfigError(
                    f"{where}.{key}: unknown key (known here: {', '.join(known)})"
                )
        kind = table.get("kind")
        if kind not in KINDS:
            raise MembershipConfigError(
                f"{where}.kind: must be one of {', '.join(map(repr, KINDS))}, not {kind!r}"
            )
        address = table.get("address", "")
        if not isinstance(address, str):
            raise MembershipConfigError(f"{where}.address: must be a string")
        if kind != "memory" and not address:
            raise MembershipConfigError(f"{where}.address: required for kind {kind!r}")
        if kind == "etcd":
            try:
                _split_host_port(address)
            except ValueError as exc:
                raise MembershipConfigError(f"{where}.address: {exc}") from None
        root = table.get("root", DEFAULT_ROOT)
        if (
            not isinstance(root, str)
            or not root.startswith("/")
            or root.endswith("/")
            or "//" in root
        ):
            raise MembershipConfigError(
                f"{where}.root: must be an absolute path without a trailing '/', not {root!r}"
            )
        timeouts: dict[str, float] = {}
        for key, default in (("session_timeout", _DEFAULT_SESSION_TIMEOUT), ("stamp_grace", 2.0)):
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MembershipConfigError(f"{where}.{key}: must be a number of seconds")
            if not (math.isfinite(value) and value > 0):
                raise MembershipConfigError(f"{where}.{key}: must be > 0")
            timeouts[key] = float(value)
        return cls(kind, address, root, timeouts["session_timeout"], timeouts["stamp_grace"])


def _split_host_port(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, not {address!r}")
    return host, int(port)


def open_membership(
    config: MembershipConfig, *, memory: MemoryStore | None = None, watch_warm: bool = True
) -> MembershipStore:
    """A backend for ``config``. ``memory`` is the shared in-process store for kind memory (a
    fresh one if None). ``watch_warm=False`` skips reading the warm markers' values (Meta
    Servers do not need them; on ZooKeeper the warm directory is still read for the epoch)."""
    if config.kind == "zookeeper":
        return ZooKeeperMembership(
            config.address, config.root, config.session_timeout, watch_warm=watch_warm
        )
    if config.kind == "etcd":
        host, port = _split_host_port(config.address)
        return EtcdMembership(
            host, port, config.root, config.session_timeout, stamp_grace=config.stamp_grace
        )
    return MemoryMembership(memory if memory is not None else MemoryStore())


# --------------------------------------------------------------------------- memory


class MemoryStore:
    """The store itself for in-process membership: one per process (or per test).

    Handles (:class:`MemoryMembership`) play the part of sessions: a handle's registration
    and warm marker go away when its ``run`` ends, as an ephemeral znode goes with its session.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.inputs_epoch = 0
        self.members: dict[str, Registration] = {}
        self.catalog: set[str] = set()
        self.warm: dict[str, int] = {}
        self._handles: set[MemoryMembership] = set()

    def view(self) -> View:
        return View(
            self.epoch,
            tuple(self.members[i].member() for i in sorted(self.members)),
            frozenset(self.catalog),
            self.warm,
            inputs_epoch=self.inputs_epoch,
        )

    def add_services(self, names: Iterable[str]) -> None:
        """Add to the catalog (what an operator or a Dispatcher does)."""
        new = {name for name in names if name not in self.catalog}
        for name in new:
            quote_service(name)  # the same names as the real stores accept
        if new:
            self.catalog |= new
            self._inputs_changed()

    def remove_services(self, names: Iterable[str]) -> None:
        """Remove from the catalog (what only an operator does)."""
        gone = self.catalog & set(names)
        if gone:
            self.catalog -= gone
            self._inputs_changed()

    def _join(self, handle: MemoryMembership, registration: Registration) -> None:
        if self.members.get(registration.id) != registration:
            self.members[registration.id] = registration
            self.warm.pop(registration.id, None)
            self._inputs_changed()
        else:
            self._publish()

    def _leave(self, member_id: str) -> None:
        self.warm.pop(member_id, None)
        if self.members.pop(member_id, None) is not None:
            self._inputs_changed()
        else:
            self._publish()

    def _inputs_changed(self) -> None:
        self.epoch += 1
        self.inputs_epoch = self.epoch
        self._publish()

    def _set_warm(self, member_id: str, epoch: int) -> None:
        if member_id in self.members and self.warm.get(member_id) != epoch:
            self.warm[member_id] = epoch
            self.epoch += 1
            self._publish()

    def _publish(self) -> None:
        view = self.view()
        for handle in self._handles:
            handle.feed.publish(view)


class MemoryMembership:
    """A participant of a :class:`MemoryStore` (see :class:`MembershipStore`)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.feed = ViewFeed()
        self._registration: Registration | None = None
        self._running = False
        self._warm: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = self.store
        store._handles.add(self)
        self._running = True
        try:
            if self._registration is not None:
                store._join(self, self._registration)
                if self._warm is not None:
                    store._set_warm(self._registration.id, self._warm)
            self.feed.publish(store.view())
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            store._handles.discard(self)
            if self._registration is not None:
                store._leave(self._registration.id)

    def register(self, registration: Registration) -> None:
        old, self._registration = self._registration, registration
        if self._running:
            if old is not None and old.id != registration.id:
                self.store._leave(old.id)
            self.store._join(self, registration)

    def set_warm(self, epoch: int) -> None:
        self._warm = epoch
        if self._running and self._registration is not None:
            self.store._set_warm(self._registration.id, epoch)

    def add_services(self, names: Iterable[str]) -> None:
        self.store.add_services(names)


# ------------------------------------------------------------------------ shared bits


class _Wanted:
    """What a backend has been asked to write, kept until it is written (and after: a
    reconnect writes the registration and the warm marker again)."""

    def __init__(self) -> None:
        self.registration: Registration | None = None
        self.warm: int | None = None
        self.services: dict[str, None] = {}

    def add_services(self, names: Iterable[str]) -> None:
        for name in names:
            quote_service(name)  # refuse what no store can hold, at the caller
            if len(self.services) >= _MAX_PENDING_SERVICES:
                log.warning("too many catalog additions pending; dropping one",
                            extra={"service": name, "pending": len(self.services)})  # fmt: skip
                continue
            self.services[name] = None


class _Bell:
    """Wakes the backend's trio task; ringing never blocks and several rings fold into one."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[None](1)

    def ring(self) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(None)

    async def wait(self) -> None:
        await self._receive.receive()


class _Backoff:
    def __init__(self, initial: float = 0.2, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    async def sleep(self) -> None:
        delay = random.uniform(0, self._next)  # full jitter
        self._next = min(self.maximum, self._next * 2)
        await trio.sleep(delay)


# ------------------------------------------------------------------------- ZooKeeper


@attrs.define
class _ZkState:
    """What the ZooKeeper backend last read (trio thread only)."""

    members_pzxid: int = 0
    services_pzxid: int = 0
    warm_pzxid: int = 0
    members: dict[str, Registration] = attrs.field(factory=dict)
    catalog: frozenset[str] = frozenset()
    warm: dict[str, int] = attrs.field(factory=dict)


_ZK_PARTS: Final = frozenset({"members", "services", "warm"})


class ZooKeeperMembership:
    """Membership in ZooKeeper through kazoo (see the module docstring for the layout).

    Every watch firing names the part of the tree that changed (members, services or warm), and
    only that part is read again, with its watch re-armed by the read. On every (re)connection,
    after a session loss too, the registration and warm marker are written again and everything
    is re-read: kazoo 2.11 drops its watchers on a disconnect and does not replay them.
    """

    def __init__(
        self,
        hosts: str,
        root: str = DEFAULT_ROOT,
        session_timeout: float = _DEFAULT_SESSION_TIMEOUT,
        *,
        watch_warm: bool = True,
    ) -> None:
        self.hosts = hosts
        self.root = root
        self.session_timeout = session_timeout
        self.watch_warm = watch_warm
        self.feed = ViewFeed()
        self._wanted = _Wanted()
        self._bell = _Bell()
        # Parts to read again; everything at first.
        self._dirty: set[str] = set(_ZK_PARTS)
        self._write = True
        self._connected = False
        self._generation = 0
        self._state = _ZkState()
        # Replaced in run(): kazoo's watch callback for this run's client.
        self._watcher: Callable[[Any], None] = lambda event: None

    # -- intents -------------------------------------------------------------------

    def register(self, registration: Registration) -> None:
        self._wanted.registration = registration
        self._write = True
        self._bell.ring()

    def set_warm(self, epoch: int) -> None:
        if self._wanted.warm != epoch:
            self._wanted.warm = epoch
            self._write = True
            self._bell.ring()

    def add_services(self, names: Iterable[str]) -> None:
        self._wanted.add_services(names)
        self._write = True
        self._bell.ring()

    # -- paths ---------------------------------------------------------------------

    def _path(self, part: str, name: str | None = None) -> str:
        return f"{self.root}/{part}" if name is None else f"{self.root}/{part}/{name}"

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from kazoo.client import KazooClient
        from kazoo.retry import KazooRetry

        token = trio.lowlevel.current_trio_token()

        def post(function: Callable[..., None], *args: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(function, *args)

        self._generation += 1
        generation = self._generation
        client = KazooClient(
            hosts=self.hosts,
            timeout=self.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=2.0),
        )

        def listener(state: str) -> None:
            # kazoo's connection thread: must not block.
            post(self._note_state, generation, state)

        def watcher(event: Any) -> None:
            post(self._note_watch, generation, event.path)

        client.add_listener(listener)
        self._watcher = watcher
        task_status.started()
        try:
            await trio.to_thread.run_sync(client.start_async)
            while True:
                await self._bell.wait()
                await self._work(client)
        finally:
            self._connected = False
            self.feed.mark_disconnected()
            with trio.CancelScope(shield=True):
                # Closing the session deletes our ephemerals in one step: the member record
                # and warm marker go at once, and so do its services.
                await trio.to_thread.run_sync(_zk_close, client)

    def _note_state(self, generation: int, state: str) -> None:
        if generation != self._generation:
            return
        if state == "CONNECTED":
            self._connected = True
            self._write = True
            self._dirty = set(_ZK_PARTS)
        else:
            self._connected = False
            self.feed.mark_disconnected()
        self._bell.ring()

    def _note_watch(self, generation: int, path: str | None) -> None:
        if generation != self._generation or path is None:
            return
        for part in _ZK_PARTS:
            prefix = self._path(part)
            if path == prefix or path.startswith(prefix + "/"):
                self._dirty.add(part)
                if part == "members" and self._wanted.registration is not None:
                    # Our record may be what went (an operator, or the record of another
                    # process holding our id, whose session ended): write it again.
                    self._write = True
        self._bell.ring()

    async def _work(self, client: Any) -> None:
        from kazoo.exceptions import KazooException

        while self._connected and (self._write or self._dirty):
            write, self._write = self._write, False
            dirty, self._dirty = self._dirty, set()
            wanted = self._wanted
            services = list(wanted.services)
            try:
                result = await trio.to_thread.run_sync(
                    self._sync, client, write, dirty, wanted.registration, wanted.warm, services,
                    abandon_on_cancel=True,
                )  # fmt: skip
            except KazooException as exc:
                # A connection change under the read: the state listener reports it, and the
                # next CONNECTED re-reads everything. Anything else: try again shortly.
                log.warning("zookeeper request failed; retrying",
                            extra={"address": self.hosts, "error": str(exc)})  # fmt: skip
                self._write = self._write or write
                self._dirty |= dirty
                if self._connected:
                    await trio.sleep(0.2)
                continue
            for name in services:
                wanted.services.pop(name, None)
            self._apply(result)

    def _apply(self, result: dict[str, Any]) -> None:
        state = self._state
        if "members" in result:
            state.members_pzxid, state.members = result["members"]
        if "services" in result:
            state.services_pzxid, state.catalog = result["services"]
        if "warm" in result:
            state.warm_pzxid, state.warm = result["warm"]
        inputs = max(state.members_pzxid, state.services_pzxid)
        self.feed.publish(
            View(
                max(inputs, state.warm_pzxid),
                tuple(state.members[i].member() for i in sorted(state.members)),
                state.catalog,
                {i: e for i, e in state.warm.items() if i in state.members},
                # A read that was in flight when the connection dropped must not mark the
                # view fresh again.
                connected=self._connected,
                inputs_epoch=inputs,
            )
        )

    # -- in a worker thread ----------------------------------------------------------

    def _sync(
        self,
        client: Any,
        write: bool,
        dirty: set[str],
        registration: Registration | None,
        warm: int | None,
        services: list[str],
    ) -> dict[str, Any]:
        """Write what is wanted, then read the dirty parts (arming their watches)."""
        if write:
            for part in _ZK_PARTS:
                client.ensure_path(self._path(part))
            if registration is not None:
                self._register(client, registration)
                if warm is not None:
                    self._write_warm(client, registration.id, warm)
            self._create_services(client, services)
        result: dict[str, Any] = {}
        if "members" in dirty:
            result["members"] = self._read_members(client)
        if "services" in dirty:
            children, stat = self._children(client, self._path("services"))
            result["services"] = (stat.pzxid, frozenset(unquote_service(c) for c in children))
        if "warm" in dirty:
            result["warm"] = self._read_warm(client)
        return result

    def _children(self, client: Any, path: str) -> tuple[list[str], Any]:
        from kazoo.exceptions import NoNodeError

        try:
            return client.get_children(path, watch=self._watcher, include_data=True)
        except NoNodeError:
            # Deleted under us (an operator); the exists watch tells when it is back.
            client.exists(path, watch=self._watcher)
            return [], _NO_STAT

    def _register(self, client: Any, registration: Registration) -> None:
        from kazoo.exceptions import NodeExistsError, NoNodeError

        path = self._path("members", registration.id)
        data = registration.to_json()
        session_id = client.client_id[0] if client.client_id else None
        for _ in range(3):
            try:
                client.create(path, data, ephemeral=True)
                return
            except NodeExistsError:
                pass
            try:
                existing, stat = client.get(path)
            except NoNodeError:
                continue
            if stat.ephemeralOwner == session_id:
                if existing == data:
                    return
                # Re-registering with new addresses is a leave and a join.
                client.delete(path, version=stat.version)
                continue
            if existing == data:
                # Our own record from before a crash, still waiting for its session to
                # expire: take it over now rather than after the timeout.
                with contextlib.suppress(NoNodeError):
                    client.delete(path, version=stat.version)
                continue
            log.error(
                "member id registered by another process; waiting for it to go away",
                extra={"member": registration.id, "registered": existing.decode(errors="replace")},
            )
            client.exists(path, watch=self._watcher)
            return

    def _write_warm(self, client: Any, member_id: str, epoch: int) -> None:
        from kazoo.exceptions import NodeExistsError, NoNodeError

        path = self._path("warm", member_id)
        data = str(epoch).encode()
        for _ in range(3):
            try:
                current, _ = client.get(path)
            except NoNodeError:
                try:
                    client.create(path, data, ephemeral=True)
                    return
                except NodeExistsError:
                    continue
            if current == data:
                return
            # Delete and create in one multi: the parent's pzxid (the epoch) moves, which a
            # setData would not do.
            transaction = client.transaction()
            transaction.delete(path)
            transaction.create(path, data, ephemeral=True)
            if not any(isinstance(r, Exception) for r in transaction.commit()):
                return

    def _create_services(self, client: Any, services: list[str]) -> None:
        from kazoo.exceptions import NodeExistsError

        parent = self._path("services")
        for start in range(0, len(services), _BATCH):
            pending = [
                client.create_async(f"{parent}/{quote_service(name)}", b"")
                for name in services[start : start + _BATCH]
            ]
            for result in pending:
                with contextlib.suppress(NodeExistsError):
                    result.get()

    def _read_members(self, client: Any) -> tuple[int, dict[str, Registration]]:
        from kazoo.exceptions import NoNodeError

        parent = self._path("members")
        children, stat = self._children(client, parent)
        members: dict[str, Registration] = {}
        for start in range(0, len(children), _BATCH):
            names = children[start : start + _BATCH]
            pending = [client.get_async(f"{parent}/{name}") for name in names]
            for name, result in zip(names, pending, strict=True):
                try:
                    data, _ = result.get()
                except NoNodeError:
                    continue  # gone since the listing; its deletion fired our child watch
                try:
                    members[name] = Registration.from_json(name, data)
                except ValueError as exc:
                    log.warning("ignoring a member record", extra={
                        "path": f"{parent}/{name}", "member": name, "error": str(exc),
                    })  # fmt: skip
        return stat.pzxid, members

    def _read_warm(self, client: Any) -> tuple[int, dict[str, int]]:
        """The warm directory's pzxid (part of the epoch) and, if watched, the markers."""
        from kazoo.exceptions import NoNodeError

        parent = self._path("warm")
        children, stat = self._children(client, parent)
        warm: dict[str, int] = {}
        if not self.watch_warm:
            return stat.pzxid, warm
        for start in range(0, len(children), _BATCH):
            names = children[start : start + _BATCH]
            # No data watch: a marker is only ever replaced whole, which the child watch sees.
            pending = [client.get_async(f"{parent}/{n}") for n in names]
            for name, result in zip(names, pending, strict=True):
                try:
                    data, _ = result.get()
                    warm[name] = int(data)
                except NoNodeError:
                    continue
                except ValueError:
                    log.warning("ignoring a warm marker that is not an int",
                                extra={"path": f"{parent}/{name}", "member": name})  # fmt: skip
        return stat.pzxid, warm


@attrs.frozen
class _NoStat:
    pzxid: int = 0


_NO_STAT: Final = _NoStat()


def _zk_close(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.stop()
    with contextlib.suppress(Exception):
        client.close()


# ------------------------------------------------------------------------------ etcd


@attrs.define
class _EtcdState:
    """The etcd backend's picture of its prefix (trio thread only)."""

    #: member id -> (create_revision, registration)
    members: dict[str, tuple[int, Registration]] = attrs.field(factory=dict)
    #: service name -> create_revision
    services: dict[str, int] = attrs.field(factory=dict)
    #: member id -> (mod_revision, warm epoch)
    warm: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    #: mod_revision of <root>/epoch: the last stamped departure.
    stamped: int = 0
    #: Revisions of deletions not stamped yet, and when (trio time) each was seen.
    unstamped: dict[int, float] = attrs.field(factory=dict)

    def inputs_epoch(self) -> int:
        revisions = [rev for rev, _ in self.members.values()]
        revisions.extend(self.services.values())
        return max([self.stamped, *revisions])

    def epoch(self) -> int:
        return max([self.inputs_epoch(), *(rev for rev, _ in self.warm.values())])


class _EtcdGone(Exception):
    """The session's watch ended or the lease is gone: start a new session."""


class EtcdMembership:
    """Membership in etcd through python-etcd3 (see the module docstring for the layout).

    One session per connection: grant a lease (if registered) and write the member record and
    warm marker with it, read the whole prefix at one revision R, watch it from R+1, and keep the
    lease alive every third of its TTL. A failed request, a broken watch, or a keep-alive that
    finds the lease expired ends the session; the next one starts over with a new client (python-
    etcd3 refuses an endpoint for a while after it saw it fail) and, if the old lease is gone, a
    new one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        root: str = DEFAULT_ROOT,
        lease_ttl: float = _DEFAULT_SESSION_TIMEOUT,
        *,
        stamp_grace: float = 2.0,
        timeout: float = _DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.root = root
        self.lease_ttl = max(1, math.ceil(lease_ttl))
        self.stamp_grace = stamp_grace
        self.timeout = timeout
        self.feed = ViewFeed()
        self._wanted = _Wanted()
        self._bell = _Bell()
        self._lease_id: int | None = None
        self._written: tuple[Registration | None, int | None] = (None, None)

    # -- intents -------------------------------------------------------------------

    def register(self, registration: Registration) -> None:
        self._wanted.registration = registration
        self._bell.ring()

    def set_warm(self, epoch: int) -> None:
        self._wanted.warm = epoch
        self._bell.ring()

    def add_services(self, names: Iterable[str]) -> None:
        self._wanted.add_services(names)
        self._bell.ring()

    # -- keys ----------------------------------------------------------------------

    def _key(self, part: str, name: str = "") -> str:
        return f"{self.root}/{part}/{name}" if part != "epoch" else f"{self.root}/epoch"

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import etcd3  # noqa: F401  (fail here, loudly, if the client library is missing)

        task_status.started()
        backoff = _Backoff()
        try:
            while True:
                session = _EtcdSession(self, trio.lowlevel.current_trio_token())
                try:
                    await session.serve(backoff.reset)
                except Exception as exc:
                    log.warning(
                        "etcd session failed; reconnecting",
                        extra={"address": f"{self.host}:{self.port}", "error": _describe(exc)},
                    )
                finally:
                    await session.aclose()
                self.feed.mark_disconnected()
                await backoff.sleep()
        finally:
            self.feed.mark_disconnected()
            with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
                await trio.to_thread.run_sync(self._leave, abandon_on_cancel=True)

    def _leave(self) -> None:
        """Delete our keys and stamp the departure in one transaction, then drop the lease."""
        import etcd3

        registration, lease_id = self._wanted.registration, self._lease_id
        if registration is None or lease_id is None:
            return
        client = etcd3.client(self.host, self.port, timeout=self.timeout)
        try:
            member_key = self._key("members", registration.id)
            # Only our own record (bound to our lease): never a successor's.
            value, meta = client.get(member_key)
            ops = [client.transactions.delete(self._key("warm", registration.id))]
            compare = []
            if value is not None and meta.lease_id == lease_id:
                compare = [client.transactions.mod(member_key) == meta.mod_revision]
                ops += [
                    client.transactions.delete(member_key),
                    client.transactions.put(
                        self._key("epoch"), json.dumps({"left": registration.id})
                    ),
                ]
            client.transaction(compare=compare, success=ops, failure=[])
            client.revoke_lease(lease_id)
        except Exception as exc:
            log.warning("could not leave etcd cleanly; the lease will expire",
                        extra={"member": registration.id, "error": _describe(exc)})  # fmt: skip
        finally:
            client.close()


class _EtcdSession:
    def __init__(self, owner: EtcdMembership, token: trio.lowlevel.TrioToken) -> None:
        import etcd3

        self.owner = owner
        self.token = token
        self.client = etcd3.client(owner.host, owner.port, timeout=owner.timeout)
        self.state = _EtcdState()
        self.inbox_send, self.inbox = trio.open_memory_channel[Any](1024)
        self.overflowed = False
        #: Our own member record was deleted under us: a new session writes it again.
        self.lost_record = False
        self.watch_id: int | None = None
        self.prefix = owner.root + "/"

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)

    async def serve(self, on_connected: Callable[[], None]) -> None:
        registered = await self._write_registration()
        revision = await self._load()
        self.watch_id = await trio.to_thread.run_sync(self._watch, revision + 1)
        on_connected()
        self._publish()
        async with trio.open_nursery() as nursery:
            if registered:
                nursery.start_soon(self._keep_alive)
            nursery.start_soon(self._reconcile, nursery)
            nursery.start_soon(self._stamp_timer)
            while True:
                item = await self.inbox.receive()
                batch = [item]
                while True:
                    try:
                        batch.append(self.inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                if self.overflowed:
                    raise _EtcdGone("fell behind the watch stream; re-reading")
                for entry in batch:
                    if entry is None or isinstance(entry, BaseException):
                        raise _EtcdGone(_describe(entry) if entry else "watch ended")
                    self._on_response(entry)
                if self.lost_record:
                    raise _EtcdGone("our member record was deleted; registering again")
                await self._stamp()
                self._publish()

    # -- writing -------------------------------------------------------------------

    async def _write_registration(self) -> bool:
        """Write the registration and warm marker, if any; True if there was one."""
        owner = self.owner
        registration, warm = owner._wanted.registration, owner._wanted.warm
        if registration is None:
            return False
        if owner._lease_id is None or not await self._call(self._lease_alive, owner._lease_id):
            lease = await self._call(self.client.lease, owner.lease_ttl)
            owner._lease_id = lease.id
        await self._call(self._put_member, registration, owner._lease_id)
        if warm is not None:
            await self._call(self._put_warm, registration.id, warm, owner._lease_id)
        owner._written = (registration, warm)
        return True

    def _lease_alive(self, lease_id: int) -> bool:
        responses = list(self.client.refresh_lease(lease_id))
        return bool(responses) and responses[0].TTL > 0

    def _put_member(self, registration: Registration, lease_id: int) -> None:
        client, owner = self.client, self.owner
        key = owner._key("members", registration.id)
        data = registration.to_json()
        for _ in range(3):
            created, _ = client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, data, lease=lease_id)],
                failure=[],
            )
            if created:
                return
            existing, meta = client.get(key)
            if existing is None:
                continue
            if meta.lease_id == lease_id and existing == data:
                return
            if existing == data:
                # Our own record from before a crash (or a lost lease): bind it to our lease.
                # The key is kept, so its create_revision, and the epoch, do not change.
                swapped, _ = client.transaction(
                    compare=[client.transactions.mod(key) == meta.mod_revision],
                    success=[client.transactions.put(key, data, lease=lease_id)],
                    failure=[],
                )
                if swapped:
                    return
                continue
            if meta.lease_id == lease_id:
                # New addresses under the same lease: a leave and a join.
                client.transaction(
                    compare=[client.transactions.mod(key) == meta.mod_revision],
                    success=[client.transactions.delete(key)],
                    failure=[],
                )
                continue
            log.error(
                "member id registered by another process; "
                "waiting for its lease to expire",
                extra={"member": registration.id, "registered": existing.decode(errors="replace")},
            )
            return

    def _put_warm(self, member_id: str, epoch: int, lease_id: int) -> None:
        self.client.put(self.owner._key("warm", member_id), str(epoch), lease=lease_id)

    def _put_services(self, names: list[str]) -> None:
        client = self.client
        for name in names:
            key = self.owner._key("services", quote_service(name))
            client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, b"")],
                failure=[],
            )

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        owner = self.owner
        while True:
            # A pass first, without waiting: a ring the previous session took may have left
            # work undone.
            wanted = owner._wanted
            if wanted.registration != owner._written[0]:
                if owner._written[0] is not None:
                    # Registered again with another id or other addresses (rare): a new
                    # session does it all, from a clean slate.
                    raise _EtcdGone("registration changed")
                # Registered after the session started (a gateway joins once its ports are
                # bound): join now, and keep the lease alive from here on.
                await self._write_registration()
                nursery.start_soon(self._keep_alive)
            if wanted.registration is not None and wanted.warm != owner._written[1]:
                assert owner._lease_id is not None
                warm = wanted.warm
                if warm is not None:
                    await self._call(self._put_warm, wanted.registration.id, warm, owner._lease_id)
                owner._written = (wanted.registration, warm)
            if wanted.services:
                names = list(wanted.services)
                await self._call(self._put_services, names)
                for name in names:
                    wanted.services.pop(name, None)
            await owner._bell.wait()

    async def _keep_alive(self) -> None:
        owner = self.owner
        assert owner._lease_id is not None
        while True:
            await trio.sleep(owner.lease_ttl / 3)
            if not await self._call(self._lease_alive, owner._lease_id):
                owner._lease_id = None
                raise _EtcdGone("lease expired")

    # -- reading -------------------------------------------------------------------

    async def _load(self) -> int:
        revision, kvs = await self._call(self._range)
        for key, value, create_revision, mod_revision in kvs:
            self._put(key, value, create_revision, mod_revision)
        return revision

    def _range(self) -> tuple[int, list[tuple[bytes, bytes, int, int]]]:
        import etcd3.utils

        start = self.prefix.encode()
        end = etcd3.utils.prefix_range_end(start)
        revision = 0
        kvs: list[tuple[bytes, bytes, int, int]] = []
        while True:
            response = self.client.get_range_response(
                start, end, limit=1000, revision=revision or None
            )
            revision = revision or response.header.revision
            kvs.extend((kv.key, kv.value, kv.create_revision, kv.mod_revision)
                       for kv in response.kvs)  # fmt: skip
            if not response.more or not response.kvs:
                return revision, kvs
            start = response.kvs[-1].key + b"\x00"

    def _watch(self, start_revision: int) -> int:
        inbox, token = self.inbox_send, self.token

        def post(item: Any) -> None:
            try:
                inbox.send_nowait(item)
            except trio.WouldBlock:
                self.overflowed = True  # the reader wakes (the inbox is full) and re-reads
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        def deliver(response_or_error: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(post, response_or_error, trio_token=token)

        return self.client.add_watch_prefix_callback(
            self.prefix, deliver, start_revision=start_revision
        )

    def _split(self, key: bytes) -> tuple[str, str] | None:
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        rest = text[len(self.prefix) :]
        if rest == "epoch":
            return "epoch", ""
        part, slash, name = rest.partition("/")
        if not slash or not name or "/" in name or part not in ("members", "services", "warm"):
            return None
        return part, name

    def _put(self, key: bytes, value: bytes, create_revision: int, mod_revision: int) -> None:
        where = self._split(key)
        if where is None:
            return
        part, name = where
        state = self.state
        if part == "epoch":
            state.stamped = mod_revision
            for revision in [r for r in state.unstamped if r <= mod_revision]:
                del state.unstamped[revision]
        elif part == "members":
            try:
                state.members[name] = (create_revision, Registration.from_json(name, value))
            except ValueError as exc:
                log.warning("ignoring a member record", extra={
                    "key": key.decode(errors="replace"), "member": name, "error": str(exc),
                })  # fmt: skip
                state.members.pop(name, None)
        elif part == "services":
            state.services[unquote_service(name)] = create_revision
        else:
            try:
                state.warm[name] = (mod_revision, int(value))
            except ValueError:
                log.warning("ignoring a warm marker that is not an int", extra={
                    "key": key.decode(errors="replace"), "member": name,
                })  # fmt: skip

    def _delete(self, key: bytes, revision: int) -> None:
        where = self._split(key)
        if where is None:
            return
        part, name = where
        state = self.state
        if part == "members":
            if state.members.pop(name, None) is not None and revision > state.stamped:
                state.unstamped[revision] = trio.current_time()
            registration = self.owner._wanted.registration
            if registration is not None and registration.id == name:
                self.lost_record = True
        elif part == "services":
            gone = state.services.pop(unquote_service(name), None) is not None
            if gone and revision > state.stamped:
                state.unstamped[revision] = trio.current_time()
        elif part == "warm":
            if state.warm.pop(name, None) is not None and revision > state.stamped:
                state.unstamped[revision] = trio.current_time()
        elif part == "epoch":
            state.stamped = 0  # an operator reset it; the creates still carry the epoch

    def _on_response(self, response: Any) -> None:
        import etcd3.events

        for event in response.events:
            if isinstance(event, etcd3.events.DeleteEvent):
                self._delete(event.key, event.mod_revision)
            else:
                self._put(event.key, event.value, event.create_revision, event.mod_revision)

    async def _stamp(self) -> None:
        """Stamp the newest unstamped departure (one transaction stamps them all)."""
        if not self.state.unstamped:
            return
        newest = max(self.state.unstamped)
        client, key = self.client, self.owner._key("epoch")
        await self._call(
            lambda: client.transaction(
                compare=[client.transactions.mod(key) < newest],
                success=[client.transactions.put(key, json.dumps({"departure": newest}))],
                failure=[],
            )
        )

    async def _stamp_timer(self) -> None:
        """Publish a view held back for a stamp that does not come (nobody could write it)."""
        grace = self.owner.stamp_grace
        while True:
            unstamped = self.state.unstamped
            if not unstamped:
                await trio.sleep(grace / 4)
                continue
            oldest = min(unstamped.values())
            await trio.sleep_until(oldest + grace)
            if unstamped and min(unstamped.values()) + grace <= trio.current_time():
                log.warning("a departure was never stamped; publishing the new "
                            "membership under the old epoch",
                            extra={"revision": max(unstamped)})  # fmt: skip
                unstamped.clear()
                self._publish()

    def _publish(self) -> None:
        state = self.state
        if state.unstamped:
            return  # see the module docstring: no new membership under an old epoch
        self.owner.feed.publish(
            View(
                state.epoch(),
                tuple(state.members[i][1].member() for i in sorted(state.members)),
                frozenset(state.services),
                {i: e for i, (_, e) in state.warm.items() if i in state.members},
                inputs_epoch=state.inputs_epoch(),
            )
        )

    async def aclose(self) -> None:
        self.inbox_send.close()
        client, watch_id = self.client, self.watch_id

        def close() -> None:
            if watch_id is not None:
                with contextlib.suppress(Exception):
                    client.cancel_watch(watch_id)
            client.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc) or type(exc).__name__
