"""Layer "mirror": each mirror's cache against its ensemble, sampled, at a known zxid.

A pass takes a sample of each mirror's cached znodes (at most
``sample`` per mirror, a different slice each pass, so that the whole
cache is covered over passes), reads them on a session of its own
(``sync`` on the mirrored root, then ``multiRead`` of their data and, where
the cache holds children, their children, in chunks), and lets the mirror
catch up with everything the ensemble produced up to that read (a sync on
the mirror's session) before comparing. The compared zxid is the one the
inspection session had seen after its sync: an entry the ensemble changed
after it (``mzxid`` or ``pzxid`` above it) is not compared, nor one the
mirror dropped or loaded anew meanwhile (it is being reloaded, or newer).

Differences are grouped by parent path ("service"), the znode names being
the ids; the repair reloads each differing entry (as after a reconnection:
the watches of what changed fire) and compares it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

import attrs
import trio

from dispatcher.inspection.difference import Check, Difference
from dispatcher.store_clients import SESSION_FAILURES, short_session, zookeeper_session
from dispatcher.zk.client import ConnectionLost, KeeperError
from dispatcher.zk.codec.paths import parent_of
from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import (
    ErrorResult,
    GetChildrenResponse,
    GetDataResponse,
    MultiReadRequest,
    MultiResponse,
    PathWatchRequest,
    Stat,
)
from dispatcher.zk.mirror import CachedNode, Mirror

__all__ = ["MirrorLayer"]

#: Cached znodes compared per mirror per pass.
DEFAULT_SAMPLE: Final = 512
#: Reads per multiRead: well under the default 1 MiB frame for registry-sized znodes.
_CHUNK: Final = 250
_CONNECT_TIMEOUT: Final = 10.0
#: An ensemble away or refusing: the mirror reports that itself; not a divergence.


@attrs.frozen
class _Upstream:
    """One znode as the inspection session read it (``stat`` None: absent)."""

    stat: Stat | None
    data: bytes | None
    children: frozenset[str] | None


def _chunks(paths: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(paths), _CHUNK):
        yield paths[start : start + _CHUNK]


class MirrorLayer:
    """Compares a sample of each mirror's cache with its ensemble."""

    layer = "mirror"

    def __init__(self, mirrors: Callable[[], Sequence[Mirror]], sample: int = DEFAULT_SAMPLE):
        self._mirrors = mirrors
        self.sample = sample
        #: Where each mirror's next sample starts (by root), so passes rotate over the cache.
        self._offsets: dict[str, int] = {}
        #: The paths of each mirror compared by the last full pass, for the second look.
        self._sampled: dict[str, list[str]] = {}

    async def check(self, services: frozenset[str] | None) -> Check:
        differences: list[Difference] = []
        skipped: list[str] = []
        reads = compared = 0
        for mirror in self._mirrors():
            root = mirror.root
            if not mirror.connected:
                skipped.append(f"{root}: disconnected (the cache is served as stale)")
                continue
            paths = self._pick(mirror, services)
            if not paths:
                continue
            try:
                upstream, revision, made = await _read(mirror, paths)
            except SESSION_FAILURES as exc:
                skipped.append(f"{root}: direct read failed: {exc!r}")
                continue
            reads += made
            if not await _caught_up(mirror):
                skipped.append(f"{root}: the mirror did not catch up with the read")
                continue
            found, count = _compare(mirror, paths, upstream, revision)
            differences.extend(found)
            compared += count
        return Check(tuple(differences), compared, reads, tuple(skipped))

    def _pick(self, mirror: Mirror, services: frozenset[str] | None) -> list[str]:
        cached = mirror.cached
        if services is not None:
            # The second look: the sampled paths under the parents that differed.
            return [
                p
                for p in self._sampled.get(mirror.root, ())
                if parent_of(p) in services and cached.get(p) is not None
            ]
        present = [path for path, node in cached.items() if node is not None]
        if len(present) <= self.sample:
            chosen = present
        else:
            start = self._offsets.get(mirror.root, 0) % len(present)
            chosen = (present[start:] + present[:start])[: self.sample]
            self._offsets[mirror.root] = start + self.sample
        self._sampled[mirror.root] = chosen
        return chosen


