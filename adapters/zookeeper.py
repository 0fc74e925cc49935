"""The ZooKeeper adapter: registrations under configured roots, mirrored with one watch per path.

A :class:`ZooKeeperUpstream` watches one ensemble through kazoo. Each
configured root is read in one :mod:`adapters.layouts` layout:

* the root's children are the services (a child watch on the root; an
  ``exists`` watch instead while the root does not exist yet);
* each wanted service's directory (``layout.directory``: Dubbo's
  ``<interface>/providers``, Curator's ``<name>``, a ServerSet's or the plain
  layout's own directory) holds one znode per instance (a child watch on the
  directory, or an ``exists`` watch while it is missing, as Dubbo's
  ``providers`` often is);
* where the layout keeps the instance in the znode's data (Curator,
  ServerSet, plain) each instance znode has a data watch; Dubbo's instance is
  the znode *name*, so its znodes need none.

One upstream watch per watched path. ZooKeeper watches are one-shot; this
module re-arms a path's watch only from the read that follows its firing, and
keeps the set of watches it believes pending (:meth:`ZooKeeperUpstream.watches`)
so that it never asks twice for one path while the first is pending. A watch
is marked pending *before* the read that sets it, because its event can reach
trio before the read's answer does. The server would deduplicate anyway (one
watch per path, type and session), and kazoo keeps its watchers in a set per
path, which is why the two callbacks are created once per upstream, never per
read. A directory created between a failed ``getChildren`` and the
``exists`` that follows keeps that ``exists`` watch until its data changes:
still one data watch on that path.

Services are the root's direct children: a ServerSet tree nested deeper
(``/aurora/<role>/<env>/<job>``) is configured with the parent of the jobs
as its root.

Connection states, and what kazoo 2.11 really does with watches. On a
connection loss (SUSPENDED) kazoo *drops every watcher* client-side (it fires
each with a ``NONE`` event) and does not replay them with ``setWatches`` when
it reconnects to the same session, so the server holds none of them either.
Hence: SUSPENDED reports :class:`Status` ``(False)`` and keeps the last state;
any reconnect (same session after SUSPENDED, or a new one after LOST, i.e.
session expiry) re-lists everything, re-arms every watch, and emits one
:class:`Listing` that the fan-in diffs, so exactly the changes made meanwhile
come out, then ``Status(True)``. While the ensemble is down kazoo retries
forever (``KazooRetry(max_tries=-1)``, backoff capped at 10 s).

Threads. kazoo runs its watch callbacks on its callback thread and its state
listeners on its connection thread. Neither may block (a blocked connection
thread would stall the very reads trio is waiting for), so they only hand a
note to trio with ``TrioToken.run_sync_soon``, which never waits; the notes
are bounded by the number of pending watches (each fires at most once) plus a
few state changes. All adapter state lives in the trio task; every kazoo call
it makes runs in a worker thread (``trio.to_thread.run_sync``), and batches
of reads are pipelined inside one worker thread call.

Interest. ``set_interest`` narrows by forgetting the dropped services: their
watches cannot be cancelled (kazoo 2.11 does not speak ZooKeeper's
``removeWatches``), so they stay until they fire once and are then not
re-armed; what they report is ignored. Narrowing emits nothing: those
instances still exist upstream, and what to do with them is the fan-in's
call. Widening lists the new services and emits a ``Listing`` scoped to them.

Services of the same name under two roots are merged into one service; if
two znodes claim the same instance id (a Dubbo provider re-registered with
new parameters while its old session's znode lingers), the one written last
(highest ``mzxid``) wins.

Each instance carries ``Source(adapter=<upstream name>, key=<path relative to
its root>, revision=<mzxid>)``. A znode whose name or data does not parse is
skipped with one log line per version of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, Final, Literal, Self

import attrs
import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoNodeError,
    SessionExpiredError,
    SessionMovedError,
)
from kazoo.hosts import collect_hosts
from kazoo.protocol.states import EventType, KeeperState, WatchedEvent, ZnodeStat
from kazoo.retry import KazooRetry

from adapters import layouts
from adapters.layouts import serverset
from dispatcher.model import Instance, Source
from dispatcher.snapshot import Change, diff
from dispatcher.upstream import (
    Backoff,
    Changed,
    ConfigError,
    Listing,
    Status,
    UpstreamEvent,
    check_type,
    reject_unknown,
    require,
)

__all__ = ["RootConfig", "ZooKeeperUpstream", "ZooKeeperUpstreamConfig", "parse_config"]

log = logging.getLogger(__name__)

_DEFAULT_SESSION_TIMEOUT: Final = 10.0
# Reads pipelined in one worker-thread call: enough to hide the round trip,
# few enough that one huge directory does not queue unbounded requests.
_BATCH: Final = 256
# A node created and deleted again between our getChildren and exists,
# over and over, is not worth chasing: give up and wait for its watch.
_MISSING_NODE_RETRIES: Final = 3
# Errors that mean "the connection changed under this read": the state
# listener reports the change, and the next reconnect re-lists everything.
_CONNECTION_ERRORS: Final = (
    ConnectionLoss,
    SessionExpiredError,
    SessionMovedError,
    AuthFailedError,
)

WatchKind = Literal["child", "data"]
"""ZooKeeper's two one-shot watch kinds: ``getChildren`` sets a child watch;
``getData`` and ``exists`` set a data watch."""

Watcher = Callable[[WatchedEvent], None]


# ------------------------------------------------------------------ configuration


@attrs.frozen
class RootConfig:
    """One watched root: an absolute znode path and the layout of what is under it."""

    path: str
    layout: str


@attrs.frozen
class ZooKeeperUpstreamConfig:
    """A ZooKeeper upstream's configuration, validated."""

    hosts: str
    roots: tuple[RootConfig, ...]
    session_timeout: float = _DEFAULT_SESSION_TIMEOUT
    #: ``(scheme, credential)`` pairs for ``addAuth``, sent again on every reconnect.
    auth: tuple[tuple[str, str], ...] = ()


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
    reject_unknown(options, ("hosts", "roots", "session_timeout", "auth"), where)
    hosts = require(options, "hosts", str, where).strip()
    if not hosts:
        raise ConfigError(f"{where}: key 'hosts' must not be empty")
    try:
        collect_hosts(hosts)
    except ValueError as exc:
        raise ConfigError(f"{where}: key 'hosts' is not a connect string: {exc}") from exc

    roots: list[RootConfig] = []
    for index, table in enumerate(require(options, "roots", list, where)):
        key = f"roots[{index}]"
        check_type(table, key, Mapping, where)
        reject_unknown(table, ("path", "layout"), f"{where} {key}")
        path = _check_path(require(table, "path", str, f"{where} {key}"), f"{key}.path", where)
        layout = require(table, "layout", str, f"{where} {key}")
        if layout not in layouts.NAMES:
            raise ConfigError(
                f"{where}: key '{key}.layout' must be one of {', '.join(layouts.NAMES)},"
                f" not {layout!r}"
            )
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
    return ZooKeeperUpstreamConfig(hosts, tuple(roots), session_timeout, tuple(auth))


