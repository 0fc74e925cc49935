"""Membership in etcd through python-etcd3 (the layout and the epoch rule are in
:mod:`dispatcher.sharding.membership`'s docstring).

python-etcd3 is blocking: every call runs in a trio worker thread, and its watch callback (on
its own thread) only hands the response to the trio task through a bounded channel and never
waits; all state lives in the trio task.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from dispatcher.backoff import Backoff
from dispatcher.sharding.membership_core import (
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    Bell,
    PendingWrites,
    Registration,
    View,
    ViewFeed,
    log,
    quote_service,
    unquote_service,
)
from dispatcher.store_clients import describe_etcd_error as _describe
from dispatcher.store_clients import etcd_client
from dispatcher.tls import ClientTls

__all__ = ["EtcdMembership"]


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


class _EtcdShared:
    """What an :class:`EtcdMembership` and its sessions share (trio thread only): the settings,
    the intents the handle records, and what the sessions hold on the handle's behalf across
    reconnects (the lease, and what was last written with it)."""

    def __init__(
        self,
        host: str,
        port: int,
        root: str,
        lease_ttl: int,
        stamp_grace: float,
        timeout: float,
        feed: ViewFeed,
        tls: ClientTls | None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.root = root
        self.lease_ttl = lease_ttl
        self.stamp_grace = stamp_grace
        self.timeout = timeout
        self.feed = feed
        self.wanted = PendingWrites()
        self.bell = Bell()
        self.lease_id: int | None = None
        self.written: tuple[Registration | None, int | None] = (None, None)

    def client(self) -> Any:
        """A new python-etcd3 client (blocking: call it in a worker thread)."""
        return etcd_client(self.host, self.port, timeout=self.timeout, tls=self.tls)

    def key(self, part: str, name: str = "") -> str:
        return f"{self.root}/{part}/{name}" if part != "epoch" else f"{self.root}/epoch"


class _EtcdGone(Exception):
    """The session's watch ended or the lease is gone: start a new session."""


