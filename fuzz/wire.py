"""Fuzz target: the subscription protocol's decoder (:mod:`dispatcher.wire`).

Contract: :func:`~dispatcher.wire.decode` and
:meth:`~dispatcher.wire.FrameDecoder.feed` raise only
:class:`~dispatcher.wire.WireError` for anything a peer sends; anything else
escaping is a crash. A message that decodes must also encode and decode
again to an equal message (what one side accepts, the other can send).

Input layout: the first byte chooses the mode.

* even: the rest is one frame body for ``decode``;
* odd: the rest is a byte stream for a ``FrameDecoder`` (with a small
  ``max_frame``, so oversized frames are reachable), delivered in chunks of
  ``first byte // 2 + 1`` bytes.
"""

from __future__ import annotations

from dispatcher.wire import FrameDecoder, Message, WireError, decode, encode
from fuzz._common import chunks, fuzz_main

#: Small limit so that the fuzzer reaches the oversized-frame refusal.
MAX_FRAME = 4096


def check_round_trip(message: Message) -> None:
    again = decode(encode(message)[4:])
    if again != message:
        raise AssertionError(f"{message!r} changed in a round trip: {again!r}")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    try:
        if mode % 2 == 0:
            check_round_trip(decode(payload))
        else:
            decoder = FrameDecoder(MAX_FRAME)
            for piece in chunks(payload, mode // 2 + 1):
                for message in decoder.feed(piece):
                    check_round_trip(message)
    except WireError:
        pass


if __name__ == "__main__":
    fuzz_main(TestOneInput, "dispatcher.wire", "json", "fuzz")
