"""The ZooKeeper adapter: registrations under configured roots, one recursive watch per root.

A :class:`ZooKeeperUpstream` follows one ensemble through zkgate's trio-native
client (:mod:`dispatcher.zk.client`): one session, no threads. Each
configured root is read in one :mod:`adapters.layouts` layout:

* the root's children are the services (``layout.service_of`` of the child
  plus the layout's fixed tail: Dubbo's ``<interface>/providers``, the
  service's own directory for Curator, ServerSets and the plain layout);
* each wanted service's directory holds one znode per instance, read with
  ``layout.parse`` (Dubbo's instance is the znode *name*; Finagle reads only
  ``member_*`` znodes of a server set).

Services are the root's direct children: a ServerSet tree nested deeper
(``/aurora/<role>/<env>/<job>``) is configured with the parent of the jobs
as its root.

Watching. The session holds ONE persistent recursive watch per root
(``addWatch`` mode 1), whatever the number of services and instances, and
never re-arms anything: ZooKeeper sends NodeCreated, NodeDeleted and
NodeDataChanged for every znode below the root. An event for an instance
znode costs one read (``getData``; ``exists`` for Dubbo, whose znode data
means nothing but whose ``mzxid`` is the revision), or none for a deletion.
Events for directories re-list what they imply: a created service directory
is listed, a deleted one takes its instances with it. The price is that the
session also hears about services nobody here wants (a shard's share of a
big root); such events cost a dict lookup and no read.

Ordering. The client calls back synchronously, in the order the frames
arrived, so this module applies each event and each reply in that order,
in the reader's task, with no queue in between. A reply reflects at least
every change whose event arrived before it, but a read that was already in
flight when an event for its path arrived may carry the state from before
that change (the mirror, :mod:`dispatcher.zk.mirror`, calls such a load
*overtaken*). A stale answer must never win: one overtaken by a deletion is
thrown away (the event removed the znode), one overtaken by a creation or
data change counts only if its ``mzxid`` is newer than what is held (each
such event sent a read of its own; taking the newer answer meanwhile keeps a
znode written faster than a round trip moving forward). Directory listings
in flight ignore the names that events created or deleted meanwhile, and a
listing whose directory itself came or went is thrown away.
ZooKeeper 3.6+ never runs a read beside a commit, so against it these rules
only save redundant work; they keep the adapter right against servers that
give the ordering promise and nothing more.

Listings. On every connection (a new session, or the same one resumed:
ZooKeeper does not replay what a persistent watch missed while the
connection was down) the wanted services are listed again, ``getChildren``
and then ``getData`` pipelined with :meth:`ZooKeeperClient.submit` (a window
of :data:`_WINDOW` reads in flight, no await per znode), refreshing the
state in place, and one :class:`Listing` is emitted when the listing reads
are answered; the fan-in diffs it, so exactly the changes made meanwhile come
out, then ``Status(True)``. Changes found meanwhile are held back until the
Listing. ``Disconnected`` reports ``Status(False)`` and keeps the last state
(the session may survive); ``Expired`` is followed by a new session, which
adds its watches again. The client reconnects by itself, with backoff; a
refused credential ends the client, and a new one is started after a pause.

Interest. ``set_interest`` applies at once: narrowing forgets the dropped
services and emits nothing (the fan-in has already dropped them); widening
lists the new services and emits a ``Listing`` scoped to them (after a
listing in progress, if any). A service dropped and wanted again is
therefore always listed again. The watches do not change with interest.

Events go to the fan-in's channel at once when it has room. When it has
none, one task sends what is queued; incremental changes wait meanwhile as
a set of changed instance ids and are coalesced into one ``Changed``, so
the queue holds only listings and statuses, and is bounded (beyond
:data:`_MAX_BACKLOG` entries it is replaced by one complete Listing).

Services of the same name under two roots are merged into one service; if
two znodes claim the same instance id (a Dubbo provider re-registered with
new parameters while its old session's znode lingers), the one written last
(highest ``mzxid``) wins.

Each instance carries ``Source(adapter=<upstream name>, key=<path relative to
its root>, revision=<mzxid>)``. A znode whose name or data does not parse is
skipped with one log line per version of it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, Self

import attrs
import trio

from adapters.layouts import serverset
from dispatcher.backoff import Backoff
from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Change, Put, Remove
from dispatcher.core.upstream import (
    Changed,
    ConfigError,
    Inspection,
    Layout,
    Listing,
    Status,
    UpstreamEvent,
    check_type,
    layout_kind,
    reject_unknown,
    require,
)
from dispatcher.tls import ClientTls, client_context, parse_client_tls
from dispatcher.zk.client import (
    AddWatchMode,
    AuthFailed,
    Connected,
    ConnectionLost,
    Disconnected,
    Expired,
    KeeperError,
    Overloaded,
    Reply,
    SessionEvent,
    ZooKeeperClient,
    split_connect_string,
)
from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    AddWatchRequest,
    GetChildrenResponse,
    GetDataResponse,
    PathWatchRequest,
    StatResponse,
    WatcherEvent,
)
from dispatcher.zk.sasl_client import SaslCredentials, load_credentials

__all__ = ["RootConfig", "ZooKeeperUpstream", "ZooKeeperUpstreamConfig", "parse_config"]

log = logging.getLogger(__name__)

_DEFAULT_SESSION_TIMEOUT: Final = 10.0
#: Reads in flight at once: enough to hide the round trip, far below the
#: client's own bound, so that one huge directory never meets Overloaded.
_WINDOW: Final = 1000
#: Listings and statuses queued while the fan-in is not reading.
_MAX_BACKLOG: Final = 64

WatchKind = Literal["recursive"]
"""The one kind of upstream watch this adapter sets: persistent and recursive."""

_CREATED: Final = EventType.NODE_CREATED
_DELETED: Final = EventType.NODE_DELETED
_CHANGED: Final = EventType.NODE_DATA_CHANGED


# ------------------------------------------------------------------ configuration


@attrs.frozen
class RootConfig:
    """One watched root: an absolute znode path and the layout of what is under it."""

    path: str
    layout: str


@attrs.frozen
class ZooKeeperUpstreamConfig:
    """A ZooKeeper upstream's configuration, validated."""

    #: A ZooKeeper connect string: ``host[:port],...[/chroot]``.
    hosts: str
    roots: tuple[RootConfig, ...]
    session_timeout: float = _DEFAULT_SESSION_TIMEOUT
    #: ``(scheme, credential)`` pairs for ``addAuth``, sent again on every reconnect.
    auth: tuple[tuple[str, str], ...] = ()
    #: TLS to the ensemble's secure port (``tls = { ca, cert, key }``); None: plain text.
    tls: ClientTls | None = None
    #: DIGEST-MD5 user (``sasl_username``, ``sasl_password_file``); None: no SASL.
    sasl: SaslCredentials | None = None

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return split_connect_string(self.hosts)[0]

    @property
    def chroot(self) -> str:
        return split_connect_string(self.hosts)[1]


