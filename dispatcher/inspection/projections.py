"""Layer "projection": the snapshot against each projection's znodes in the embedded tree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import trio

from dispatcher.faces.projection import Projection
from dispatcher.inspection.difference import Check, Difference, compare

__all__ = ["ProjectionLayer"]

#: Services compared between two checkpoints of the trio loop.
_YIELD_EVERY: Final = 50


def _equal(a: bytes | None, b: bytes | None) -> bool:
    return a is b or a == b


class ProjectionLayer:
    """Reads each projection's instance directories in the engine's tree (in
    process, no request) and compares them with the snapshot as rendered:
    what the projection wrote while the snapshot still holds the entry it
    wrote it from (the same entry renders the same bytes, so nothing is
    rendered again, not even in the first pass), else the entry rendered anew."""

    layer = "projection"

    def __init__(self, projections: Sequence[Projection]) -> None:
        self.projections = tuple(projections)

    async def check(self, services: frozenset[str] | None) -> Check:
        differences: list[Difference] = []
        compared = 0
        for projection in self.projections:
            wanted = set(projection.fanin.snapshot) if services is None else set(services)
            if services is None:
                wanted.update(self._shown(projection))
            for service in sorted(wanted):
                compared += 1
                difference = self._compare(projection, service)
                if difference:
                    differences.append(difference)
                if compared % _YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()  # a large pass must not stall the server
        return Check(tuple(differences), compared)

    def _compare(self, projection: Projection, service: str) -> Difference:
        expected = projection.rendering(service)
        nodes = projection.engine.tree.nodes
        directory = expected.directory
        node = nodes.get(directory)
        actual: dict[str, bytes | None] = {}
        if node is not None:
            prefix = directory.rstrip("/")
            for name in node.children:
                child = nodes.get(f"{prefix}/{name}")
                actual[name] = None if child is None else child.data
        difference = compare(projection.root, service, expected.children, actual, equal=_equal)

        def repair() -> bool:
            projection.render(service)
            return not self._compare(projection, service)

        return attrs.evolve(difference, repair=repair) if difference else difference

    @staticmethod
    def _shown(projection: Projection) -> set[str]:
        """The services whose instance directories exist under the root: one
        the snapshot lost must go from the tree too. A walk of the tree in
        memory, no request."""
        root = projection.root.rstrip("/") + "/"
        layout = projection.layout
        found = set()
        for path, node in projection.engine.tree.nodes.items():
            # An instance directory has children (an empty one shows nothing
            # to compare); instance znodes have none, which skips nearly all.
            if not node.children or not path.startswith(root):
                continue
            relative = path[len(root) :]
            try:
                service = layout.service_of(relative)
            except Exception:
                continue
            if service and layout.directory(service) == relative:
                found.add(service)
        return found
