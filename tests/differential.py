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

After each step both B and A are pinged, so every watch event the step caused
has arrived (a server queues a watch event before any later reply on the same
connection) and is part of the compared answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from dispatcher.zk.protocol import Err, OpCode
from dispatcher.zk.records import (
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
    """One server's pair of clients and the zxids each step produced."""

    def __init__(self, host: str, port: int, timeout_ms: int = 30000) -> None:
        self.clients = {"A": WireClient(host, port), "B": WireClient(host, port)}
        self.owners: dict[int, str] = {}
        for name, client in self.clients.items():
            self.owners[client.connect(timeout_ms).session_id] = name
        self.zxid_labels: dict[int, str] = {}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def run(self, step: int, who: str, opcode: int, record: Record | None) -> dict[str, Any]:
        client = self.clients[who]
        reply = client.call(opcode, record)
        if opcode in WRITES:
            self.zxid_labels.setdefault(reply.header.zxid, f"step {step}")
        events = {name: self._drain(c) for name, c in self.clients.items()}
        return {
            "err": Err(reply.header.err).name,
            "body": self.normalize(_decoded(reply, opcode)),
            "events": events,
        }

    def _drain(self, client: WireClient) -> list[tuple[int, str]]:
        reply = client.call(OpCode.PING)
        return [(event.type, event.path) for _, event in reply.events]

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
        return self.zxid_labels.get(zxid, "before")


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