async def _read(mirror: Mirror, paths: Sequence[str]) -> tuple[dict[str, _Upstream], int, int]:
    """``paths`` read on a session of their own; with the zxid seen after the sync and
    the requests made. An ensemble that fails the read raises one of
    :data:`~dispatcher.store_clients.SESSION_FAILURES`."""
    config = mirror.config
    # As the mirror's own session: the same TLS, SASL user and digest credentials, so the
    # read reaches a secured ensemble and sees what the mirror may see.
    client = zookeeper_session(
        config.hosts, config.session_timeout_ms / 1000,
        tls=config.tls, sasl=config.sasl, auth=config.auth,
    )  # fmt: skip
    async with short_session(client, _CONNECT_TIMEOUT, f"zookeeper {config.hosts}"):
        await client.sync(mirror.root)
        revision = client.last_zxid
        found: dict[str, _Upstream] = {}
        reads = 1
        cached = mirror.cached
        for chunk in _chunks(paths):
            ops: list[tuple[int, PathWatchRequest]] = []
            wanted: list[tuple[str, bool]] = []
            for path in chunk:
                ops.append((int(OpCode.GET_DATA), PathWatchRequest(path, False)))
                wanted.append((path, False))
                node = cached.get(path)
                if node is not None and node.children is not None:
                    ops.append((int(OpCode.GET_CHILDREN), PathWatchRequest(path, False)))
                    wanted.append((path, True))
            reply = await client.call(OpCode.MULTI_READ, MultiReadRequest(tuple(ops)))
            reads += 1
            if reply.err == Err.CONNECTIONLOSS:
                raise ConnectionLost(f"connection lost reading under {mirror.root}")
            body = reply.body
            if reply.err != Err.OK or not isinstance(body, MultiResponse):
                raise KeeperError(reply.err, mirror.root)
            for (path, children), (_op, result) in zip(wanted, body.results, strict=True):
                seen = found.get(path, _Upstream(None, None, None))
                if isinstance(result, GetDataResponse):
                    seen = attrs.evolve(seen, stat=result.stat, data=result.data)
                elif children and isinstance(result, GetChildrenResponse):
                    seen = attrs.evolve(seen, children=frozenset(result.children))
                elif isinstance(result, ErrorResult) and result.err not in (
                    Err.NONODE, Err.NOAUTH,
                ):  # fmt: skip
                    raise KeeperError(result.err, path)
                found[path] = seen
        return found, revision, reads


async def _caught_up(mirror: Mirror) -> bool:
    """Whether the mirror applied everything up to now within the connect timeout
    (not when its session was lost meanwhile)."""
    with trio.move_on_after(_CONNECT_TIMEOUT):
        await mirror.caught_up()
        return mirror.connected
    return False


def _stamp(node: CachedNode) -> object:
    # Its load and its version: a reload or an applied change moves one of them.
    return (node.loaded_zxid, node.stat_record.mzxid, node.stat_record.pzxid)


def _differs(node: CachedNode, seen: _Upstream, revision: int) -> bool | None:
    """Whether ``node`` differs from ``seen``; None when not comparable."""
    stat = seen.stat
    if stat is None:
        # Gone upstream: its removal came before the mirror caught up, so an
        # entry still cached missed it (a NOAUTH reads alike: not compared).
        return None if not node.readable else True
    cached = node.stat_record
    if stat.mzxid > revision or stat.pzxid > revision:
        return None  # changed after the compared zxid
    if cached.mzxid > stat.mzxid or cached.pzxid > stat.pzxid:
        return None  # loaded after the read: newer
    if cached.mzxid != stat.mzxid or cached.version != stat.version:
        return True
    if node.readable and (node.data or b"") != (seen.data or b""):
        return True
    if node.children is not None and seen.children is not None:
        return node.children != seen.children
    return False


def _compare(
    mirror: Mirror, paths: Sequence[str], upstream: dict[str, _Upstream], revision: int
) -> tuple[list[Difference], int]:
    by_parent: dict[str, dict[str, object]] = {}
    cached = mirror.cached
    compared = 0
    for path in paths:
        node = cached.get(path)
        seen = upstream.get(path)
        if node is None or seen is None:
            continue  # dropped meanwhile (being reloaded), or not read
        differs = _differs(node, seen, revision)
        if differs is None:
            continue
        compared += 1
        if differs:
            by_parent.setdefault(parent_of(path), {})[path] = _stamp(node)
    differences = []
    for parent, stamps in sorted(by_parent.items()):
        names = {path.rpartition("/")[2]: stamp for path, stamp in stamps.items()}
        differences.append(
            Difference(
                mirror.root, parent, frozenset(), frozenset(), frozenset(names), names,
                repair=_repairer(mirror, sorted(stamps)),
            )
        )  # fmt: skip
    return differences, compared


def _repairer(mirror: Mirror, paths: list[str]) -> Callable[[], Awaitable[bool]]:
    async def repair() -> bool:
        with trio.move_on_after(_CONNECT_TIMEOUT):
            try:
                for path in paths:
                    await mirror.reload(path)
                upstream, revision, _ = await _read(mirror, paths)
            except SESSION_FAILURES:
                return False  # the ensemble is away: the next pass retries
            if await _caught_up(mirror):
                found, _ = _compare(mirror, paths, upstream, revision)
                return not found
        return False  # the ensemble did not answer in time: the next pass retries

    return repair
