"""The write path's shortcuts mean exactly what the general code means.

create, setData and delete are decoded in place and answered with encodings
made straight from the znode (issue #21). A client must not be able to tell:
whatever bytes it sends, the shortcut either decodes the very request the
record decoder reads, or leaves the body to that decoder (which answers or
refuses it as always); and the Stat a write answers with is the Stat a read
of the same znode encodes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.zk.codec.jute import DecodeError, Reader
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    ACL,
    CreateRequest,
    DeleteRequest,
    Id,
    Record,
    SetDataRequest,
    encode,
)
from dispatcher.zk.server.engine import _decode_write
from dispatcher.zk.server.tree import CONTAINER_OWNER, OPEN_WORLD, Znode, ttl_owner

_texts = st.one_of(st.none(), st.text(max_size=12))
_buffers = st.one_of(st.none(), st.binary(max_size=12))
_ints = st.integers(-(2**31), 2**31 - 1)
_acls = st.one_of(
    st.none(),
    st.lists(st.builds(ACL, _ints, st.builds(Id, _texts, _texts)), max_size=3).map(tuple),
)
_requests = st.one_of(
    st.tuples(st.just(OpCode.CREATE), st.builds(CreateRequest, _texts, _buffers, _acls, _ints)),
    st.tuples(st.just(OpCode.CREATE2), st.builds(CreateRequest, _texts, _buffers, _acls, _ints)),
    st.tuples(st.just(OpCode.SET_DATA), st.builds(SetDataRequest, _texts, _buffers, _ints)),
    st.tuples(st.just(OpCode.DELETE), st.builds(DeleteRequest, _texts, _ints)),
)
_RECORDS: dict[int, type[CreateRequest] | type[SetDataRequest] | type[DeleteRequest]] = {
    OpCode.CREATE: CreateRequest,
    OpCode.CREATE2: CreateRequest,
    OpCode.SET_DATA: SetDataRequest,
    OpCode.DELETE: DeleteRequest,
}


def _general(opcode: int, body: bytes) -> Record | None:
    try:
        return _RECORDS[opcode].read(Reader(body))
    except DecodeError:
        return None


@settings(max_examples=400, deadline=None)
@given(_requests, st.data())
def test_the_shortcut_decodes_what_the_record_decoder_reads(
    request: tuple[int, Record], data: st.DataObject
) -> None:
    opcode, record = request
    body = encode(record)
    # The whole body, with trailing bytes, cut short, or with bytes changed.
    cut = data.draw(st.integers(0, len(body)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, max(len(body) - 1, 0)), st.integers(0, 255)), max_size=3)
    )
    mutated = bytearray(body)
    for at, value in flips:
        if mutated:
            mutated[at] = value
    for sent in (body, body + b"\x00\x01", body[:cut], bytes(mutated)):
        cache: dict[bytes, tuple[ACL, ...]] = {}
        fast = _decode_write(opcode, sent, cache)
        if fast is not None:
            assert fast == _general(opcode, sent)
            # A second decode from the ACL cache reads the same.
            assert _decode_write(opcode, sent, cache) == fast
    assert _decode_write(opcode, body, {}) in (None, record)


def test_the_common_requests_take_the_shortcut() -> None:
    """The requests every client sends are the ones decoded in place."""
    acl = (ACL(31, Id("world", "anyone")),)
    for opcode, record in (
        (OpCode.CREATE, CreateRequest("/a/b", b"data", acl, 0)),
        (OpCode.CREATE2, CreateRequest("/a/b-", b"", acl, 3)),
        (OpCode.SET_DATA, SetDataRequest("/a/b", b"data", -1)),
        (OpCode.DELETE, DeleteRequest("/a/b", 7)),
    ):
        assert _decode_write(opcode, encode(record), {}) == record


@given(
    data=_buffers,
    numbers=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 4),
    versions=st.tuples(*[_ints] * 3),
    owner=st.sampled_from([0, 0x1234_0000_0001, CONTAINER_OWNER, ttl_owner(5000)]),
    children=st.sets(st.text(min_size=1, max_size=3), max_size=4),
)
def test_a_writes_stat_is_the_stat_a_read_encodes(
    data: bytes | None,
    numbers: tuple[int, int, int, int],
    versions: tuple[int, int, int],
    owner: int,
    children: set[str],
) -> None:
    czxid, mzxid, ctime, mtime = numbers
    node = Znode(data, OPEN_WORLD, czxid, mzxid, ctime, mtime, *versions, owner, mzxid)
    node.children = children
    assert node.stat_bytes() == encode(node.stat())
