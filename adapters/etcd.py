"""etcd v3 as an upstream: key prefixes of an etcd cluster, listed once and then watched.

Configuration (one ``[upstream.<name>]`` table, kind ``etcd``)::

    endpoint = "127.0.0.1:2379"          # required, "host:port" ("[::1]:2379" for IPv6)
    prefixes = [                         # required, at least one, none inside another
      { prefix = "/services/", layout = "grpc" },
      { prefix = "/registry/", layout = "plain" },
    ]
    timeout = 5.0                        # optional: seconds per etcd request
    max_backoff = 10.0                   # optional: longest pause between reconnects
    tls = { ca = "ca.pem", cert = "client.pem", key = "client-key.pem" }  # optional

``tls`` (:func:`dispatcher.tls.parse_client_tls`) speaks TLS to etcd: ``ca``
verifies etcd's certificate (gRPC's own roots without it), ``cert``/``key``
is the client certificate etcd's ``--client-cert-auth`` asks for,
``server_name`` the name checked against etcd's certificate (the endpoint's
host otherwise). A certificate etcd refuses is an outage like any other: one
warning per failed attempt naming gRPC's reason, and reconnects back off.

Layouts of the keys under a prefix (the service is always the part of the key
after the prefix up to its *last* ``/``, the instance id the part after it):

* ``grpc`` (the default): etcd's own gRPC naming format, as written by
  ``go.etcd.io/etcd/client/v3/naming/endpoints`` (and etcd 3.4's
  ``clientv3/naming``). The key is ``<prefix><target>/<suffix>``, where the
  target may itself hold ``/`` (``foo/bar/my-service``), and the value is
  ``{"Op":0,"Addr":"10.0.0.1:50051","Metadata":...}``. Op 0 (or absent) adds
  the endpoint; Op 1 (Delete) means the key holds no endpoint. Field names
  match case-insensitively, as Go's ``encoding/json`` reads them. ``Addr``
  must carry a numeric port. A ``Metadata`` object becomes the instance's
  metadata (strings as they are, other scalars and nested values as JSON
  text); any other non-null ``Metadata`` is kept whole under ``metadata``.
  The protocol is ``grpc``.
* ``plain``: zkgate's plain JSON layout (:mod:`adapters.layouts.plain`),
  key ``<prefix><service>/<instance id>``; the service is one key segment.

Keys bound to a lease are ephemeral instances: they carry the metadata entry
``etcd.lease`` (the lease id as ``etcdctl`` prints it, 16 hex digits), and the
lease's expiry reaches us as the key's deletion, which removes the instance. A key
whose value cannot be read is skipped with one warning; if it held an
instance before, that instance is removed, so that the watch path and a
re-list always agree on what a key means.

Protocol with etcd, per connection: range every watched key range at one
revision R (paged, so no response outgrows gRPC's message limit), emit a
:class:`~dispatcher.core.upstream.Listing`, then watch from R+1, so that no change
is missed or seen twice. Every reconnect re-lists (the fan-in diffs the
listing against what it held, so consumers see exactly the changes made
while we were away), and so does a watch whose start revision was compacted
away (``ErrCompacted``). A fresh client is built for every connection:
python-etcd3 refuses to use an endpoint for 300 s after it saw it fail.
``Status(True)`` is sent once listed *and* watching; ``Status(False)`` when
that stops (etcd gone, gRPC ``UNAVAILABLE``), then reconnects back off with
full jitter. A resync on a live connection (compaction, overflow) is no outage
and sends no Status.

Interest (:meth:`EtcdUpstream.set_interest`): with None, one watch per
prefix. With a set of services, one watch per service and prefix, on
``<prefix><service>/`` (a watch on the whole prefix would make etcd send us
every change of every service only for us to drop most of them). Each watch
only accepts its own service's keys, so a grpc target nested inside another
(``a`` and ``a/b``) is never reported twice. Narrowing cancels watches;
going from "all" to a set restarts each service's watch exactly where its
prefix watch had got to; widening lists the new services at one revision
(a ``Listing`` with ``services`` = the new ones) and watches them from there.

The client library is PyPI ``etcd3-fc``: python-etcd3's later upstream code
with regenerated protobuf modules, so ``import etcd3`` works with protobuf 4
and later on the default (upb) backend and needs no
``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` from the user (the last
``etcd3`` release, 0.12.0, fails to import there).

Threads: python-etcd3 is blocking. Its requests run in trio worker threads;
its watches deliver in its own gRPC thread, which posts each response to the
session's bounded inbox through ``trio.from_thread.run_sync`` and never
waits for the Dispatcher. A full inbox (a Dispatcher that fell far behind)
turns into a resync rather than unbounded memory or a stalled stream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Self

import attrs
import etcd3
import etcd3.events
import etcd3.exceptions
import etcd3.utils
import grpc
import trio

from adapters import layouts
from adapters.layouts import plain
from dispatcher.backoff import Backoff
from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Change, Put, Remove
from dispatcher.core.upstream import (
    Changed,
    ConfigError,
    Inspection,
    Listing,
    Status,
    UpstreamEvent,
    check_type,
    reject_unknown,
    require,
)
from dispatcher.store_clients import describe_etcd_error, etcd_client
from dispatcher.tls import ClientTls, parse_client_tls
from dispatcher.wire import join_address, parse_address

__all__ = ["LAYOUTS", "LEASE_KEY", "EtcdUpstream", "PrefixSpec"]

_log = logging.getLogger(__name__)

LAYOUTS: Final = ("grpc", "plain")
"""The key layouts a prefix may use."""

LEASE_KEY: Final = "etcd.lease"
"""Metadata entry naming the lease (16 hex digits) that a lease-bound key's instance lives by."""