def _check_path(path: str, key: str, where: str) -> str:
    """``path`` as a canonical absolute znode path (no trailing slash), or ConfigError."""
    canonical = path.rstrip("/") or "/"
    if not path.startswith("/") or (
        canonical != "/" and any(part in {"", ".", ".."} for part in canonical.split("/")[1:])
    ):
        raise ConfigError(f"{where}: key {key!r} must be an absolute znode path, not {path!r}")
    return canonical


def _inside(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def parse_config(name: str, options: Mapping[str, Any]) -> ZooKeeperUpstreamConfig:
    """Validate a ``[upstream.<name>]`` table of kind ``zookeeper``."""
    where = f"upstream {name!r}"
    reject_unknown(
        options,
        ("hosts", "roots", "session_timeout", "auth", "tls", "sasl_username", "sasl_password_file"),
        where,
    )
    hosts = require(options, "hosts", str, where).strip()
    if not hosts:
        raise ConfigError(f"{where}: key 'hosts' must not be empty")
    try:
        split_connect_string(hosts)
    except ValueError as exc:
        raise ConfigError(f"{where}: key 'hosts' is not a connect string: {exc}") from exc

    roots: list[RootConfig] = []
    for index, table in enumerate(require(options, "roots", list, where)):
        key = f"roots[{index}]"
        check_type(table, key, Mapping, where)
        reject_unknown(table, ("path", "layout"), f"{where} {key}")
        path = _check_path(require(table, "path", str, f"{where} {key}"), f"{key}.path", where)
        layout = require(table, "layout", str, f"{where} {key}")
        try:
            layout_kind(layout)
        except ConfigError as exc:
            raise ConfigError(f"{where}: key '{key}.layout': {exc}") from None
        for other in roots:
            if _inside(path, other.path) or _inside(other.path, path):
                raise ConfigError(
                    f"{where}: key '{key}.path' {path!r} overlaps root {other.path!r}"
                )
        roots.append(RootConfig(path, layout))
    if not roots:
        raise ConfigError(f"{where}: key 'roots' must name at least one root")

    session_timeout = _DEFAULT_SESSION_TIMEOUT
    if "session_timeout" in options:
        session_timeout = check_type(options["session_timeout"], "session_timeout", float, where)
        if not session_timeout > 0:
            raise ConfigError(f"{where}: key 'session_timeout' must be > 0")

    auth: list[tuple[str, str]] = []
    for index, entry in enumerate(check_type(options.get("auth", []), "auth", list, where)):
        check_type(entry, f"auth[{index}]", str, where)
        scheme, colon, credential = entry.partition(":")
        if not scheme or not colon:
            raise ConfigError(f"{where}: key 'auth[{index}]' must be 'scheme:credential'")
        auth.append((scheme, credential))
    tls = None if "tls" not in options else parse_client_tls(options["tls"], f"{where}: tls")
    return ZooKeeperUpstreamConfig(
        hosts, tuple(roots), session_timeout, tuple(auth), tls, _parse_sasl(options, where)
    )


def _parse_sasl(options: Mapping[str, Any], where: str) -> SaslCredentials | None:
    """``sasl_username`` with ``sasl_password_file`` (both or neither); the
    password is read now, so a missing file stops the start."""
    if "sasl_username" not in options and "sasl_password_file" not in options:
        return None
    username = require(options, "sasl_username", str, where)
    password_file = require(options, "sasl_password_file", str, where)
    try:
        return load_credentials(username, Path(password_file).expanduser())
    except ValueError as exc:
        raise ConfigError(f"{where}: key 'sasl_password_file': {exc}") from None


# ------------------------------------------------------------------ the followed tree


@attrs.define(eq=False)
class _Root:
    """A configured root and the services under it."""

    #: The root as the server spells it (the chroot, if any, prepended).
    path: str
    #: The root as configured: what logs and diagnostics show.
    shown: str
    layout: Layout
    #: What follows the root's child in a service directory ("/providers" for Dubbo).
    tail: str
    #: Every service under the root (wanted or not): service -> its directory, relative.
    services: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def of(cls, config: RootConfig, chroot: str) -> _Root:
        layout = layout_kind(config.layout)
        # A service's directory is the root's child named after it, plus a
        # fixed tail; derive the tail from the layout rather than restate it.
        probe = "probe"
        directory = layout.directory(probe)
        if not directory.startswith(probe):
            raise AssertionError(f"layout {config.layout} puts services deeper than one level")
        path = chroot + config.path if config.path != "/" else chroot or "/"
        return cls(path, config.path, layout, directory.removeprefix(probe))

    def relative(self, path: str) -> str | None:
        """``path`` relative to the root ("" for the root itself), or None outside it."""
        root = self.path
        if path == root:
            return ""
        if root == "/":
            return path[1:]
        if path.startswith(root) and path[len(root) : len(root) + 1] == "/":
            return path[len(root) + 1 :]
        return None

    def absolute(self, relative: str) -> str:
        return f"{'' if self.path == '/' else self.path}/{relative}"

    def shown_path(self, relative: str) -> str:
        return f"{'' if self.shown == '/' else self.shown}/{relative}"

    def service_of_child(self, child: str) -> str | None:
        return self.layout.service_of(child + self.tail)

    def is_instance_name(self, name: str) -> bool:
        # Finagle reads only member_* znodes; other names in a set's
        # directory are not instances.
        return self.layout.NAME != serverset.NAME or name.startswith(serverset.MEMBER_PREFIX)

    @property
    def data_in_znodes(self) -> bool:
        return self.layout.NAME != "dubbo"


@attrs.frozen(eq=False)
class _Znode:
    """One instance znode as last read: its ``mzxid`` and what it parsed to.

    Compared by identity: it is also the claim its znode makes on an instance id.
    """

    revision: int
    instance: Instance | None


@attrs.define(eq=False)
class _Directory:
    """One wanted service's instance directory under one root."""

    root: _Root
    service: str
    #: Relative to the root.
    relative: str
    path: str
    znodes: dict[str, _Znode] = attrs.Factory(dict)


@attrs.define(eq=False)
class _Sweep:
    """A listing in progress: the reads it waits for, and what it covers.

    ``full`` sweeps follow a (re)connection: they list every wanted service
    from the roots down and end with ``Status(True)``. Partial ones list
    services that became wanted, from the services already known.
    """

    #: The services it lists (None: all).
    scope: frozenset[str] | None
    full: bool
    outstanding: int = 0


@attrs.define(eq=False)
class _ChildListing:
    """A ``getChildren`` queued or in flight, and what events did meanwhile."""

    path: str
    sweep: _Sweep | None
    #: Children created or deleted since it was queued: their events handled them.
    touched: set[str] = attrs.Factory(set)
    #: The listed node itself was created or deleted meanwhile: the answer is moot.
    overtaken: bool = False


@attrs.define(eq=False, slots=True)
class _Stamp:
    """Reads of one znode path queued or in flight, and the events for it since."""

    reads: int = 0
    events: int = 0
    deletions: int = 0


@attrs.define(eq=False, slots=True)
class _Read:
    opcode: int
    path: str
    handle: Callable[[Reply], None]
    generation: int


_Claims = _Znode | list[_Znode]
"""The znodes that claim one instance id: almost always one, so no list for it."""


def _winner(claims: _Claims) -> Instance:
    """The instance of the claim written last (highest ``mzxid``; the first among equals)."""
    znode = max(claims, key=lambda z: z.revision) if isinstance(claims, list) else claims
    assert znode.instance is not None
    return znode.instance


def _intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """Set intersection where None means "everything"."""
    if a is None:
        return b
    return a if b is None else a & b


def _contains(scope: frozenset[str] | None, service: str) -> bool:
    return scope is None or service in scope


# ------------------------------------------------------------------ sending events


class _Outbox:
    """Events to the fan-in, in order: at once when its channel has room.

    When the channel is full, events queue in a backlog that :meth:`drain`
    sends; meanwhile the tracker holds its incremental changes back (a set
    of changed ids, coalesced) and is asked for them again once the backlog
    is empty (``on_drained``). Only listings, statuses and at most one
    Changed ever queue, and beyond :data:`_MAX_BACKLOG` entries the backlog
    is replaced by one complete listing (``relist``) and the latest status.
    """

    def __init__(
        self,
        channel: trio.MemorySendChannel[UpstreamEvent],
        on_drained: Callable[[], None],
        relist: Callable[[], Listing],
    ) -> None:
        self._channel = channel
        self._on_drained = on_drained
        self._relist = relist
        self._backlog: deque[UpstreamEvent] = deque()
        self._draining = False
        self._wakeup = trio.Event()
        self._last_status: Status | None = None

    @property
    def blocked(self) -> bool:
        """Events are waiting: a new Changed would only queue behind them."""
        return self._draining or bool(self._backlog)

    def emit(self, event: UpstreamEvent) -> None:
        if not self.blocked:
            try:
                self._channel.send_nowait(event)
                return
            except trio.WouldBlock:
                pass
        self._backlog.append(event)
        if isinstance(event, Status):
            # Consecutive statuses: only the last one still says anything.
            while len(self._backlog) > 1 and isinstance(self._backlog[-2], Status):
                del self._backlog[-2]
        if len(self._backlog) > _MAX_BACKLOG:
            status = next((e for e in reversed(self._backlog) if isinstance(e, Status)), None)
            self._backlog.clear()
            self._backlog.append(self._relist())
            if status is not None:
                self._backlog.append(status)
        self._wakeup.set()

    def status(self, status: Status) -> None:
        if status != self._last_status:
            self._last_status = status
            self.emit(status)

    async def drain(self) -> None:
        """Send whatever queues, waiting for room; runs for as long as the upstream."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._draining = True
            while self._backlog:
                await self._channel.send(self._backlog.popleft())
            self._draining = False
            self._on_drained()


# ------------------------------------------------------------------ the tracker


class _Tracker:
    """The state of one running upstream, driven by its client's callbacks.

    Everything here runs in trio's thread, most of it synchronously inside
    the client's reader task (``on_watch``, ``on_session``, reply callbacks),
    which is what keeps events and replies in arrival order.
    """

    def __init__(
        self,
        name: str,
        config: ZooKeeperUpstreamConfig,
        events: trio.MemorySendChannel[UpstreamEvent],
        interest: frozenset[str] | None,
    ) -> None:
        self.name = name
        self.config = config
        self.chroot = config.chroot
        self.roots = [_Root.of(root, self.chroot) for root in config.roots]
        self.dirs: dict[str, _Directory] = {}
        self.dirs_by_service: dict[str, dict[str, _Directory]] = {}
        #: service -> instance id -> the znodes whose instance has that id.
        self.claims: dict[str, dict[str, _Claims]] = {}
        #: What the fan-in was told, per service: id -> instance.
        self.emitted: dict[str, dict[str, Instance]] = {}
        #: Instance ids whose claims changed since they were last emitted.
        self.dirty: dict[str, set[str]] = {}
        self.interest = interest
        #: The services whose state is complete (listed and followed); None: all.
        self.covered: frozenset[str] | None = frozenset()
        self.sweep: _Sweep | None = None
        self.client: ZooKeeperClient | None = None
        self.connected = False
        #: Bumped when a connection is lost: its replies no longer count.
        self.generation = 0
        #: Roots whose recursive watch the session holds.
        self.watched: set[str] = set()
        #: Per znode path with reads queued or in flight.
        self.stamps: dict[str, _Stamp] = {}
        self.listings: dict[str, list[_ChildListing]] = {}
        self.waiting: deque[_Read] = deque()
        self.in_flight = 0
        self.outbox = _Outbox(events, self.flush, self.listing_of_everything)
        self.resync_wanted = trio.Event()
        self.backoff = Backoff()

    # -- lifetime ---------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.outbox.drain)
            nursery.start_soon(self._resyncs)
            self.outbox.status(Status(False, f"connecting to {self.config.hosts}"))
            backoff = Backoff(initial=1.0)
            while True:
                self.client = ZooKeeperClient(
                    self.config.servers,
                    session_timeout_ms=max(1, round(self.config.session_timeout * 1000)),
                    auth=[(scheme, cred.encode()) for scheme, cred in self.config.auth],
                    on_watch=self.on_watch,
                    on_session=self.on_session,
                    tls=None if self.config.tls is None else client_context(self.config.tls),
                    server_name=None if self.config.tls is None else self.config.tls.server_name,
                    sasl=self.config.sasl,
                )
                try:
                    await self.client.run()
                except KeeperError as exc:
                    if exc.err != Err.AUTHFAILED:
                        raise
                # The server refused a credential and the client stopped for
                # good; the credential may be added upstream meanwhile.
                self._lost("authentication failed")
                self.watched.clear()
                await backoff.sleep()

    async def _resyncs(self) -> None:
        """List everything again, after a pause, when a read failed unexpectedly."""
        while True:
            await self.resync_wanted.wait()
            self.resync_wanted = trio.Event()
            await self.backoff.sleep()
            if self.connected:
                self._add_watches()
                self._start_sweep(_Sweep(self.interest, full=True))
                self.flush()

    def _request_resync(self, message: str, **fields: object) -> None:
        log.warning(message, extra={"upstream": self.name, **fields})
        self.resync_wanted.set()

    # -- session events ---------------------------------------------------------------

    def on_session(self, event: SessionEvent) -> None:
        if isinstance(event, Connected):
            self.connected = True
            if not event.resumed:
                self.watched.clear()  # a new session holds no watches
            # A resumed session got its watches back from the client, but not
            # the events they missed while the connection was down.
            self._add_watches()
            self._start_sweep(_Sweep(self.interest, full=True))
        elif isinstance(event, Disconnected):
            self._lost("connection lost; session kept while reconnecting")
        elif isinstance(event, Expired):
            self.watched.clear()
            self._lost("session expired; reconnecting with a new session")
        elif isinstance(event, AuthFailed):
            self._lost("authentication failed")
        self.flush()

    def _lost(self, detail: str) -> None:
        """No connection: keep the state (stale), forget every read in progress."""
        self.connected = False
        self.generation += 1
        self.sweep = None
        self.waiting.clear()
        self.in_flight = 0
        self.stamps.clear()
        self.listings.clear()
        self.outbox.status(Status(False, detail))

    def _add_watches(self) -> None:
        assert self.client is not None
        generation = self.generation
        for root in self.roots:
            if root.path in self.watched:
                continue

            def added(reply: Reply, root: _Root = root) -> None:
                if generation != self.generation or reply.err == Err.CONNECTIONLOSS:
                    return
                if reply.err == Err.OK:
                    self.watched.add(root.path)
                else:
                    self._request_resync(
                        "cannot watch a root; retrying",
                        path=root.shown,
                        error=_err_name(reply.err),
                    )

            try:
                self.client.submit(
                    OpCode.ADD_WATCH,
                    AddWatchRequest(root.path, AddWatchMode.PERSISTENT_RECURSIVE),
                    added,
                )
            except ConnectionLost:
                return  # the loss is being reported; the next connection adds it

    # -- interest ---------------------------------------------------------------------

    def set_interest(self, services: frozenset[str] | None) -> None:
        self.interest = services
        if services is not None:
            for service in [s for s in self.dirs_by_service if s not in services]:
                self._forget(service)
            for table in (self.claims, self.emitted, self.dirty):
                for service in [s for s in table if s not in services]:
                    del table[service]
            self.covered = services if self.covered is None else self.covered & services
        self._reconcile()
        self.flush()

    def _wanted(self, service: str) -> bool:
        return self.interest is None or service in self.interest

    def _reconcile(self) -> None:
        """List the services that are wanted but not covered, unless a listing runs."""
        covered = self.covered
        if not self.connected or self.sweep is not None or covered is None:
            return
        if self.interest is None:
            sweep = _Sweep(None, full=False)
        else:
            missing = self.interest - covered
            if not missing:
                return
            sweep = _Sweep(missing, full=False)
        self.sweep = sweep
        for root in self.roots:
            for service, relative in list(root.services.items()):
                if service not in covered and _contains(sweep.scope, service):
                    self._list_directory(self._directory(root, service, relative), sweep)
        if sweep.outstanding == 0:
            self._sweep_done(sweep)

    # -- sweeps -----------------------------------------------------------------------

    def _start_sweep(self, sweep: _Sweep) -> None:
        self.sweep = sweep
        for root in self.roots:
            self._list_root(root, sweep)

    def _done(self, sweep: _Sweep | None) -> None:
        if sweep is None:
            return
        sweep.outstanding -= 1
        if sweep.outstanding == 0 and sweep is self.sweep:
            self._sweep_done(sweep)

    def _sweep_done(self, sweep: _Sweep) -> None:
        self.sweep = None
        scope = _intersect(sweep.scope, self.interest)
        if sweep.full:
            self.covered = scope
        else:
            # scope is None only when sweep.scope is; the test says so to the type checker.
            joined = (
                None
                if self.covered is None or sweep.scope is None or scope is None
                else self.covered | scope
            )
            self.covered = _intersect(joined, self.interest)
        self.outbox.emit(self._listing(scope))
        if sweep.full:
            self.backoff.reset()
            self.outbox.status(Status(True, "connected"))
        self._reconcile()

    def _listing(self, scope: frozenset[str] | None) -> Listing:
        """The complete state of ``scope`` as a Listing; the fan-in will hold exactly that."""
        services = list(self.claims) if scope is None else [s for s in scope if s in self.claims]
        if scope is None:
            self.emitted.clear()
            self.dirty.clear()
        else:
            for service in scope:
                self.emitted.pop(service, None)
                self.dirty.pop(service, None)
        instances: list[Instance] = []
        for service in services:
            winners = {
                instance_id: _winner(claims) for instance_id, claims in self.claims[service].items()
            }
            self.emitted[service] = winners
            instances.extend(winners.values())
        return Listing(tuple(instances), services=scope)

    def listing_of_everything(self) -> Listing:
        return self._listing(None)

    # -- reads ------------------------------------------------------------------------

    def _read(self, opcode: int, path: str, handle: Callable[[Reply], None], urgent: bool) -> None:
        read = _Read(opcode, path, handle, self.generation)
        if self.in_flight < _WINDOW and not self.waiting:
            self._send(read)
        elif urgent:
            # An event's read is fresher than a listing's: it goes first.
            self.waiting.appendleft(read)
        else:
            self.waiting.append(read)

    def _send(self, read: _Read) -> None:
        assert self.client is not None
        try:
            self.client.submit(
                read.opcode,
                PathWatchRequest(read.path, False),
                lambda reply: self._answered(read, reply),
            )
        except Overloaded:
            # Not with reads bounded by _WINDOW; if ever, start over later.
            self._request_resync("zookeeper client overloaded; re-listing", path=read.path)
            return
        except ConnectionLost:
            return  # the loss is being reported, and every read is forgotten with it
        self.in_flight += 1

    def _answered(self, read: _Read, reply: Reply) -> None:
        if read.generation != self.generation:
            return
        self.in_flight -= 1
        if reply.err == Err.CONNECTIONLOSS:
            return  # Disconnected follows, and a full listing after the reconnect
        read.handle(reply)
        while self.waiting and self.in_flight < _WINDOW and self.connected:
            self._send(self.waiting.popleft())
        self.flush()

    def _unexpected(self, err: int, path: str) -> None:
        self._request_resync(
            "unexpected zookeeper error; re-listing", path=self._shown(path), error=_err_name(err)
        )

    def _children(self, reply: Reply, path: str) -> tuple[str, ...] | None:
        """A ``getChildren`` answer: the names, () where there are none to see, None on error."""
        if reply.err == Err.OK and isinstance(reply.body, GetChildrenResponse):
            return reply.body.children
        if reply.err == Err.NONODE:
            return ()
        if reply.err == Err.NOAUTH:
            log.warning(
                "cannot list a znode: no permission (check the upstream's auth)",
                extra={"path": self._shown(path), "upstream": self.name},
            )
            return ()
        self._unexpected(reply.err, path)
        return None

    def _listing_of(self, path: str, sweep: _Sweep | None) -> _ChildListing:
        listing = _ChildListing(path, sweep)
        self.listings.setdefault(path, []).append(listing)
        if sweep is not None:
            sweep.outstanding += 1
        return listing

    def _listed(self, listing: _ChildListing) -> None:
        pending = self.listings.get(listing.path)
        if pending is not None:
            pending.remove(listing)
            if not pending:
                del self.listings[listing.path]

    def _list_root(self, root: _Root, sweep: _Sweep | None) -> None:
        listing = self._listing_of(root.path, sweep)
        self._read(
            OpCode.GET_CHILDREN,
            root.path,
            lambda reply: self._root_listed(root, listing, reply),
            urgent=sweep is None,
        )

    def _root_listed(self, root: _Root, listing: _ChildListing, reply: Reply) -> None:
        self._listed(listing)
        try:
            if listing.overtaken:
                return  # the root's own event listed it again, or emptied it
            names = self._children(reply, root.path)
            if names is None:
                return
            touched = listing.touched
            listed: dict[str, str] = {}
            for child in names:
                if child not in touched:
                    service = root.service_of_child(child)
                    if service is not None:
                        listed[service] = child + root.tail
            for service, relative in list(root.services.items()):
                if service not in listed and relative.partition("/")[0] not in touched:
                    self._service_gone(root, service)
            sweep = listing.sweep
            for service, relative in listed.items():
                root.services[service] = relative
                if self._wanted(service) and (sweep is None or _contains(sweep.scope, service)):
                    self._list_directory(self._directory(root, service, relative), sweep)
        finally:
            self._done(listing.sweep)

    def _list_directory(self, directory: _Directory, sweep: _Sweep | None) -> None:
        listing = self._listing_of(directory.path, sweep)
        self._read(
            OpCode.GET_CHILDREN,
            directory.path,
            lambda reply: self._directory_listed(directory, listing, reply),
            urgent=sweep is None,
        )

    def _directory_listed(
        self, directory: _Directory, listing: _ChildListing, reply: Reply
    ) -> None:
        self._listed(listing)
        try:
            if listing.overtaken or self.dirs.get(directory.path) is not directory:
                return
            names = self._children(reply, directory.path)
            if names is None:
                return
            root, touched = directory.root, listing.touched
            present = [n for n in names if n not in touched and root.is_instance_name(n)]
            keep = touched.union(present)
            for name in [n for n in directory.znodes if n not in keep]:
                self._set_znode(directory, name, None)
            for name in present:
                # A Dubbo znode's name is all there is to it: it never changes.
                if root.data_in_znodes or name not in directory.znodes:
                    self._read_znode(directory, name, listing.sweep)
        finally:
            self._done(listing.sweep)

    def _read_znode(self, directory: _Directory, name: str, sweep: _Sweep | None) -> None:
        path = f"{directory.path}/{name}"
        stamp = self.stamps.get(path)
        if stamp is None:
            stamp = self.stamps[path] = _Stamp()
        stamp.reads += 1
        seen = (stamp.events, stamp.deletions)
        if sweep is not None:
            sweep.outstanding += 1
        opcode = OpCode.GET_DATA if directory.root.data_in_znodes else OpCode.EXISTS
        self._read(
            opcode,
            path,
            lambda reply: self._znode_read(directory, name, path, seen, sweep, reply),
            urgent=sweep is None,
        )

    def _znode_read(
        self,
        directory: _Directory,
        name: str,
        path: str,
        seen: tuple[int, int],
        sweep: _Sweep | None,
        reply: Reply,
    ) -> None:
        stamp = self.stamps[path]
        events, deletions = seen
        overtaken, deleted = stamp.events != events, stamp.deletions != deletions
        stamp.reads -= 1
        if not stamp.reads:
            del self.stamps[path]
        try:
            if self.dirs.get(directory.path) is not directory:
                return
            body = reply.body
            known = directory.znodes.get(name)
            if overtaken and (
                # An event for this path arrived while the read was out, so the
                # answer may predate it. After a deletion it is thrown away (the
                # event removed the znode). After creations and data changes,
                # each of which sent a read of its own, it counts only if newer
                # than what is held: a stale answer never wins, and a znode
                # written faster than a round trip still moves forward.
                deleted
                or reply.err != Err.OK
                or not isinstance(body, GetDataResponse | StatResponse)
                or (known is not None and body.stat.mzxid <= known.revision)
            ):
                return
            if reply.err == Err.OK and isinstance(body, GetDataResponse | StatResponse):
                revision = body.stat.mzxid
                if known is None or known.revision != revision:
                    data = (body.data or b"") if isinstance(body, GetDataResponse) else b""
                    self._set_znode(directory, name, self._parse(directory, name, data, revision))
            elif reply.err == Err.NONODE:
                self._set_znode(directory, name, None)
            elif reply.err == Err.NOAUTH:
                log.warning(
                    "cannot read a znode: no permission (check the upstream's auth)",
                    extra={"path": self._shown(path), "upstream": self.name},
                )
                self._set_znode(directory, name, None)
            else:
                self._unexpected(reply.err, path)
        finally:
            self._done(sweep)

    def _parse(self, directory: _Directory, name: str, data: bytes, revision: int) -> _Znode:
        root = directory.root
        source = Source(self.name, f"{directory.relative}/{name}", revision)
        fields = {
            "path": f"{root.shown_path(directory.relative)}/{name}",
            "service": directory.service,
            "upstream": self.name,
            "layout": root.layout.NAME,
        }
        try:
            instance = root.layout.parse(directory.service, name, data, source=source)
        except Exception:
            # Layouts promise not to raise; if one does, it is one bad znode,
            # not a reason to stop following the rest.
            log.exception("layout failed on a znode", extra=fields)
            instance = None
        if instance is None:
            log.warning(
                "skipping a znode that is not an instance of its layout",
                extra={**fields, "mzxid": hex(revision)},
            )
        return _Znode(revision, instance)

    def _shown(self, path: str) -> str:
        return (path[len(self.chroot) :] or "/") if self.chroot else path

    # -- watch events -----------------------------------------------------------------

    def on_watch(self, event: WatcherEvent) -> None:
        kind, path = event.type, event.path
        if kind not in (_CREATED, _DELETED, _CHANGED) or not self.connected:
            return
        self._overtake(path, kind)
        for root in self.roots:
            relative = root.relative(path)
            if relative is not None:
                self._event(root, relative, path, kind)
                break
        self.flush()

    def _overtake(self, path: str, kind: int) -> None:
        """Mark the reads that ``path``'s event may have overtaken."""
        stamp = self.stamps.get(path)
        if stamp is not None:
            stamp.events += 1
            if kind == _DELETED:
                stamp.deletions += 1
        if kind == _CHANGED:
            return  # data: no listing's answer depends on it
        for listing in self.listings.get(path, ()):
            listing.overtaken = True
        parent, _, name = path.rpartition("/")
        for listing in self.listings.get(parent or "/", ()):
            listing.touched.add(name)

    def _event(self, root: _Root, relative: str, path: str, kind: int) -> None:
        if not relative:
            if kind == _CREATED:
                self._list_root(root, None)
            elif kind == _DELETED:
                # Its children went first, each with an event; this is a backstop.
                for known in list(root.services):
                    self._service_gone(root, known)
            return
        child, slash, _ = relative.partition("/")
        if not slash:
            if kind == _CREATED:
                service = root.service_of_child(child)
                if service is not None:
                    self._service_appeared(root, service, child + root.tail)
            elif kind == _DELETED:
                service = root.service_of_child(child)
                if service is not None and root.services.get(service) == child + root.tail:
                    self._service_gone(root, service)
            return
        service_dir = child + root.tail
        if relative == service_dir:
            # Dubbo's providers directory, below the interface's znode.
            directory = self.dirs.get(path)
            if directory is not None:
                if kind == _CREATED:
                    self._list_directory(directory, None)
                elif kind == _DELETED:
                    for name in list(directory.znodes):
                        self._set_znode(directory, name, None)
            return
        parent, _, name = relative.rpartition("/")
        if parent != service_dir:
            return
        directory = self.dirs.get(path[: -len(name) - 1])
        if directory is None or not root.is_instance_name(name):
            return
        if kind == _DELETED:
            self._set_znode(directory, name, None)
        elif kind == _CREATED or root.data_in_znodes:
            self._read_znode(directory, name, None)

    def _service_appeared(self, root: _Root, service: str, relative: str) -> None:
        root.services[service] = relative
        if self._wanted(service):
            # Created empty, its children come with events of their own; the
            # listing is a backstop that costs one read per new service.
            self._list_directory(self._directory(root, service, relative), None)

    def _service_gone(self, root: _Root, service: str) -> None:
        relative = root.services.pop(service, None)
        if relative is not None:
            directory = self.dirs.get(root.absolute(relative))
            if directory is not None:
                self._drop_directory(directory)

    # -- state ------------------------------------------------------------------------

    def _directory(self, root: _Root, service: str, relative: str) -> _Directory:
        path = root.absolute(relative)
        directory = self.dirs.get(path)
        if directory is None:
            directory = _Directory(root, service, relative, path)
            self.dirs[path] = directory
            self.dirs_by_service.setdefault(service, {})[path] = directory
        return directory

    def _drop_directory(self, directory: _Directory) -> None:
        for name in list(directory.znodes):
            self._set_znode(directory, name, None)
        del self.dirs[directory.path]
        by_path = self.dirs_by_service[directory.service]
        del by_path[directory.path]
        if not by_path:
            del self.dirs_by_service[directory.service]

    def _forget(self, service: str) -> None:
        """Drop a service nobody wants any more, telling the fan-in nothing."""
        for directory in list(self.dirs_by_service.get(service, {}).values()):
            self._drop_directory(directory)

    def _set_znode(self, directory: _Directory, name: str, znode: _Znode | None) -> None:
        if znode is None:
            old = directory.znodes.pop(name, None)
        else:
            old = directory.znodes.get(name)
            directory.znodes[name] = znode
        if old is not None and old.instance is not None:
            self._unclaim(old, old.instance)
        if znode is not None and znode.instance is not None:
            self._claim(znode, znode.instance)

    def _claim(self, znode: _Znode, instance: Instance) -> None:
        by_id = self.claims.setdefault(instance.service, {})
        held = by_id.get(instance.instance_id)
        if held is None:
            by_id[instance.instance_id] = znode
        elif isinstance(held, list):
            held.append(znode)
        else:
            by_id[instance.instance_id] = [held, znode]
        self.dirty.setdefault(instance.service, set()).add(instance.instance_id)

    def _unclaim(self, znode: _Znode, instance: Instance) -> None:
        by_id = self.claims[instance.service]
        held = by_id[instance.instance_id]
        if isinstance(held, list):
            held[:] = [z for z in held if z is not znode]
            if len(held) == 1:
                by_id[instance.instance_id] = held[0]
        else:
            del by_id[instance.instance_id]
            if not by_id:
                del self.claims[instance.service]
        self.dirty.setdefault(instance.service, set()).add(instance.instance_id)

    def flush(self) -> None:
        """Emit what changed since the last event, unless a listing will carry it."""
        if not self.dirty or self.outbox.blocked:
            return
        held: frozenset[str] = frozenset()
        if self.sweep is not None:
            if self.sweep.scope is None:
                return
            held = self.sweep.scope
        changes: list[Change] = []
        for service in [s for s in self.dirty if s not in held]:
            ids = self.dirty.pop(service)
            claims = self.claims.get(service, {})
            emitted = self.emitted.get(service)
            for instance_id in ids:
                claim = claims.get(instance_id)
                winner = _winner(claim) if claim is not None else None
                current = emitted.get(instance_id) if emitted is not None else None
                if winner is None:
                    if current is not None and emitted is not None:
                        del emitted[instance_id]
                        changes.append(Remove(service, instance_id))
                elif current is None or current != winner:
                    if emitted is None:
                        emitted = self.emitted[service] = {}
                    emitted[instance_id] = winner
                    changes.append(Put(winner))
            if emitted is not None and not emitted:
                del self.emitted[service]
        if changes:
            self.outbox.emit(Changed(tuple(changes)))

    def watches(self) -> frozenset[tuple[WatchKind, str]]:
        return frozenset(("recursive", r.shown) for r in self.roots if r.path in self.watched)


def _err_name(err: int) -> str:
    try:
        return Err(err).name
    except ValueError:
        return str(err)


# ------------------------------------------------------------------ the upstream


class ZooKeeperUpstream:
    """A ZooKeeper ensemble as a :class:`dispatcher.core.upstream.Upstream` (see the module doc)."""

    def __init__(self, name: str, config: ZooKeeperUpstreamConfig) -> None:
        self.name = name
        self.config = config
        self._interest: frozenset[str] | None = None
        self._tracker: _Tracker | None = None

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, parse_config(name, options))

    def set_interest(self, services: frozenset[str] | None) -> None:
        self._interest = None if services is None else frozenset(services)
        if self._tracker is not None:
            self._tracker.set_interest(self._interest)

    async def inspect(self, services: frozenset[str] | None) -> Inspection:
        """Read ``services`` directly, on a session of its own
        (see :mod:`adapters.zookeeper_inspect`)."""
        # Imported here: that module names this one's types.
        from adapters.zookeeper_inspect import inspect_zookeeper

        chroot = self.config.chroot
        roots = [_Root.of(root, chroot) for root in self.config.roots]
        return await inspect_zookeeper(self.name, self.config, roots, services, self.applied())

    def applied(self) -> dict[str, tuple[int, Instance | None]]:
        """Per instance znode the adapter follows (absolute path), the ``mzxid`` it
        last applied and what the znode parsed to then.

        Inspection parses only the znodes whose ``mzxid`` differs (changed, or
        missed): one at the same ``mzxid`` holds the same data. Built from the
        state the adapter keeps anyway (one ``_Znode`` per znode), a new dict per
        call that the read may change and drops.
        """
        tracker = self._tracker
        if tracker is None:
            return {}
        return {
            f"{directory.path}/{name}": (znode.revision, znode.instance)
            for directory in tracker.dirs.values()
            for name, znode in directory.znodes.items()
        }

    def watches(self) -> frozenset[tuple[WatchKind, str]]:
        """The upstream watches the session holds, as ``(kind, root)``.

        For diagnostics (and tests): one persistent recursive watch per
        configured root, whatever is registered below it.
        """
        return self._tracker.watches() if self._tracker is not None else frozenset()

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        if self._tracker is not None:
            raise RuntimeError(f"upstream {self.name!r} is already running")
        self._tracker = _Tracker(self.name, self.config, events, self._interest)
        try:
            await self._tracker.run()
        finally:
            self._tracker = None