# ------------------------------------------------------------------ kazoo, in worker threads
#
# These functions run in a worker thread and touch nothing but the client.


def _batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    # itertools.batched is 3.12+.
    iterator = iter(items)
    while batch := tuple(islice(iterator, size)):
        yield batch


def _children(
    client: KazooClient, path: str, child_watch: Watcher | None, exists_watch: Watcher | None
) -> tuple[list[str] | None, bool, bool]:
    """``path``'s children, or None while it does not exist; and which watches were set.

    A missing node gets an ``exists`` watch instead, so that its creation is
    seen: ``getChildren`` on a missing node leaves no watch behind.
    """
    exists_set = False
    for _ in range(_MISSING_NODE_RETRIES):
        try:
            return client.get_children(path, watch=child_watch), child_watch is not None, exists_set
        except NoNodeError:
            pass
        except NoAuthError:
            log.warning(
                "cannot list a znode: no permission (check the upstream's auth)",
                extra={"path": path},
            )
            return None, False, exists_set
        stat = client.exists(path, watch=exists_watch)
        exists_set = exists_set or exists_watch is not None
        if stat is None:
            return None, False, exists_set
        # Created between the two reads: list it after all. The exists
        # watch now sits on a live node and fires on its next change.
        exists_watch = None
    return None, False, exists_set


