"""The ZooKeeper upstream's direct read for inspection (:meth:`ZooKeeperUpstream.inspect`).

A short session of its own (the watching session is not disturbed): a
``sync`` on each root, so the server answering has applied everything the
leader had; a ``getChildren`` of each root; ``multiRead`` of the wanted
service directories' children, 200 per request; and ``multiRead`` of the
instance znodes' data, 500 per request across services (well under
``jute.maxbuffer``). Requests are therefore bounded by the number of
services, not of instances. A znode at the mzxid the adapter last applied
is not parsed again. The revision is the
zxid the session had seen after the syncs: records the fan-in holds with a
newer ``mzxid`` changed during the read and are not compared.

Parsing is the adapter's: the same layouts, the same ``Source`` keys, and
the same rule when several znodes claim one instance id (the one written
last wins).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import attrs
import trio

from dispatcher.core.model import Instance, Source
from dispatcher.core.upstream import Inspection
from dispatcher.store_clients import short_session, zookeeper_session
from dispatcher.zk.client import ConnectionLost, KeeperError, ZooKeeperClient
from dispatcher.zk.codec.jute import DecodeError, Reader, Writer
from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import (
    MULTI_END,
    ErrorResult,
    GetChildrenResponse,
    GetDataResponse,
    MultiResponse,
)

if TYPE_CHECKING:
    from adapters.zookeeper import ZooKeeperUpstreamConfig, _Root

__all__ = ["Parsed", "inspect_zookeeper"]

_T = TypeVar("_T")

#: Instance znodes read per multiRead: well under the default 1 MiB frame for
#: registry-sized records, and few requests even for large services.
_CHUNK: Final = 500
_CONNECT_TIMEOUT: Final = 10.0


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: Service directories listed per multiRead (getChildren).
_LIST_CHUNK: Final = 200

#: What the adapter applied: absolute znode path -> (mzxid, instance or None).
#: A znode with the same mzxid has the same data, so it is not parsed again.
Parsed = dict[str, tuple[int, Instance | None]]


async def inspect_zookeeper(
    name: str, config: ZooKeeperUpstreamConfig, roots: Sequence[_Root],
    services: frozenset[str] | None, parsed: Parsed | None = None,
) -> Inspection:  # fmt: skip
    """Read ``services`` (None: every service) under ``roots`` on a session of its own.

    ``parsed`` is what the adapter last applied for each znode (a throwaway map the
    caller built), reused where the mzxid is unchanged.
    """
    # The adapter's own TLS, SASL user and credentials: a secured ensemble serves no one else.
    client = zookeeper_session(
        config.servers, config.session_timeout, tls=config.tls, sasl=config.sasl,
        auth=[(scheme, cred.encode()) for scheme, cred in config.auth],
    )  # fmt: skip
    async with short_session(client, _CONNECT_TIMEOUT, f"zookeeper {config.hosts}"):
        return await _read(name, client, roots, services, parsed or {})


async def _children(client: ZooKeeperClient, path: str) -> list[str]:
    try:
        return await client.get_children(path)
    except KeeperError as exc:
        if exc.err in (Err.NONODE, Err.NOAUTH):
            return []
        raise


_OP_HEAD: Final = struct.Struct(">i?i")
_LENGTH: Final = struct.Struct(">i")


@attrs.frozen
class _PathsRead:
    """A ``multiRead`` of one opcode (getData, getChildren) on each of ``paths``, no
    watch: what :class:`MultiReadRequest` of ``PathWatchRequest`` encodes, written
    directly (a pass sends tens of thousands of them)."""

    opcode: int
    paths: tuple[str, ...]

    @classmethod
    def read(cls, r: Reader) -> _PathsRead:
        raise DecodeError("a request only sent, never decoded")

    def write(self, w: Writer) -> None:
        out = w.out
        head = _OP_HEAD.pack(self.opcode, False, -1)
        for path in self.paths:
            raw = path.encode()
            out += head
            out += _LENGTH.pack(len(raw))
            out += raw
            out += b"\x00"  # watch: false
        MULTI_END.write(w)


async def _multi_read(
    client: ZooKeeperClient, opcode: OpCode, paths: Sequence[str]
) -> tuple[object, ...]:
    """One multiRead of ``opcode`` on each of ``paths``: the results, in order."""
    reply = await client.call(OpCode.MULTI_READ, _PathsRead(int(opcode), tuple(paths)))
    if reply.err == Err.CONNECTIONLOSS:
        raise ConnectionLost(f"connection lost reading {paths[0]}")
    body = reply.body
    if reply.err != Err.OK or not isinstance(body, MultiResponse):
        raise KeeperError(reply.err, paths[0])
    return tuple(result for _op, result in body.results)


async def _read(
    name: str, client: ZooKeeperClient, roots: Sequence[_Root], services: frozenset[str] | None,
    parsed: Parsed,
) -> Inspection:  # fmt: skip
    reads = 0
    for root in roots:
        await client.sync(root.path)
        reads += 1
    revision = client.last_zxid
    # service -> instance id -> (mzxid, instance): the latest write wins a shared id.
    claims: dict[str, dict[str, tuple[int, Instance]]] = {}
    for root in roots:
        reads += 1
        wanted: list[tuple[str, str]] = []
        for child in sorted(await _children(client, root.path)):
            service = root.service_of_child(child)
            if service is None or (services is not None and service not in services):
                continue
            wanted.append((service, child + root.tail))
        # The service directories listed many per request, then their
        # instances read many per request, across services.
        listed: list[tuple[str, str, str]] = []
        for part in _chunks(wanted, _LIST_CHUNK):
            results = await _multi_read(
                client, OpCode.GET_CHILDREN, [root.absolute(rel) for _, rel in part]
            )
            reads += 1
            for (owner, directory), result in zip(part, results, strict=True):
                if not isinstance(result, GetChildrenResponse):
                    continue  # gone meanwhile, or unreadable: nothing listed
                names = sorted(n for n in result.children if root.is_instance_name(n))
                listed.extend((owner, directory, n) for n in names)
            await trio.lowlevel.checkpoint()
        for batch in _chunks(listed, _CHUNK):
            paths = [f"{root.absolute(relative)}/{znode}" for _, relative, znode in batch]
            results = await _multi_read(client, OpCode.GET_DATA, paths)
            reads += 1
            for (service, relative, znode), path, result in zip(batch, paths, results, strict=True):
                if isinstance(result, ErrorResult) or not isinstance(result, GetDataResponse):
                    continue  # gone meanwhile, or unreadable: the adapter skips it too
                mzxid = result.stat.mzxid
                known = parsed.get(path)
                if known is not None and known[0] == mzxid:
                    instance = known[1]
                else:
                    data = (result.data or b"") if root.data_in_znodes else b""
                    source = Source(name, f"{relative}/{znode}", mzxid)
                    try:
                        instance = root.layout.parse(service, znode, data, source=source)
                    except Exception:
                        instance = None
                if instance is None:
                    continue
                by_id = claims.setdefault(instance.service, {})
                held = by_id.get(instance.instance_id)
                if held is None or mzxid > held[0]:
                    by_id[instance.instance_id] = (mzxid, instance)
    instances = tuple(instance for by_id in claims.values() for _, instance in by_id.values())
    return Inspection(instances, services, revision, reads)
