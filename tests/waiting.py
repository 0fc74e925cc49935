"""Waiting for a condition in trio tests: the one polling helper with a deadline.

Sync code (a kazoo thread, another process) waits with :func:`tests.servers.wait_for`.
Code that can wait on an event (a channel, a ``trio.Event``) should do that
instead; this helper is for state that only changes as a side effect.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio

__all__ = ["POLL", "until"]

POLL = 0.005
"""Seconds between two looks at the condition: short, since the checks are cheap."""


async def until(
    check: Callable[[], object] | Callable[[], Awaitable[object]],
    what: str = "condition",
    timeout: float = 10.0,
    poll: float = POLL,
) -> None:
    """Return as soon as ``check()`` (sync, or async and awaited) is truthy.

    Looks first, so a condition that already holds costs no wait. Raises
    ``AssertionError`` naming ``what`` once ``timeout`` seconds of trio time
    have passed; under a ``MockClock`` with autojump that is virtual time, so
    a test that waits for something that never happens fails at once.
    """
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout}s")
