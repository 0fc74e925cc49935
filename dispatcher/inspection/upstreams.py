"""Layer "upstream": each registry read directly against the fan-in's view of it."""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from typing import Any, Final

import attrs
import trio

from dispatcher.core.fanin import EXPORTED_BY, FanIn
from dispatcher.core.model import Instance
from dispatcher.core.upstream import Inspection, Listing
from dispatcher.inspection.difference import Check, Difference, compare

__all__ = ["UpstreamLayer", "same_record"]

log = logging.getLogger(__name__)

#: Services compared between two checkpoints of the trio loop.
_YIELD_EVERY: Final = 50

_VALUE_FIELDS = tuple(
    field.name
    for field in attrs.fields(Instance)
    if field.eq and field.name not in ("service", "instance_id")
)


_values = operator.attrgetter(*_VALUE_FIELDS)


def same_record(a: Instance, b: Instance) -> bool:
    """Equal but for the id: the fan-in holds records under the endpoint id."""
    return a is b or bool(_values(a) == _values(b))


def _stamp(record: Instance) -> object:
    # Its value and upstream revision: every change applied moves one or the other.
    return (record, record.source.revision if record.source is not None else 0)


def _by_service(inspection: Inspection, node_id: str) -> dict[str, dict[str, Instance]]:
    listed: dict[str, dict[str, Instance]] = {}
    scope = inspection.services
    for instance in inspection.instances:
        if scope is not None and instance.service not in scope:
            continue
        # The fan-in drops this node's own exports on arrival; so does the comparison.
        if instance.metadata.get(EXPORTED_BY) == node_id:
            continue
        listed.setdefault(instance.service, {})[instance.instance_id] = instance
    return listed


class UpstreamLayer:
    """Compares every connected upstream that has a direct read (``inspect``)
    with what the fan-in holds from it, service by service."""

    layer = "upstream"

    def __init__(self, fanin: FanIn, node_id: str) -> None:
        self.fanin = fanin
        self.node_id = node_id

    async def check(self, services: frozenset[str] | None) -> Check:
        """Read each upstream once (``services``, or all it is asked to load) and compare."""
        fanin = self.fanin
        differences: list[Difference] = []
        skipped: list[str] = []
        reads = 0
        compared = 0
        for name, state in fanin.status.items():
            upstream: Any = fanin.upstream(name)
            inspect = getattr(upstream, "inspect", None)
            if inspect is None:
                skipped.append(f"{name}: no direct read")
                continue
            if not state.connected:
                skipped.append(f"{name}: disconnected (its last state is served as stale)")
                continue
            interest = fanin.interest
            scope = services if interest is None else (
                interest if services is None else services & interest
            )  # fmt: skip
            if scope is not None and not scope:
                continue
            before = fanin.applied(name)
            try:
                inspection: Inspection = await inspect(scope)
            except Exception as exc:
                # An upstream that fails to answer is an outage, which the
                # adapter reports itself; it proves nothing about divergence.
                skipped.append(f"{name}: direct read failed: {exc!r}")
                continue
            reads += inspection.reads
            found = await self._compare(name, scope, inspection, before)
            compared += found[1]
            differences.extend(found[0])
        return Check(tuple(differences), compared, reads, tuple(skipped))

    async def _compare(
        self, name: str, scope: frozenset[str] | None, inspection: Inspection, before: int
    ) -> tuple[list[Difference], int]:
        listed = _by_service(inspection, self.node_id)
        held: Mapping[str, Mapping[str, Instance]] = self.fanin.held(name)
        revision = inspection.revision

        def newer(record: Instance) -> bool:
            source = record.source
            return bool(revision) and source is not None and source.revision > revision

        services = set(listed)
        services.update(s for s in held if scope is None or s in scope)
        differences = []
        for count, service in enumerate(sorted(services), 1):
            if count % _YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()  # a large pass must not stall the server
            source = listed.get(service, {})
            difference = compare(
                name, service, source, held.get(service, {}),
                equal=same_record, newer=newer, stamp=_stamp,
            )  # fmt: skip
            if difference:
                repair = self._repairer(name, service, source, before, revision)
                differences.append(attrs.evolve(difference, repair=repair))
        return differences, len(services)

    def _repairer(
        self, name: str, service: str, source: dict[str, Instance], before: int, revision: int
    ) -> Any:
        fanin = self.fanin

        def repair() -> bool:
            if fanin.applied(name) != before:
                # Events arrived since the read began: the read may be older
                # than what they brought (a removal leaves no revision behind
                # to compare), so it must not overwrite them. The next pass retries.
                log.info("inspection repair deferred: the upstream changed meanwhile",
                         extra={"upstream": name, "service": service})  # fmt: skip
                return False
            fanin.resync(name, Listing(tuple(source.values()), frozenset({service})))
            again = compare(
                name, service, source, fanin.held(name).get(service, {}), equal=same_record
            )
            return not again

        return repair
