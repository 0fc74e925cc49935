"""Run the same ZooKeeper requests against two servers and compare the answers.

What a real ZooKeeper 3.8 answers is zkgate's specification. A :class:`Pair`
holds one session per server for each of two clients, "A" and "B"; every step
sends the same request on the same client of both servers and returns both
answers normalized, so that values that legitimately differ between two
servers (zxids, session ids, times) are replaced by what they mean:

* a zxid becomes the index of the step whose reply header carried it
  ("step 3"), or "before" when it predates the sequence;
* an ephemeralOwner becomes the client name that owns it;
* ctime and mtime are dropped (both servers' clocks run independently).

A mirror (``header_zxids=False`` on both sides) answers with two zxid
spaces: reply headers carry zkgate's own zxids, stats the upstream
ensemble's. There a stat zxid is labelled by the step whose reply first
showed it in a stat ("step 3#0", then "step 3#1" for the next new value in
the same reply), and each step also reports the rank of every new value
among the stat zxids seen so far, so both sides must agree on which stat
values are equal and on their order. Header zxids, a space of their own, are
only checked to grow. Every side checks that: the reply headers a client
gets never go back in time.

After each step both B and A are pinged, so every watch event the step caused
has arrived (a server queues a watch event before any later reply on the same
connection) and is part of the compared answer, with those that reached the
asking client before its own reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import (
    ErrorResult,
    MultiRequest,
    Record,
    Stat,
)
from tests.zkwire import Reply, WireClient

#: Opcodes whose successful reply header carries a fresh zxid.
WRITES = frozenset({
    OpCode.CREATE, OpCode.CREATE2, OpCode.CREATE_CONTAINER, OpCode.CREATE_TTL, OpCode.DELETE,
    OpCode.SET_DATA, OpCode.SET_ACL, OpCode.MULTI,
})  # fmt: skip


class Side:
    """One server's pair of clients and the zxids each step produced.

    ``header_zxids`` says where stat zxids get their labels: from the write
    step whose reply header carried the same zxid (one zxid space, as on any
    server with a tree of its own), or, when False, from the step whose reply
    first showed the value in a stat (a mirror's headers and stats count
    zxids in different spaces; use False on both sides of such a pair).
    """

    def __init__(
        self, host: str, port: int, timeout_ms: int = 30000, *, header_zxids: bool = True
    ) -> None:
        self.clients = {"A": WireClient(host, port), "B": WireClient(host, port)}
        self.owners: dict[int, str] = {}
        for name, client in self.clients.items():
            self.owners[client.connect(timeout_ms).session_id] = name
        #: Header zxid of each write step (labels stat zxids when header_zxids).
        self.zxid_labels: dict[int, str] = {}
        self.header_zxids = header_zxids
        #: The latest zxid a reply header carried, by client (headers only
        #: grow for each client; each client's server counts its own).
        self.last_zxids: dict[str, int] = {}
        #: Stat zxid → label, by first appearance (header_zxids=False only).
        self.stat_labels: dict[int, str] = {}
        self._step = 0
        self._new: list[int] = []

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def run(self, step: int, who: str, opcode: int, record: Record | None) -> dict[str, Any]:
        client = self.clients[who]
        reply = client.call(opcode, record)
        self._grew(reply, who)
        if opcode in WRITES:
            self.zxid_labels.setdefault(reply.header.zxid, f"step {step}")
        self._step, self._new = step, []
        body = self.normalize(_decoded(reply, opcode))
        events = {name: self._drain(name, c) for name, c in self.clients.items()}
        # The events that reached the asking client before its own answer
        # (the watch its own write fired) come first: they are part of it.
        events[who][:0] = [(event.type, event.path) for _, event in reply.events]
        answer = {"err": Err(reply.header.err).name, "body": body, "events": events}
        if not self.header_zxids and self._new:
            # Each new stat zxid's place among those seen so far: the order of
            # the upstream's zxids must be the reference's.
            known = sorted(self.stat_labels)
            answer["new_zxids"] = [(self.stat_labels[z], known.index(z)) for z in self._new]
        return answer

    def _drain(self, name: str, client: WireClient) -> list[tuple[int, str]]:
        reply = client.call(OpCode.PING)
        self._grew(reply, name)
        return [(event.type, event.path) for _, event in reply.events]

    def _grew(self, reply: Reply, who: str) -> None:
        """Reply headers never go back in time (0 and -1 are ZooKeeper's "no zxid")."""
        zxid, last = reply.header.zxid, self.last_zxids.get(who, 0)
        if zxid <= 0:
            return
        if zxid < last:
            raise AssertionError(
                f"client {who} got a reply header with zxid {zxid:#x} after {last:#x}"
            )
        self.last_zxids[who] = zxid

    def normalize(self, value: Any) -> Any:
        if isinstance(value, Stat):
            return {
                "czxid": self._zxid(value.czxid),
                "mzxid": self._zxid(value.mzxid),
                "pzxid": self._zxid(value.pzxid),
                "version": value.version,
                "cversion": value.cversion,
                "aversion": value.aversion,
                "ephemeral_owner": self.owners.get(value.ephemeral_owner, value.ephemeral_owner),
                "data_length": value.data_length,
                "num_children": value.num_children,
            }
        if attrs.has(type(value)):
            fields = {
                f.name: self.normalize(getattr(value, f.name)) for f in attrs.fields(type(value))
            }
            # ZooKeeper lists children and ephemerals from hash sets: order is noise.
            for unordered in ("children", "paths", "client_info"):
                if unordered in fields:
                    fields[unordered] = sorted(fields[unordered], key=repr)
            return {"type": type(value).__name__, **fields}
        if isinstance(value, tuple | list):
            return [self.normalize(item) for item in value]
        return value

    def _zxid(self, zxid: int) -> str:
        if self.header_zxids:
            return self.zxid_labels.get(zxid, "before")
        label = self.stat_labels.get(zxid)
        if label is None:
            label = self.stat_labels[zxid] = f"step {self._step}#{len(self._new)}"
            self._new.append(zxid)
        return label


def _decoded(reply: Reply, opcode: int) -> Record | None:
    record = reply.decode(opcode)
    if isinstance(record, MultiRequest):  # pragma: no cover - replies are never requests
        raise AssertionError(record)
    return record


@attrs.define
class Pair:
    """The same two clients on the reference server and on the server under test."""

    reference: Side
    candidate: Side
    step: int = 0

    def run(self, who: str, opcode: int, record: Record | None) -> tuple[dict, dict]:
        self.step += 1
        return (
            self.reference.run(self.step, who, opcode, record),
            self.candidate.run(self.step, who, opcode, record),
        )

    def close(self) -> None:
        self.reference.close()
        self.candidate.close()


def error_results(results: Iterator[tuple[int, Record]]) -> list[int]:
    return [r.err for _, r in results if isinstance(r, ErrorResult)]