def _get_many(
    client: KazooClient, requests: Sequence[tuple[str, Watcher | None]]
) -> list[tuple[bytes, ZnodeStat] | None]:
    """``getData`` of each path (None where it is gone), pipelined."""
    results: list[tuple[bytes, ZnodeStat] | None] = []
    for batch in _batched(requests, _BATCH):
        pending = [client.get_async(path, watch=watch) for path, watch in batch]
        for (path, _), answer in zip(batch, pending, strict=True):
            try:
                results.append(answer.get())
            except NoNodeError:
                results.append(None)
            except NoAuthError:
                log.warning(
                    "cannot read a znode: no permission (check the upstream's auth)",
                    extra={"path": path},
                )
                results.append(None)
    return results


def _stat_many(client: KazooClient, paths: Sequence[str]) -> list[ZnodeStat | None]:
    """``exists`` of each path, without a watch, pipelined."""
    results: list[ZnodeStat | None] = []
    for batch in _batched(paths, _BATCH):
        results.extend(answer.get() for answer in [client.exists_async(path) for path in batch])
    return results


def _close(client: KazooClient) -> None:
    # stop() interrupts kazoo's reconnect loop, closes the session (its
    # ephemerals go, which is right: we own none) and fails pending reads.
    try:
        client.stop()
    finally:
        client.close()


# ------------------------------------------------------------------ the mirrored tree


@attrs.frozen
class _Znode:
    """One instance znode as last read: its ``mzxid`` and what it parsed to."""

    revision: int
    instance: Instance | None


