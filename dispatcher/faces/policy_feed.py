"""The policy documents of a governance feed, parsed, for the faces that render them.

The xDS cache and the Dubbo projection both turn the current :class:`PolicySet` into
something a consumer reads. :func:`policy_sets` gives them the feed's revisions already
parsed: the current one first (once the feed has loaded), then each newer one. A revision
whose body does not parse as policies (a store edited by hand) is logged and skipped, so
the last good set stays in force, as the subscription server does for the proxies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import PolicyError, PolicySet

__all__ = ["policy_sets"]

log = logging.getLogger(__name__)

_MAX_LOGGED_ERROR = 500


async def policy_sets(feed: GovernanceFeed) -> AsyncIterator[tuple[int, PolicySet]]:
    """``(version, policies)`` for the current revision once ``feed`` has loaded (version
    0 and an empty set when nothing was ever written), then for every newer revision that
    parses. Runs until cancelled."""
    await feed.loaded.wait()
    if feed.current is None:
        yield 0, PolicySet()
    async with feed.subscribe() as revisions:
        async for revision in revisions:
            try:
                policies = PolicySet.from_json(revision.body)
            except PolicyError as exc:
                log.error("the policy document does not parse; the last good one stays", extra={
                    "version": revision.version, "error": str(exc)[:_MAX_LOGGED_ERROR],
                })  # fmt: skip
                continue
            yield revision.version, policies
