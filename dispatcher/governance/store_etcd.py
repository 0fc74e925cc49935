"""The governance store in etcd through python-etcd3 (layout and write rule in
:mod:`dispatcher.governance.store`).

python-etcd3 is blocking: every call runs in a trio worker thread, bounded by the request
timeout. Its watch callback runs on the library's own thread and only rings the watcher's bell
(through ``trio.from_thread``); the watcher then reads the head itself, so nothing queues up
however fast the head changes, and a broken watch is simply made again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar

import attrs
import trio

from dispatcher.backoff import Backoff
from dispatcher.governance.store import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HISTORY,
    DEFAULT_REQUEST_TIMEOUT,
    Conflict,
    GovernanceError,
    GovernanceStore,
    Revision,
    StoreUnavailable,
    governance_base,
)
from dispatcher.sharding.membership_core import Bell
from dispatcher.store_clients import describe_etcd_error as _describe
from dispatcher.store_clients import etcd_client
from dispatcher.tls import ClientTls

log = logging.getLogger(__name__)

__all__ = ["EtcdGovernanceStore", "open_etcd_store"]

_T = TypeVar("_T")
_DIGITS: Final = 10


@attrs.define
class _WatchState:
    """What a watch callback may tell its watcher (set from the trio thread only)."""

    bell: Bell = attrs.field(factory=Bell)
    broken: str | None = None


class EtcdGovernanceStore(GovernanceStore):
    """Governance documents of one kind under ``<root>/governance/<kind>/`` in etcd. Open it
    with :func:`open_etcd_store`."""

    def __init__(
        self,
        host: str,
        port: int,
        root: str,
        kind: str,
        *,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_body: int = DEFAULT_MAX_BODY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        tls: ClientTls | None = None,
    ) -> None:
        """Raises OSError if a certificate file of ``tls`` cannot be read."""
        super().__init__(kind, max_history=max_history, max_body=max_body)
        self.base = governance_base(root, kind)
        self.head = f"{self.base}/head"
        self.request_timeout = request_timeout
        self.client = etcd_client(host, port, timeout=request_timeout, tls=tls)

    def _rev_key(self, version: int) -> str:
        return f"{self.base}/rev/{version:0{_DIGITS}d}"

    async def _call(self, function: Callable[..., _T], *args: Any, abandon: bool = True) -> _T:
        """``function(*args)`` in a worker thread; StoreUnavailable on a timeout or an etcd
        error (the library raises its own exceptions and gRPC's). ``abandon=False`` for a call
        that must not outlive its caller (it is bounded by the client's own timeout)."""
        with trio.move_on_after(self.request_timeout + 1):
            try:
                return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=abandon)
            except GovernanceError:
                raise
            except Exception as exc:
                raise StoreUnavailable(f"{self.kind}: etcd: {_describe(exc)}") from None
        raise StoreUnavailable(f"{self.kind}: etcd did not answer within {self.request_timeout}s")

    def _parse(self, key: str, value: bytes | None) -> Revision | None:
        if value is None:
            return None
        try:
            return Revision.from_json(value)
        except ValueError as exc:
            raise GovernanceError(f"{self.kind}: {key}: {exc}") from None

    # -- reading -------------------------------------------------------------------

    async def current(self) -> Revision | None:
        value, _ = await self._call(self.client.get, self.head)
        return self._parse(self.head, value)

    async def revision(self, version: int) -> Revision | None:
        key = self._rev_key(version)
        value, _ = await self._call(self.client.get, key)
        return self._parse(key, value)

    async def _history(self, limit: int | None) -> list[Revision]:
        def read() -> list[tuple[bytes, bytes]]:
            found = self.client.get_prefix(
                f"{self.base}/rev/", sort_order="descend", sort_target="key", limit=limit
            )
            return [(meta.key, value) for value, meta in found]

        return [
            revision
            for key, value in await self._call(read)
            if (revision := self._parse(key.decode(errors="replace"), value)) is not None
        ]

    # -- writing -------------------------------------------------------------------

    async def _commit(self, revision: Revision, expected_version: int) -> None:
        data = revision.to_json()

        def attempt() -> tuple[bool, int]:
            """``(written, the current version as read)``."""
            client = self.client
            value, meta = client.get(self.head)
            head = self._parse(self.head, value)
            current = 0 if head is None else head.version
            if current != expected_version:
                return False, current
            # mod_revision 0 is etcd's "no such key": the first write compares against it.
            mod_revision = 0 if value is None else meta.mod_revision
            success = [
                client.transactions.put(self._rev_key(revision.version), data),
                client.transactions.put(self.head, data),
            ]
            oldest_kept = self._oldest_kept(revision.version)
            if oldest_kept > 1:
                # One range delete, however many revisions fall out (a lowered max_history).
                success.append(
                    client.transactions.delete(
                        self._rev_key(0), range_end=self._rev_key(oldest_kept)
                    )
                )
            written, _ = client.transaction(
                compare=[client.transactions.mod(self.head) == mod_revision],
                success=success,
                failure=[],
            )
            if written:
                return True, revision.version
            value, _ = client.get(self.head)
            head = self._parse(self.head, value)
            return False, 0 if head is None else head.version

        try:
            written, current = await self._call(attempt)
        except StoreUnavailable:
            await self._settle_lost_write(revision, expected_version)
            return
        if not written:
            raise Conflict(self.kind, current, expected_version)

    async def _settle_lost_write(self, revision: Revision, expected_version: int) -> None:
        """The transaction's answer was lost: find out whether it applied."""
        head = await self.current()
        if head is not None and head.to_json() == revision.to_json():
            return
        current = 0 if head is None else head.version
        if current != expected_version:
            raise Conflict(self.kind, current, expected_version)
        raise StoreUnavailable(f"{self.kind}: etcd did not answer; the write was not applied")

    # -- watching ------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[Revision]:
        token = trio.lowlevel.current_trio_token()
        backoff = Backoff(initial=0.2, maximum=5.0)
        seen = 0
        while True:
            state = _WatchState()

            def deliver(response_or_error: Any, state: _WatchState = state) -> None:
                def note() -> None:
                    # An error, or None: the library's watch stream ended, taking every
                    # watch on it.
                    if response_or_error is None:
                        state.broken = "the watch stream ended"
                    elif isinstance(response_or_error, BaseException):
                        state.broken = _describe(response_or_error)
                    state.bell.ring()

                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(note, trio_token=token)

            watch_id: int | None = None
            try:
                # Armed before the first read, so no change falls between the two. Not
                # abandoned on cancellation: a watch created after the client closed would
                # fail in the library's thread, and one created unseen would never be
                # cancelled.
                watch_id = await self._call(
                    self.client.add_watch_callback, self.head, deliver, abandon=False
                )
                while state.broken is None:
                    head = await self.current()
                    backoff.reset()
                    if head is not None and head.version > seen:
                        seen = head.version
                        yield head
                    await state.bell.wait()
                raise StoreUnavailable(f"{self.kind}: the etcd watch ended: {state.broken}")
            except GovernanceError as exc:
                log.warning("governance watch failed; watching again",
                            extra={"kind": self.kind, "error": str(exc)})  # fmt: skip
            finally:
                if watch_id is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.request_timeout):
                        await trio.to_thread.run_sync(self._cancel_watch, watch_id)
            await backoff.sleep()

    def _cancel_watch(self, watch_id: int) -> None:
        with contextlib.suppress(Exception):
            self.client.cancel_watch(watch_id)

    def close(self) -> None:
        """Close the client (blocking: call it from a worker thread)."""
        with contextlib.suppress(Exception):
            self.client.close()


@contextlib.asynccontextmanager
async def open_etcd_store(
    host: str,
    port: int,
    root: str,
    kind: str,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    max_body: int = DEFAULT_MAX_BODY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    tls: ClientTls | None = None,
) -> AsyncIterator[EtcdGovernanceStore]:
    """A store on its own etcd client (over TLS with ``tls``), closed when the block ends."""
    store = EtcdGovernanceStore(
        host,
        port,
        root,
        kind,
        max_history=max_history,
        max_body=max_body,
        request_timeout=request_timeout,
        tls=tls,
    )
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