_DEFAULT_TIMEOUT: Final = 5.0
_DEFAULT_MAX_BACKOFF: Final = 10.0
_PAGE: Final = 1000
"""Keys per range request while listing."""
_INBOX: Final = 1024
"""Watch responses that may wait for the Dispatcher before we resync instead."""
_MAX_MESSAGE: Final = 64 * 1024 * 1024
"""Largest gRPC message accepted: one watch response holds a whole transaction's events."""
_GRPC_OPTIONS: Final = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # A silently dead peer (power loss, partition) never closes the watch
    # stream; keepalive pings notice it. etcd refuses pings more often than
    # every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
)
_GRPC_OP_ADD: Final = 0
_GRPC_OP_DELETE: Final = 1
_FAILURES: Final = (etcd3.exceptions.Etcd3Exception, grpc.RpcError, OSError)
"""What python-etcd3 raises when etcd cannot be reached or refuses a request (and what
reading a ``tls`` certificate file that went away raises)."""


# ----------------------------------------------------------------------- config


@attrs.frozen
class PrefixSpec:
    """One watched key prefix and the layout its keys follow (``grpc`` or ``plain``)."""

    prefix: str
    layout: str = "grpc"


def _parse_endpoint(value: str, where: str) -> tuple[str, int]:
    """``(host, port)``; an IPv6 host keeps its brackets, which gRPC's target needs."""
    try:
        host, port = parse_address(value, default_host=None, allow_port_zero=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: key 'endpoint' must be 'host:port': {exc}") from None
    return join_address(host, port).removesuffix(f":{port}"), port


def _parse_prefixes(value: object, where: str) -> tuple[PrefixSpec, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: key 'prefixes' must be a non-empty list of tables")
    specs: list[PrefixSpec] = []
    for index, table in enumerate(value):
        at = f"{where}: prefixes[{index}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f'{at} must be a table like {{prefix = "/services/"}}')
        reject_unknown(table, ("prefix", "layout"), at)
        prefix = require(table, "prefix", str, at)
        layout = check_type(table.get("layout", "grpc"), "layout", str, at)
        if not prefix:
            raise ConfigError(f"{at}: key 'prefix' must not be empty")
        if layout not in LAYOUTS:
            raise ConfigError(f"{at}: key 'layout' must be one of {', '.join(LAYOUTS)}")
        for other in specs:
            if prefix.startswith(other.prefix) or other.prefix.startswith(prefix):
                # One key would then be reported by two watches, twice over.
                raise ConfigError(f"{at}: key 'prefix' {prefix!r} overlaps {other.prefix!r}")
        specs.append(PrefixSpec(prefix, layout))
    return tuple(specs)


def _positive(options: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = check_type(options.get(key, default), key, float, where)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}: key {key!r} must be a positive number of seconds")
    return value


# --------------------------------------------------------------------- decoding


@attrs.frozen
class _Record:
    """What one etcd key says: its instance, or None when it holds none (Op 1, garbage)."""

    service: str
    instance_id: str
    instance: Instance | None


def _identity(spec: PrefixSpec, key: str) -> tuple[str, str] | None:
    """``(service, instance id)`` named by ``key`` under ``spec``, or None."""
    directory, slash, name = key[len(spec.prefix) :].rpartition("/")
    if not slash or not name or not directory:
        return None
    if spec.layout == "grpc":
        return directory, name
    service = plain.service_of(directory)
    instance_id = layouts.node_text(name)
    if service is None or not instance_id:
        return None
    return service, instance_id


def _field(record: Mapping[str, Any], name: str) -> Any:
    # Go's encoding/json, which etcd's resolver reads with, ignores case.
    if name in record:
        return record[name]
    lowered = name.lower()
    return next((v for k, v in record.items() if k.lower() == lowered), None)


def _split_addr(addr: str) -> tuple[str, int] | None:
    try:
        return parse_address(addr, default_host=None)
    except ValueError:
        return None


def _grpc_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        text = layouts.as_text(value)
        return {"metadata": text if text is not None else json.dumps(value, sort_keys=True)}
    metadata: dict[str, str] = {}
    for key, item in value.items():
        if item is None:
            continue
        text = layouts.as_text(item)
        metadata[key] = text if text is not None else json.dumps(item, sort_keys=True)
    return metadata


def _grpc_instance(
    service: str, instance_id: str, value: bytes, source: Source
) -> Instance | str | None:
    """The endpoint in an etcd naming value; None for Op 1 (Delete); a str says what is wrong."""
    record = layouts.json_object(value)
    if record is None:
        return "value is not a JSON object"
    raw_op = _field(record, "Op")
    op = _GRPC_OP_ADD if raw_op is None else layouts.as_int(raw_op)
    if op == _GRPC_OP_DELETE:
        return None
    if op != _GRPC_OP_ADD:
        return f"unknown Op {raw_op!r}"
    addr = _field(record, "Addr")
    endpoint = _split_addr(addr) if isinstance(addr, str) else None
    if endpoint is None:
        return f"Addr {addr!r} is not host:port"
    try:
        return Instance(
            service,
            instance_id,
            endpoint[0],
            endpoint[1],
            protocol="grpc",
            metadata=_grpc_metadata(_field(record, "Metadata")),
            source=source,
        )
    except (TypeError, ValueError) as exc:
        return str(exc)


def _decode(
    spec: PrefixSpec, adapter: str, key: str, value: bytes, revision: int, lease: int
) -> _Record | None:
    """One key-value under ``spec``; None when the key names no instance (logged).

    Garbage values are logged here, the one place both the listing and the
    watch paths go through, and become a record without an instance.
    """
    identity = _identity(spec, key)
    if identity is None:
        _log.warning(
            "ignoring an etcd key",
            extra={"upstream": adapter, "key": key, "reason": "not <service>/<id>"},
        )
        return None
    service, instance_id = identity
    source = Source(adapter, key, revision)
    instance: Instance | str | None
    if spec.layout == "grpc":
        instance = _grpc_instance(service, instance_id, value, source)
    else:
        name = key.rpartition("/")[2]
        instance = plain.parse(service, name, value, source=source)
        if instance is None:
            instance = "not a plain-layout instance"
    if isinstance(instance, str):
        _log.warning(
            "ignoring an etcd key",
            extra={"service": service, "upstream": adapter, "key": key, "reason": instance},
        )
        instance = None
    if instance is not None and lease:
        metadata = {**instance.metadata, LEASE_KEY: format(lease, "016x")}
        instance = attrs.evolve(instance, metadata=metadata)
    return _Record(service, instance_id, instance)


def _key_text(key: bytes, adapter: str) -> str | None:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        _log.warning(
            "ignoring an etcd key",
            extra={
                "upstream": adapter,
                "key": key.decode("utf-8", "backslashreplace"),
                "reason": "not UTF-8",
            },
        )
        return None


# ---------------------------------------------------------------------- session


@attrs.frozen
class _Scope:
    """What one watch covers: a whole prefix (``service`` None) or one service under it."""

    spec: PrefixSpec
    service: str | None = None

    @property
    def key(self) -> bytes:
        if self.service is None:
            return self.spec.prefix.encode()
        return f"{self.spec.prefix}{self.service}/".encode()

    def accepts(self, service: str) -> bool:
        return self.service is None or self.service == service


@attrs.define
class _Watch:
    """One live etcd watch, as the trio side tracks it."""

    scope: _Scope
    #: Every event of ``scope`` up to this revision has been handled.
    seen: int
    watch_id: int | None = None


@attrs.frozen
class _Response:
    tag: int
    response: Any  # etcd3.watch.WatchResponse


@attrs.frozen
class _Ended:
    """A watch stopped: the stream failed (``error``), ended (None) or was compacted."""

    tag: int
    error: BaseException | None


@attrs.frozen
class _InterestChanged:
    pass


_Item = _Response | _Ended | _InterestChanged


class _Resync(Exception):
    """List everything again on a new connection; not an outage."""


class _Inbox:
    """The session's bounded mailbox. Posting never blocks; a full inbox asks for a resync.

    Used from the trio thread only: the gRPC thread reaches :meth:`post`
    through ``trio.from_thread.run_sync``.
    """

    def __init__(self, capacity: int) -> None:
        self._send, self.receive = trio.open_memory_channel[_Item](capacity)
        self.overflowed = False

    def post(self, item: _Item) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            # Receiving will wake up (the channel is full) and see the flag.
            self.overflowed = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # a late delivery to a finished session

    def close(self) -> None:
        self._send.close()
        self.receive.close()


#: What one etcd key decoded to at one mod_revision (None: no instance).
_Decoded = tuple[int, Instance | None]


@attrs.frozen
class _Reuse:
    """Decodings to reuse and to keep: ``previous`` by key (with the key's
    mod_revision: a key at the same mod_revision holds the same value), and
    ``fresh``, this read's, to be kept (None: nothing kept)."""

    previous: Mapping[bytes, _Decoded]
    fresh: dict[bytes, _Decoded] | None


def _range_scopes(
    client: etcd3.Etcd3Client, scopes: Sequence[_Scope], adapter: str,
    pages: list[int] | None = None, reuse: _Reuse | None = None,
) -> tuple[int, list[Instance]]:  # fmt: skip
    """Every instance in ``scopes``, all read at one revision, and that revision.

    Runs in a worker thread (blocking requests, and JSON decoding that would
    stall the trio loop on a large registry).
    """
    revision = 0  # 0: the first response fixes the revision every later page reads at
    instances: list[Instance] = []
    for scope in scopes:
        start = scope.key
        end = etcd3.utils.prefix_range_end(start)
        while True:
            response = client.get_range_response(start, end, limit=_PAGE, revision=revision or None)
            if pages is not None:
                pages.append(1)  # the requests made, for inspection's cost
            revision = revision or response.header.revision
            for kv in response.kvs:
                if reuse is not None:
                    known = reuse.previous.get(kv.key)
                    if known is not None and known[0] == kv.mod_revision:
                        if reuse.fresh is not None:
                            reuse.fresh[kv.key] = known
                        if known[1] is not None and scope.accepts(known[1].service):
                            instances.append(known[1])
                        continue
                key = _key_text(kv.key, adapter)
                record = (
                    None
                    if key is None
                    else _decode(scope.spec, adapter, key, kv.value, kv.mod_revision, kv.lease)
                )
                if reuse is not None and reuse.fresh is not None:
                    reuse.fresh[kv.key] = (kv.mod_revision, record.instance if record else None)
                if record and record.instance and scope.accepts(record.service):
                    instances.append(record.instance)
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\x00"
    if not revision:
        # Nothing to list (an empty interest): still ask etcd, so that
        # "connected" means etcd answered.
        revision = client.get_response(b"\x00").header.revision
    return revision, instances


class _Session:
    """One connection to etcd: list, watch, follow interest, until something fails.

    Raises :class:`_Resync` when the watches lost continuity (compaction,
    inbox overflow) and python-etcd3's or gRPC's errors when etcd is gone.
    """

    def __init__(self, upstream: EtcdUpstream, token: trio.lowlevel.TrioToken) -> None:
        self._upstream = upstream
        self._token = token
        self.inbox = _Inbox(_INBOX)
        self._client: etcd3.Etcd3Client | None = None
        self._watches: dict[int, _Watch] = {}
        self._tags = itertools.count()
        #: The interest the current watches implement.
        self._scope: frozenset[str] | None = None

    @property
    def client(self) -> etcd3.Etcd3Client:
        if self._client is None:
            self._client = self._upstream.client(grpc_options=_GRPC_OPTIONS)
        return self._client

    async def serve(
        self,
        events: trio.MemorySendChannel[UpstreamEvent],
        on_listed: Callable[[int], Awaitable[None]],
    ) -> None:
        """List, then follow the watches; returns only by raising."""
        upstream = self._upstream
        self._scope = upstream.kept = upstream.interest
        revision, instances = await self._range(self._scopes(self._scope), whole=True)
        await events.send(Listing(tuple(instances), self._scope))
        await self._start([(scope, revision + 1) for scope in self._scopes(self._scope)])
        # Only now "connected": listed *and* following.
        await on_listed(revision)
        while True:
            item: _Item | None = await self.inbox.receive.receive()
            changes: list[Change] = []
            # Batch what is already waiting: one snapshot apply per batch.
            while isinstance(item, _Response):
                changes.extend(self._translate(item))
                try:
                    item = self.inbox.receive.receive_nowait()
                except trio.WouldBlock:
                    item = None
            if changes:
                await events.send(Changed(tuple(changes)))
            if self.inbox.overflowed:
                raise _Resync("the Dispatcher fell behind the watch stream")
            if isinstance(item, _Ended) and item.tag in self._watches:
                if isinstance(item.error, etcd3.exceptions.RevisionCompactedError):
                    raise _Resync(f"revision compacted (up to {item.error.compacted_revision})")
                if item.error is None:
                    raise etcd3.exceptions.ConnectionFailedError()
                raise item.error
            if isinstance(item, _InterestChanged):
                await self._follow_interest(events)

    def _scopes(self, services: frozenset[str] | None) -> list[_Scope]:
        specs = self._upstream.prefixes
        if services is None:
            return [_Scope(spec) for spec in specs]
        return [_Scope(spec, service) for spec in specs for service in sorted(services)]

    async def _range(
        self, scopes: Sequence[_Scope], *, whole: bool = False
    ) -> tuple[int, list[Instance]]:
        """List ``scopes`` at one revision; what each key decoded to becomes the
        upstream's :attr:`~EtcdUpstream.applied` (all of it when the listing is
        ``whole``: everything the session watches)."""
        upstream = self._upstream
        # A key still at the mod_revision applied before (a relist after a
        # reconnect or a compaction) is not decoded again.
        reuse = _Reuse(upstream.applied, {})
        listed = await trio.to_thread.run_sync(
            _range_scopes, self.client, scopes, upstream.name, None, reuse, abandon_on_cancel=True
        )
        assert reuse.fresh is not None
        if whole:
            upstream.applied = reuse.fresh
        else:
            upstream.applied.update(reuse.fresh)
        return listed

    async def _follow_interest(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        upstream = self._upstream
        wanted, current = upstream.interest, self._scope
        kept, upstream.kept = upstream.kept, wanted
        # Wanted again after being dropped: the fan-in forgot these even if
        # the two changes cancel out here, so they are listed again.
        forgotten = frozenset() if wanted is None or kept is None else wanted - kept
        if wanted == current and not forgotten:
            return
        self._scope = wanted
        if wanted is None:
            # Everything: per-service watches give way to prefix watches, from
            # a fresh listing of everything.
            await self._cancel(list(self._watches))
            revision, instances = await self._range(self._scopes(None), whole=True)
            await events.send(Listing(tuple(instances), None))
            await self._start([(scope, revision + 1) for scope in self._scopes(None)])
        elif current is None:
            # Narrowing from everything: each service's watch resumes where
            # its prefix's watch stopped, so nothing needs listing again.
            resume = {watch.scope.spec: watch.seen + 1 for watch in self._watches.values()}
            await self._cancel(list(self._watches))
            upstream.forget_unwanted(wanted)
            await self._start([(scope, resume[scope.spec]) for scope in self._scopes(wanted)])
            await self._relist(forgotten, events)
        else:
            dropped = current - wanted
            await self._cancel(
                [tag for tag, watch in self._watches.items() if watch.scope.service in dropped]
            )
            if dropped:
                upstream.forget_unwanted(wanted)
            added = wanted - current
            if added:
                scopes = self._scopes(added)
                revision, instances = await self._range(scopes)
                await events.send(Listing(tuple(instances), added))
                await self._start([(scope, revision + 1) for scope in scopes])
            await self._relist(forgotten - added, events)

    async def _relist(
        self, services: frozenset[str], events: trio.MemorySendChannel[UpstreamEvent]
    ) -> None:
        """List services that stay watched but that the fan-in forgot meanwhile."""
        if services:
            _revision, instances = await self._range(self._scopes(services))
            await events.send(Listing(tuple(instances), services))

    async def _start(self, starts: Iterable[tuple[_Scope, int]]) -> None:
        watches = [(next(self._tags), scope, revision) for scope, revision in starts]
        for tag, scope, revision in watches:
            # Registered before etcd confirms it: responses may beat the confirmation.
            self._watches[tag] = _Watch(scope, revision - 1)

        # Taken here, not in the thread: an abandoned thread must not build a
        # new client after aclose() dropped this one.
        client = self.client
        requests = [(scope.key, self._callback(tag), revision) for tag, scope, revision in watches]

        def create() -> list[int]:
            return [
                client.add_watch_prefix_callback(
                    key, callback, start_revision=revision, progress_notify=True
                )
                for key, callback, revision in requests
            ]

        # Not abandoned on cancellation: python-etcd3 would start its watch
        # thread on a channel aclose() has closed. It returns within
        # ``timeout`` (etcd answers, or the stream fails and says so).
        ids = await trio.to_thread.run_sync(create)
        for (tag, _, _), watch_id in zip(watches, ids, strict=True):
            if tag in self._watches:
                self._watches[tag].watch_id = watch_id

    async def _cancel(self, tags: Iterable[int]) -> None:
        # Forgotten first: whatever these watches still deliver is dropped.
        ids = [
            watch.watch_id
            for watch in (self._watches.pop(tag) for tag in list(tags))
            if watch.watch_id is not None
        ]
        if ids:
            client = self.client

            def cancel() -> None:
                for watch_id in ids:
                    client.cancel_watch(watch_id)

            await trio.to_thread.run_sync(cancel)

    def _callback(self, tag: int) -> Callable[[Any], None]:
        """What python-etcd3 calls, in its gRPC thread, with each response or error."""
        inbox, token = self.inbox, self._token

        def deliver(response_or_error: Any) -> None:
            item: _Item
            if response_or_error is None or isinstance(response_or_error, BaseException):
                item = _Ended(tag, response_or_error)
            else:
                item = _Response(tag, response_or_error)
            # After the trio run is over, so is the session.
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(inbox.post, item, trio_token=token)

        return deliver

    def _translate(self, item: _Response) -> list[Change]:
        watch = self._watches.get(item.tag)
        if watch is None:
            return []  # a cancelled watch's leftovers
        response = item.response
        if not response.events:
            # A progress notification: the watch has delivered everything up
            # to the header's revision.
            watch.seen = max(watch.seen, response.header.revision)
            return []
        adapter = self._upstream.name
        applied = self._upstream.applied
        changes: list[Change] = []
        for event in response.events:
            watch.seen = max(watch.seen, event.mod_revision)
            key = _key_text(event.key, adapter)
            if isinstance(event, etcd3.events.DeleteEvent):
                applied.pop(event.key, None)
                identity = None if key is None else _identity(watch.scope.spec, key)
                if identity is not None and watch.scope.accepts(identity[0]):
                    changes.append(Remove(*identity))
                continue
            record = (
                None
                if key is None
                else _decode(
                    watch.scope.spec, adapter, key, event.value, event.mod_revision, event.lease
                )
            )
            applied[event.key] = (event.mod_revision, None if record is None else record.instance)
            if record is None or not watch.scope.accepts(record.service):
                continue
            if record.instance is None:
                changes.append(Remove(record.service, record.instance_id))
            else:
                changes.append(Put(record.instance))
        return changes

    async def aclose(self) -> None:
        """Cancel the watches and close the client; safe to call on cancellation."""
        self.inbox.close()
        client, self._client = self._client, None
        if client is None:
            return
        ids = [watch.watch_id for watch in self._watches.values() if watch.watch_id is not None]
        self._watches.clear()

        def close() -> None:
            for watch_id in ids:
                try:
                    client.cancel_watch(watch_id)
                except _FAILURES:
                    break  # etcd is gone; closing the channel ends the watches anyway
            client.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)


# --------------------------------------------------------------------- upstream


def _describe(exc: BaseException) -> str:
    return describe_etcd_error(exc)


@attrs.define(eq=False)
class EtcdUpstream:
    """Instances registered under key prefixes of one etcd cluster (see the module doc)."""

    name: str
    host: str
    port: int
    prefixes: tuple[PrefixSpec, ...]
    timeout: float = _DEFAULT_TIMEOUT
    max_backoff: float = _DEFAULT_MAX_BACKOFF
    #: TLS to etcd (``tls`` option); None: plain text.
    tls: ClientTls | None = None
    #: What :meth:`set_interest` last asked for (None: every service).
    interest: frozenset[str] | None = attrs.field(default=None, init=False)
    #: The services wanted throughout since the interest was last applied
    #: (None: all): the fan-in forgets a service the moment interest in it is
    #: dropped, so one dropped and wanted again meanwhile is listed again.
    kept: frozenset[str] | None = attrs.field(default=None, init=False)
    _session: _Session | None = attrs.field(default=None, init=False, repr=False)
    #: Per key, the mod_revision the adapter last applied (listed, or seen in an
    #: event) and what the value decoded to: inspection decodes only the keys
    #: whose mod_revision differs (a key at the same one holds the same value).
    #: One entry per key of the services watched (deletions remove theirs, a
    #: listing of everything replaces it, narrowing the interest drops the
    #: services left), the Instance shared with what was sent to the fan-in.
    applied: dict[bytes, _Decoded] = attrs.field(factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        where = f"upstream {name!r}"
        reject_unknown(options, ("endpoint", "prefixes", "timeout", "max_backoff", "tls"), where)
        host, port = _parse_endpoint(require(options, "endpoint", str, where), where)
        if "prefixes" not in options:
            raise ConfigError(f"{where}: missing required key 'prefixes'")
        tls = None if "tls" not in options else parse_client_tls(options["tls"], f"{where}: tls")
        return cls(
            name,
            host,
            port,
            _parse_prefixes(options["prefixes"], where),
            timeout=_positive(options, "timeout", _DEFAULT_TIMEOUT, where),
            max_backoff=_positive(options, "max_backoff", _DEFAULT_MAX_BACKOFF, where),
            tls=tls,
        )

    def client(self, grpc_options: Sequence[tuple[str, Any]] = ()) -> etcd3.Etcd3Client:
        """A new python-etcd3 client of this etcd (over TLS if configured), with extra
        gRPC channel options. Raises OSError if a certificate file cannot be read."""
        return etcd_client(
            self.host, self.port, timeout=self.timeout, tls=self.tls, grpc_options=grpc_options
        )

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def forget_unwanted(self, wanted: frozenset[str]) -> None:
        """Drop from :attr:`applied` the keys of services not ``wanted`` (no longer
        watched, so their deletions would not remove them); keys holding no
        instance go too (decoding them again costs little)."""
        self.applied = {
            key: known
            for key, known in self.applied.items()
            if known[1] is not None and known[1].service in wanted
        }

    def set_interest(self, services: frozenset[str] | None) -> None:
        self.interest = None if services is None else frozenset(services)
        if self.interest is not None:
            self.kept = self.interest if self.kept is None else self.kept & self.interest
        if self._session is not None:
            self._session.inbox.post(_InterestChanged())

    async def inspect(self, services: frozenset[str] | None) -> Inspection:
        """Read ``services`` (None: every prefix whole) at one revision, on a client
        of its own so that the watches' connection is not disturbed; one paged
        range per prefix (per prefix and service when narrowed)."""

        specs = self.prefixes
        scopes = (
            [_Scope(spec) for spec in specs]
            if services is None
            else [_Scope(spec, s) for spec in specs for s in sorted(services)]
        )

        pages: list[int] = []
        # What the adapter applied is what the fan-in was sent: a key at that
        # mod_revision decodes the same (and was not missed), so only keys that
        # differ from it (changed, or missed) are decoded. Read from the worker
        # thread while events update it: single lookups, never an iteration.
        reuse = _Reuse(self.applied, None)

        def read() -> tuple[int, list[Instance]]:
            client = self.client()
            try:
                return _range_scopes(client, scopes, self.name, pages, reuse)
            finally:
                client.close()

        revision, instances = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
        # Every page is a request: a range of N keys costs N / _PAGE of them.
        return Inspection(tuple(instances), services, revision, max(1, len(pages)))

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        backoff = Backoff(maximum=self.max_backoff)
        connected: bool | None = None  # None: not known yet

        async def on_listed(revision: int) -> None:
            nonlocal connected
            backoff.reset()
            if connected is not True:
                connected = True
                await events.send(Status(True, f"etcd {self.endpoint} at revision {revision}"))

        while True:
            session = _Session(self, trio.lowlevel.current_trio_token())
            self._session = session
            try:
                await session.serve(events, on_listed)
            except _Resync as resync:
                # Not an outage: consumers keep fresh data; the backoff only
                # keeps a pathological loop from spinning.
                _log.info(
                    "etcd upstream resyncing", extra={"upstream": self.name, "reason": str(resync)}
                )
            except _FAILURES as exc:
                detail = f"etcd {self.endpoint}: {_describe(exc)}"
                _log.warning(
                    "etcd upstream failed; reconnecting",
                    extra={
                        "upstream": self.name,
                        "address": self.endpoint,
                        "error": _describe(exc),
                    },
                )
                if connected is not False:
                    connected = False
                    await events.send(Status(False, detail))
            finally:
                self._session = None
                await session.aclose()
            await backoff.sleep()