class EtcdMembership:
    """Membership in etcd through python-etcd3 (see :mod:`dispatcher.sharding.membership`).

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
        lease_ttl: float = DEFAULT_SESSION_TIMEOUT,
        *,
        stamp_grace: float = 2.0,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        tls: ClientTls | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.root = root
        self.lease_ttl = max(1, math.ceil(lease_ttl))
        self.stamp_grace = stamp_grace
        self.timeout = timeout
        self.feed = ViewFeed()
        self._shared = _EtcdShared(
            host, port, root, self.lease_ttl, stamp_grace, timeout, self.feed, tls
        )

    # -- intents -------------------------------------------------------------------

    def register(self, registration: Registration) -> None:
        self._shared.wanted.registration = registration
        self._shared.bell.ring()

    def set_warm(self, epoch: int) -> None:
        self._shared.wanted.warm = epoch
        self._shared.bell.ring()

    def add_services(self, names: Iterable[str]) -> None:
        self._shared.wanted.add_services(names)
        self._shared.bell.ring()

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import etcd3  # noqa: F401  (fail here, loudly, if the client library is missing)

        task_status.started()
        backoff = Backoff(initial=0.2, maximum=5.0)
        try:
            while True:
                try:
                    session = _EtcdSession(self._shared, trio.lowlevel.current_trio_token())
                except OSError as exc:
                    # A certificate file gone or unreadable since the start: say so, and
                    # try again, as for an etcd that is down.
                    log.warning(
                        "cannot read the etcd client's TLS files; retrying",
                        extra={"address": f"{self.host}:{self.port}", "error": str(exc)},
                    )
                    await backoff.sleep()
                    continue
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
        registration, lease_id = self._shared.wanted.registration, self._shared.lease_id
        if registration is None or lease_id is None:
            return
        try:
            client = self._shared.client()
        except OSError as exc:
            log.warning("could not leave etcd cleanly; the lease will expire",
                        extra={"member": registration.id, "error": str(exc)})  # fmt: skip
            return
        try:
            member_key = self._shared.key("members", registration.id)
            # Only our own record (bound to our lease): never a successor's.
            value, meta = client.get(member_key)
            ops = [client.transactions.delete(self._shared.key("warm", registration.id))]
            compare = []
            if value is not None and meta.lease_id == lease_id:
                compare = [client.transactions.mod(member_key) == meta.mod_revision]
                ops += [
                    client.transactions.delete(member_key),
                    client.transactions.put(
                        self._shared.key("epoch"), json.dumps({"left": registration.id})
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
    def __init__(self, shared: _EtcdShared, token: trio.lowlevel.TrioToken) -> None:
        self.shared = shared
        self.token = token
        self.client = shared.client()
        self.state = _EtcdState()
        self.inbox_send, self.inbox = trio.open_memory_channel[Any](1024)
        self.overflowed = False
        #: Our own member record was deleted under us: a new session writes it again.
        self.lost_record = False
        self.watch_id: int | None = None
        self.prefix = shared.root + "/"

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
        shared = self.shared
        registration, warm = shared.wanted.registration, shared.wanted.warm
        if registration is None:
            return False
        if shared.lease_id is None or not await self._call(self._lease_alive, shared.lease_id):
            lease = await self._call(self.client.lease, shared.lease_ttl)
            shared.lease_id = lease.id
        await self._call(self._put_member, registration, shared.lease_id)
        if warm is not None:
            await self._call(self._put_warm, registration.id, warm, shared.lease_id)
        shared.written = (registration, warm)
        return True

    def _lease_alive(self, lease_id: int) -> bool:
        responses = list(self.client.refresh_lease(lease_id))
        return bool(responses) and responses[0].TTL > 0

    def _put_member(self, registration: Registration, lease_id: int) -> None:
        client, shared = self.client, self.shared
        key = shared.key("members", registration.id)
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
                "member id registered by another process; waiting for its lease to expire",
                extra={"member": registration.id, "registered": existing.decode(errors="replace")},
            )
            return

    def _put_warm(self, member_id: str, epoch: int, lease_id: int) -> None:
        self.client.put(self.shared.key("warm", member_id), str(epoch), lease=lease_id)

    def _put_services(self, names: list[str]) -> None:
        client = self.client
        for name in names:
            key = self.shared.key("services", quote_service(name))
            client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, b"")],
                failure=[],
            )

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        shared = self.shared
        while True:
            # A pass first, without waiting: a ring the previous session took may have left
            # work undone.
            wanted = shared.wanted
            if wanted.registration != shared.written[0]:
                if shared.written[0] is not None:
                    # Registered again with another id or other addresses (rare): a new
                    # session does it all, from a clean slate.
                    raise _EtcdGone("registration changed")
                # Registered after the session started (a gateway joins once its ports are
                # bound): join now, and keep the lease alive from here on.
                await self._write_registration()
                nursery.start_soon(self._keep_alive)
            if wanted.registration is not None and wanted.warm != shared.written[1]:
                assert shared.lease_id is not None
                warm = wanted.warm
                if warm is not None:
                    await self._call(self._put_warm, wanted.registration.id, warm, shared.lease_id)
                shared.written = (wanted.registration, warm)
            if wanted.services:
                names = list(wanted.services)
                await self._call(self._put_services, names)
                for name in names:
                    wanted.services.pop(name, None)
            await shared.bell.wait()

    async def _keep_alive(self) -> None:
        shared = self.shared
        assert shared.lease_id is not None
        while True:
            await trio.sleep(shared.lease_ttl / 3)
            if not await self._call(self._lease_alive, shared.lease_id):
                shared.lease_id = None
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
            registration = self.shared.wanted.registration
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
        client, key = self.client, self.shared.key("epoch")
        await self._call(
            lambda: client.transaction(
                compare=[client.transactions.mod(key) < newest],
                success=[client.transactions.put(key, json.dumps({"departure": newest}))],
                failure=[],
            )
        )

    async def _stamp_timer(self) -> None:
        """Publish a view held back for a stamp that does not come (nobody could write it)."""
        grace = self.shared.stamp_grace
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
        self.shared.feed.publish(
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