@attrs.define(eq=False)
class _Root:
    """A configured root and, from its last listing, the services under it."""

    path: str
    layout: layouts.Layout
    #: What follows the root's child in a service directory ("/providers" for Dubbo).
    tail: str
    #: Every service under the root (wanted or not), by its directory relative to the root.
    services: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def of(cls, config: RootConfig) -> _Root:
        layout = layouts.get(config.layout)
        # A service's directory is the root's child named after it, plus a
        # fixed tail; derive the tail from the layout rather than restate it.
        probe = "probe"
        directory = layout.directory(probe)
        if not directory.startswith(probe):
            raise AssertionError(f"layout {config.layout} puts services deeper than one level")
        return cls(config.path, layout, directory.removeprefix(probe))

    def absolute(self, relative: str) -> str:
        return f"{'' if self.path == '/' else self.path}/{relative}"

    def services_in(self, children: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for child in children:
            relative = child + self.tail
            service = self.layout.service_of(relative)
            if service is not None:
                found[service] = relative
        return found

    def is_instance_name(self, name: str) -> bool:
        # Finagle reads only member_* znodes; other names in a set's
        # directory are not instances and get no watch.
        return self.layout.NAME != serverset.NAME or name.startswith(serverset.MEMBER_PREFIX)

    @property
    def data_in_znodes(self) -> bool:
        return self.layout.NAME != "dubbo"


@attrs.define(eq=False)
class _Directory:
    """One wanted service's instance directory under one root."""

    root: _Root
    service: str
    relative: str
    path: str
    znodes: dict[str, _Znode] = attrs.Factory(dict)


class _Interrupted(Exception):
    """A read was cut short by a connection change; a full re-list follows."""


def _wanted(service: str, interest: frozenset[str] | None) -> bool:
    return interest is None or service in interest


def _revision(instance: Instance) -> int:
    return instance.source.revision if instance.source is not None else 0


class _Mirror:
    """The state of one running upstream, owned by its trio task.

    Everything here is touched only from the trio thread; kazoo's threads
    reach it only through :meth:`_post` (``run_sync_soon``).
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
        self.events = events
        self.token = trio.lowlevel.current_trio_token()
        self.roots = {root.path: _Root.of(root) for root in config.roots}
        self.dirs: dict[str, _Directory] = {}
        self.dirs_by_service: dict[str, set[str]] = {}
        #: What this upstream last told the fan-in, per service: id -> instance.
        self.emitted: dict[str, dict[str, Instance]] = {}
        self.interest = interest
        self.applied_interest = interest
        #: The services wanted throughout since the interest was last applied
        #: (None: all). The fan-in forgets a service the moment interest in
        #: it is dropped, so one dropped and wanted again before this loop
        #: applied either change must be listed again, though the two
        #: changes cancel out here.
        self.kept = interest
        self.armed: set[tuple[WatchKind, str]] = set()
        self.dirty: set[tuple[WatchKind, str]] = set()
        self.connected = False
        self.need_resync = True
        self.gave_up = False
        self.closed = False
        #: Bumped on every disconnect; a read that straddles one is discarded.
        self.epoch = 0
        self.generation = 0
        self.client: KazooClient | None = None
        self.pending_status: Status | None = None
        self.last_status: Status | None = None
        self.backoff = Backoff()
        # Created once: kazoo keeps watchers in a set per path, so the same
        # callback object registered twice is one watcher.
        self.child_watcher: Watcher = self._child_fired
        self.data_watcher: Watcher = self._data_fired
        self.bell_send, self.bell_receive = trio.open_memory_channel[None](1)

    # -- from kazoo's threads ---------------------------------------------------

    def _post(self, function: Callable[..., None], *args: object) -> None:
        """Hand ``function(*args)`` to the trio thread without waiting."""
        # A callback after trio has finished: nobody is left to care.
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(function, *args)

    def _child_fired(self, event: WatchedEvent) -> None:
        self._post(self._note_watch, "child", event)

    def _data_fired(self, event: WatchedEvent) -> None:
        self._post(self._note_watch, "data", event)

    def state_listener(self, generation: int, client: KazooClient) -> Callable[[str], None]:
        def listener(state: str) -> None:
            # Called on kazoo's connection thread, which must not block.
            self._post(self._note_state, generation, state, client.client_state)

        return listener

    # -- in the trio thread --------------------------------------------------------

    def _ring(self) -> None:
        if self.closed:
            return
        # Already rung: the loop looks at everything pending when it wakes.
        with contextlib.suppress(trio.WouldBlock):
            self.bell_send.send_nowait(None)

    def _note_watch(self, kind: WatchKind, event: WatchedEvent) -> None:
        if self.closed or event.type == EventType.NONE:
            # NONE is kazoo dropping its watchers on a disconnect; the state
            # change that comes with it triggers the re-list.
            return
        self.armed.discard((kind, event.path))
        self.dirty.add((kind, event.path))
        self._ring()

    def _note_state(self, generation: int, state: str, keeper_state: str) -> None:
        if self.closed or generation != self.generation:
            return
        if state == KazooState.CONNECTED:
            self.connected = True
        else:
            self._disconnected(
                "connection lost; session kept while reconnecting"
                if state == KazooState.SUSPENDED
                else _lost_detail(keeper_state)
            )
            if keeper_state == KeeperState.AUTH_FAILED:
                self.gave_up = True  # kazoo stops trying; run() starts a new client
        self._ring()

    def _disconnected(self, detail: str) -> None:
        self.connected = False
        self.epoch += 1
        self.armed.clear()  # kazoo forgot them all, and so did the server
        self.dirty.clear()  # the re-list after reconnecting covers them
        self.need_resync = True
        self.pending_status = Status(False, detail)

    def attach(self, client: KazooClient) -> Callable[[str], None]:
        """Adopt a new kazoo client; returns the state listener to register on it."""
        self.generation += 1
        self.client = client
        self.gave_up = False
        self._disconnected(f"connecting to {self.config.hosts}")
        return self.state_listener(self.generation, client)

    def set_interest(self, services: frozenset[str] | None) -> None:
        self.interest = services
        if services is not None:
            self.kept = services if self.kept is None else self.kept & services
        self._ring()

    # -- the loop -------------------------------------------------------------------

    async def serve(self) -> None:
        """Keep the fan-in in sync until cancelled, or until kazoo gives up."""
        while not self.gave_up:
            await self._work()
            if self.gave_up:
                return
            await self.bell_receive.receive()

    async def _work(self) -> None:
        while not self.gave_up:
            await self._report_status()
            if not self.connected:
                return
            epoch = self.epoch
            try:
                if self.need_resync:
                    await self._resync()
                elif self.interest != self.applied_interest or self.kept != self.interest:
                    await self._apply_interest()
                elif self.dirty:
                    await self._refresh_dirty()
                else:
                    return
            except _Interrupted as exc:
                self.need_resync = True
                if self.epoch == epoch:
                    # Which watches the failed reads left set is unknown;
                    # the re-list asks again for all (the server and kazoo
                    # fold a repeated watch on one path into one).
                    self.armed.clear()
                    # Not a connection change we were told about: do not spin on it.
                    log.warning(
                        "zookeeper read failed; re-listing",
                        extra={"upstream": self.name, "error": str(exc)},
                    )
                    await self.backoff.sleep()

    async def _report_status(self) -> None:
        status, self.pending_status = self.pending_status, None
        if status is not None and status != self.last_status:
            self.last_status = status
            await self.events.send(status)

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(client, *args)`` in a worker thread; _Interrupted if the connection moved."""
        epoch = self.epoch
        if not self.connected or self.client is None:
            raise _Interrupted("not connected")
        try:
            # Abandoned on cancel: a read blocked on a dead ensemble must not
            # hold up shutdown; closing the client then fails it.
            result = await trio.to_thread.run_sync(
                function, self.client, *args, abandon_on_cancel=True
            )
        except _CONNECTION_ERRORS as exc:
            raise _Interrupted(type(exc).__name__) from exc
        except KazooException as exc:
            log.exception("unexpected error from zookeeper", extra={"upstream": self.name})
            raise _Interrupted(type(exc).__name__) from exc
        if self.epoch != epoch:
            raise _Interrupted("connection changed during the read")
        return result

    async def _send(self, event: UpstreamEvent) -> None:
        await self.events.send(event)

    # -- reading ----------------------------------------------------------------------

    async def _list(self, path: str) -> list[str] | None:
        """Children of ``path`` (None if missing), arming its watch unless one is pending."""
        child_watch = None if ("child", path) in self.armed else self.child_watcher
        exists_watch = None if ("data", path) in self.armed else self.data_watcher
        # Marked before the read: the watch can fire, and its note reach
        # this thread, before the read's own answer does.
        if child_watch is not None:
            self.armed.add(("child", path))
        if exists_watch is not None:
            self.armed.add(("data", path))
        children, child_set, exists_set = await self._call(
            _children, path, child_watch, exists_watch
        )
        if child_watch is not None and not child_set:
            self.armed.discard(("child", path))
        if exists_watch is not None and not exists_set:
            self.armed.discard(("data", path))
        return children

    async def _load(
        self,
        root: _Root,
        service: str,
        relative: str,
        path: str,
        previous: Mapping[str, _Znode],
        *,
        full: bool,
    ) -> dict[str, _Znode]:
        """The instance znodes of one directory, with their watches armed.

        ``full`` re-reads every znode (after a reconnect nothing is watched);
        otherwise only names not seen before are read: the others' data
        watches are pending, so their data is what ``previous`` holds.
        """
        children = await self._list(path)
        if children is None:
            return {}
        names = [name for name in children if root.is_instance_name(name)]
        znodes: dict[str, _Znode] = {}
        fetch: list[str] = []
        for name in names:
            known = previous.get(name)
            # A Dubbo znode's name is all there is to it: it never changes.
            if known is not None and (not full or not root.data_in_znodes):
                znodes[name] = known
            else:
                fetch.append(name)
        if not fetch:
            return znodes
        paths = [f"{path}/{name}" for name in fetch]
        if not root.data_in_znodes:
            stats = await self._call(_stat_many, paths)
            for name, stat in zip(fetch, stats, strict=True):
                if stat is not None:
                    znodes[name] = self._parse(root, service, relative, name, b"", stat.mzxid)
            return znodes
        await self._read_into(root, service, relative, path, fetch, previous, znodes)
        return znodes

    async def _read_into(
        self,
        root: _Root,
        service: str,
        relative: str,
        path: str,
        names: Sequence[str],
        previous: Mapping[str, _Znode],
        znodes: dict[str, _Znode],
    ) -> None:
        """Read ``names`` (arming their data watches) into ``znodes``; drop the gone ones."""
        requests = []
        for name in names:
            node = f"{path}/{name}"
            if ("data", node) in self.armed:
                requests.append((node, None))
            else:
                self.armed.add(("data", node))  # before the read, as in _list
                requests.append((node, self.data_watcher))
        results = await self._call(_get_many, requests)
        for (node, watch), name, result in zip(requests, names, results, strict=True):
            if result is None:
                if watch is not None:
                    self.armed.discard(("data", node))  # a missing node keeps no watch
                znodes.pop(name, None)
                continue
            data, stat = result
            known = previous.get(name)
            if known is not None and known.revision == stat.mzxid:
                znodes[name] = known  # unchanged: no parse, and no second log line
            else:
                znodes[name] = self._parse(root, service, relative, name, data, stat.mzxid)

    def _parse(
        self, root: _Root, service: str, relative: str, name: str, data: bytes, revision: int
    ) -> _Znode:
        source = Source(self.name, f"{relative}/{name}", revision)
        try:
            instance = root.layout.parse(service, name, data, source=source)
        except Exception:
            # Layouts promise not to raise; if one does, it is one bad znode,
            # not a reason to stop mirroring the rest.
            log.exception(
                "layout failed on a znode",
                extra={
                    "path": f"{root.absolute(relative)}/{name}",
                    "service": service,
                    "upstream": self.name,
                    "layout": root.layout.NAME,
                },
            )
            instance = None
        if instance is None:
            log.warning(
                "skipping a znode that is not an instance of its layout",
                extra={
                    "path": f"{root.absolute(relative)}/{name}",
                    "service": service,
                    "upstream": self.name,
                    "layout": root.layout.NAME,
                    "mzxid": hex(revision),
                },
            )
        return _Znode(revision, instance)

    # -- bookkeeping ----------------------------------------------------------------------

    def _add_dir(self, directory: _Directory) -> None:
        self.dirs[directory.path] = directory
        self.dirs_by_service.setdefault(directory.service, set()).add(directory.path)

    def _drop_dir(self, path: str) -> str:
        directory = self.dirs.pop(path)
        paths = self.dirs_by_service[directory.service]
        paths.discard(path)
        if not paths:
            del self.dirs_by_service[directory.service]
        return directory.service

    def _view(self, service: str) -> dict[str, Instance]:
        """The service as the fan-in should see it, merged over its directories."""
        view: dict[str, Instance] = {}
        for path in self.dirs_by_service.get(service, ()):
            for znode in self.dirs[path].znodes.values():
                instance = znode.instance
                if instance is None:
                    continue
                current = view.get(instance.instance_id)
                if current is None or _revision(instance) > _revision(current):
                    view[instance.instance_id] = instance
        return view

    def _publish(self, services: Iterable[str]) -> list[Change]:
        """Bring ``emitted`` up to date for ``services``; the changes that takes."""
        changes: list[Change] = []
        for service in services:
            view = self._view(service)
            changes.extend(diff(self.emitted.get(service, {}), view))
            if view:
                self.emitted[service] = view
            else:
                self.emitted.pop(service, None)
        return changes

    # -- the three kinds of work -------------------------------------------------------

    async def _resync(self) -> None:
        """Re-list everything wanted, re-arm every watch, emit one Listing."""
        interest = self.interest
        listed: dict[str, dict[str, str]] = {}
        for root in self.roots.values():
            listed[root.path] = root.services_in(await self._list(root.path) or ())
        directories: list[_Directory] = []
        for root in self.roots.values():
            for service, relative in listed[root.path].items():
                if not _wanted(service, interest):
                    continue
                path = root.absolute(relative)
                known = self.dirs.get(path)
                znodes = await self._load(
                    root, service, relative, path, known.znodes if known else {}, full=True
                )
                directories.append(_Directory(root, service, relative, path, znodes))
        # Commit only a complete listing: an interrupted one leaves the old
        # state, which the next listing is diffed against.
        for root in self.roots.values():
            root.services = listed[root.path]
        self.dirs.clear()
        self.dirs_by_service.clear()
        for directory in directories:
            self._add_dir(directory)
        self.emitted = {}
        self._publish(list(self.dirs_by_service))
        self.applied_interest = self.kept = interest
        self.need_resync = False
        self.backoff.reset()
        instances = tuple(i for view in self.emitted.values() for i in view.values())
        await self._send(Listing(instances, services=interest))
        self.pending_status = Status(True, "connected")
        await self._report_status()

    async def _apply_interest(self) -> None:
        interest, previous = self.interest, self.applied_interest
        kept, self.kept = self.kept, interest
        for path, directory in list(self.dirs.items()):
            if not _wanted(directory.service, interest):
                self.emitted.pop(self._drop_dir(path), None)
        added: set[str] = set()
        for root in self.roots.values():
            for service, relative in root.services.items():
                path = root.absolute(relative)
                if _wanted(service, interest) and path not in self.dirs:
                    znodes = await self._load(root, service, relative, path, {}, full=True)
                    self._add_dir(_Directory(root, service, relative, path, znodes))
                    added.add(service)
        self.applied_interest = interest
        if interest is None:
            if previous is not None or kept is not None:
                self._publish(added)
                instances = tuple(i for view in self.emitted.values() for i in view.values())
                await self._send(Listing(instances))
            return
        forgotten = frozenset() if kept is None else interest - kept
        scope = (frozenset() if previous is None else interest - previous) | forgotten
        if not scope:
            return  # narrowed only
        self._publish(added)
        instances = tuple(i for s in scope for i in self.emitted.get(s, {}).values())
        await self._send(Listing(instances, services=frozenset(scope)))

    async def _refresh_dirty(self) -> None:
        dirty, self.dirty = self.dirty, set()
        roots: list[_Root] = []
        directories: list[str] = []
        nodes: dict[str, list[str]] = {}
        for kind, path in dirty:
            if path in self.roots:
                roots.append(self.roots[path])
            elif path in self.dirs:
                directories.append(path)
            elif kind == "data":
                parent, _, name = path.rpartition("/")
                if parent in self.dirs:
                    nodes.setdefault(parent, []).append(name)
            # Anything else is a path we stopped caring about: not re-armed.
        touched: set[str] = set()
        for root in roots:
            touched |= await self._refresh_root(root)
        for path in directories:
            directory = self.dirs.get(path)
            if directory is not None:
                directory.znodes = await self._load(
                    directory.root,
                    directory.service,
                    directory.relative,
                    path,
                    directory.znodes,
                    full=False,
                )
                touched.add(directory.service)
        for path, names in nodes.items():
            directory = self.dirs.get(path)
            if directory is not None and directory.root.data_in_znodes:
                await self._read_into(
                    directory.root,
                    directory.service,
                    directory.relative,
                    path,
                    [n for n in names if n in directory.znodes],
                    directory.znodes,
                    directory.znodes,
                )
                touched.add(directory.service)
        changes = self._publish(touched)
        if changes:
            await self._send(Changed(tuple(changes)))

    async def _refresh_root(self, root: _Root) -> set[str]:
        services = root.services_in(await self._list(root.path) or ())
        root.services = services
        touched: set[str] = set()
        for path, directory in list(self.dirs.items()):
            if directory.root is root and services.get(directory.service) != directory.relative:
                touched.add(self._drop_dir(path))
        for service, relative in services.items():
            path = root.absolute(relative)
            if _wanted(service, self.applied_interest) and path not in self.dirs:
                znodes = await self._load(root, service, relative, path, {}, full=True)
                self._add_dir(_Directory(root, service, relative, path, znodes))
                touched.add(service)
        return touched


def _lost_detail(keeper_state: str) -> str:
    if keeper_state == KeeperState.EXPIRED_SESSION:
        return "session expired; reconnecting with a new session"
    if keeper_state == KeeperState.AUTH_FAILED:
        return "authentication failed"
    return "session closed"


# ------------------------------------------------------------------ the upstream


class ZooKeeperUpstream:
    """A ZooKeeper ensemble as a :class:`dispatcher.upstream.Upstream` (see the module doc)."""

    def __init__(self, name: str, config: ZooKeeperUpstreamConfig) -> None:
        self.name = name
        self.config = config
        self._interest: frozenset[str] | None = None
        self._mirror: _Mirror | None = None

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, parse_config(name, options))

    def set_interest(self, services: frozenset[str] | None) -> None:
        self._interest = None if services is None else frozenset(services)
        if self._mirror is not None:
            self._mirror.set_interest(self._interest)

    def watches(self) -> frozenset[tuple[WatchKind, str]]:
        """The upstream watches this adapter believes pending, as ``(kind, path)``.

        For diagnostics (and tests): each path appears at most once per
        kind, which is the "one upstream watch per watched path" promise.
        """
        return frozenset(self._mirror.armed) if self._mirror is not None else frozenset()

    def _new_client(self) -> KazooClient:
        return KazooClient(
            hosts=self.config.hosts,
            timeout=self.config.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=10.0),
            auth_data=set(self.config.auth),
        )

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        if self._mirror is not None:
            raise RuntimeError(f"upstream {self.name!r} is already running")
        mirror = _Mirror(self.name, self.config, events, self._interest)
        self._mirror = mirror
        backoff = Backoff(initial=1.0)
        try:
            while True:
                client = self._new_client()
                client.add_listener(mirror.attach(client))
                try:
                    await trio.to_thread.run_sync(client.start_async)
                    await mirror.serve()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(_close, client)
                # Only an authentication failure gets here: kazoo stops
                # retrying after one, so retry with a fresh client.
                await backoff.sleep()
        finally:
            mirror.closed = True
            self._mirror = None
