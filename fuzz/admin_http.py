"""Fuzz target: the admin endpoint's HTTP request path (:mod:`dispatcher.faces.admin.http`).

Contract: whatever a client sends on one connection, the admin server answers
with HTTP (any status: 400, 408, 413, 431 are all fine) or closes without a
word, and no exception escapes its request handling. The connection is served
by :meth:`AdminServer.serve_stream` (what the listener calls for each accepted
socket) over a trio memory stream pair, in-process, against a real (not
running) :class:`~dispatcher.gateway.Gateway`. ``serve_stream`` contains an
unexpected exception (the connection closes, the process lives on); the
target still counts it as a crash. A :class:`trio.testing.MockClock` jumps
whenever every task waits, so a request that never completes meets its
deadline at once instead of after seconds of real time.

Input layout: the first byte is the chunk size minus one with which the rest
(the raw bytes of one connection) is sent; the client then half-closes and
reads everything the server says until it closes.
"""

from __future__ import annotations

import functools

import h11
import trio
import trio.testing

from dispatcher.config import parse_config
from dispatcher.containment import InternalErrors
from dispatcher.faces.admin.http import AdminLimits, AdminServer
from dispatcher.gateway import Gateway
from fuzz._common import chunks, fuzz_main

#: Small bounds so that the fuzzer reaches the 431 and 413 answers.
LIMITS = AdminLimits(max_request_head=1024, max_request_body=64)
#: What the client reads at most: the status page is the longest answer.
MAX_RESPONSE = 1 << 20
#: Bytes a request may consist of and still be "nothing" to HTTP (h11 skips
#: blank lines between requests), so that no answer is the right answer.
_BLANK = b" \t\r\n"


class ContainedErrors(InternalErrors):
    """Keeps what the connection handler contained, instead of logging it: a
    contained exception is still a crash of the request path, and the fuzzer
    must see it."""

    def __init__(self) -> None:
        super().__init__("admin")
        self.caught: list[BaseException] = []

    def record(self, exc: BaseException, **fields: object) -> None:
        self.count += 1
        if len(self.caught) < 1:  # one is enough to report; the rest would pile up
            self.caught.append(exc)


@functools.cache
def admin_server() -> tuple[AdminServer, ContainedErrors]:
    """One admin server for the whole fuzzing process: building a gateway and
    its Prometheus registry per input would dwarf the request itself. Nothing
    a request does changes what the next one gets, except the ``served``
    counters."""
    config = parse_config({"node_id": "fuzz", "admin": {"listen": "127.0.0.1:0"}})
    admin = AdminServer(Gateway(config), limits=LIMITS)
    errors = admin.internal_errors = ContainedErrors()
    return admin, errors


async def exchange(admin: AdminServer, request: bytes, chunk: int) -> bytes:
    """Send ``request`` on one connection in ``chunk``-byte pieces; all the server said."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admin.serve_stream, server, "127.0.0.1")
        try:
            for piece in chunks(request, chunk):
                await client.send_all(piece)
            await client.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed first (an error answer, or a timeout)
        while len(received) <= MAX_RESPONSE:
            data = await client.receive_some()
            if not data:
                break
            received += data
        await client.aclose()
    return bytes(received)


def check_response(request: bytes, response: bytes) -> None:
    """The answer must be HTTP, not a 500; and only a blank request may go unanswered."""
    if not response:
        if request.strip(_BLANK):
            raise AssertionError("a request with content got no answer at all")
        return
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("host", "fuzz")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(response)
    event = parser.next_event()
    if not isinstance(event, h11.Response):
        raise AssertionError(f"not an HTTP response: {response[:200]!r}")
    if event.status_code == 500:
        # A route raised and _route contained it: still an exception on the
        # request path, only hidden from the client.
        raise AssertionError(f"500 internal error: {response[:400]!r}")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    chunk, request = data[0] + 1, data[1:]

    admin, errors = admin_server()
    # No deadline of our own: the mock clock jumps to the next deadline
    # whenever every task waits, including while /snapshot renders in a
    # worker thread, so any deadline here would fire spuriously. A hang is
    # caught by libFuzzer's -timeout (and by pytest's timeout in the replay).
    response = trio.run(
        exchange, admin, request, chunk, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    if errors.caught:
        raise errors.caught.pop()
    check_response(request, response)


if __name__ == "__main__":
    fuzz_main(TestOneInput, "dispatcher.faces.admin", "h11", "fuzz")
