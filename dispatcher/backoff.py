"""Exponential backoff with full jitter: the one reconnect pause of zkgate.

Every reconnect loop (adapters, the fan-in's restarts, the proxy's control
plane) waits with this class, so a fleet that lost the same peer at the same
moment spreads its retries the same way everywhere. Full jitter (each delay
drawn from ``[0, ceiling]``) spreads a herd wider than "equal jitter"
(``[ceiling/2, ceiling]``) at the same mean load; the ceiling doubles per
failed attempt up to ``maximum``.
"""

from __future__ import annotations

import random

import attrs
import trio

__all__ = ["Backoff"]


@attrs.define
class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**attempt))``, ``attempt`` counting up.

    ``rng`` is injectable so that tests draw a known sequence; by default
    each Backoff has its own ``random.Random``.
    """

    initial: float = 0.1
    maximum: float = 10.0
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    #: Failed attempts so far; the next delay's ceiling is ``initial * 2**attempt``.
    attempt: int = 0

    def __attrs_post_init__(self) -> None:
        if not (self.initial > 0 and self.maximum >= 0):
            raise ValueError(
                f"backoff needs initial > 0 and maximum >= 0, not {self.initial}, {self.maximum}"
            )
        if self.attempt < 0:
            raise ValueError(f"backoff attempt must be >= 0, not {self.attempt}")

    def ceiling(self) -> float:
        """The longest delay :meth:`next_delay` may return now."""
        # Capping the exponent keeps 2**attempt from growing without bound
        # in a loop that fails for days; 2**64 * initial exceeds any maximum.
        return min(self.maximum, self.initial * 2 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """The next pause, and one more failed attempt counted."""
        ceiling = self.ceiling()
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Back to the shortest delays (after a success)."""
        self.attempt = 0

    async def sleep(self) -> None:
        """Sleep for :meth:`next_delay` seconds on trio's clock."""
        await trio.sleep(self.next_delay())
