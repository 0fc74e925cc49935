"""Layer "xds": each ADS stream's ACKed resources against what the cache holds for it.

For every open stream and every type it was answered, the versions of the
resources the client ACKed last are compared with the versions the
resource cache holds now for that stream's subscription. A response still
on its way (sent, not yet ACKed) differs at the first look and, once the
client ACKs, not at the second one ``grace`` later; a stream still on an
old version then is a divergence. In memory, no request.

Differences name the stream (its node id and peer) as the target and the
resource (a service, for clusters and endpoints) as the "service"; the ids
are the resource types that differ. The repair resends those types to that
stream and waits (at most ``settle`` seconds) for its ACK of the current
versions. A client that NACKed the current content is reported and not sent
it again: the stream's rule against resending rejected content stands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from dispatcher.faces.xds.resources import KNOWN_TYPES
from dispatcher.inspection.difference import Check, Difference, compare

if TYPE_CHECKING:
    from dispatcher.faces.xds.server import XdsServer
    from dispatcher.faces.xds.stream import AdsStream

__all__ = ["XdsLayer", "type_name"]

#: How often a repair looks for the client's ACK while it waits.
_POLL: Final = 0.05


def type_name(type_url: str) -> str:
    """``Cluster`` for ``type.googleapis.com/envoy.config.cluster.v3.Cluster``."""
    return type_url.rpartition(".")[2]


_TYPES: Final = {type_name(url): url for url in KNOWN_TYPES}


def _same(a: str, b: str) -> bool:
    return a == b


def target(stream: AdsStream) -> str:
    """The stream as divergences name it: its node id and peer (unique per connection)."""
    return f"{stream.node_id or 'unnamed'}@{stream.peer or '?'}"


class XdsLayer:
    """Compares every open ADS stream of ``server()`` (None: no xDS face)."""

    layer = "xds"

    def __init__(self, server: Callable[[], XdsServer | None], settle: float = 5.0) -> None:
        self._server = server
        self.settle = settle

    async def check(self, services: frozenset[str] | None) -> Check:
        server = self._server()
        if server is None:
            return Check((), 0)
        differences: list[Difference] = []
        compared = 0
        for stream in server.streams:
            found = _differences(stream, services)
            compared += found[1]
            differences.extend(_with_repair(d, stream, self.settle) for d in found[0])
        return Check(tuple(differences), compared)


def _differences(
    stream: AdsStream, services: frozenset[str] | None
) -> tuple[list[Difference], int]:
    # resource name -> type name -> version, for the cache and for the ACKs.
    current: dict[str, dict[str, str]] = {}
    acked: dict[str, dict[str, str]] = {}
    for short, url in _TYPES.items():
        now = stream.current_resources(url)
        if now is None:
            continue
        for name, version in now.items():
            current.setdefault(name, {})[short] = version
        for name, version in stream.acked_resources(url).items():
            acked.setdefault(name, {})[short] = version
    names = set(current) | set(acked)
    if services is not None:
        names &= services
    who = target(stream)
    found = [
        compare(who, name, current.get(name, {}), acked.get(name, {}), equal=_same)
        for name in sorted(names)
    ]
    return [d for d in found if d], len(names)


def _with_repair(found: Difference, stream: AdsStream, settle: float) -> Difference:
    types = [_TYPES[short] for short in found.missing | found.extra | found.differing]

    async def repair() -> bool:
        if any(stream.rejected(url) for url in types):
            return False  # the client refuses the current content; sent again it would be too
        stream.resend(types)
        with trio.move_on_after(settle):
            while True:
                left, _ = _differences(stream, frozenset({found.service}))
                if not left:
                    return True
                await trio.sleep(_POLL)
        return False

    return Difference(
        found.target, found.service, found.missing, found.extra, found.differing,
        found.stamps, repair,
    )  # fmt: skip
