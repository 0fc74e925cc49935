"""What an inspection pass finds: divergences, per-layer results and counters."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs

__all__ = ["LAYERS", "PASS_LAYERS", "Divergence", "Layer", "LayerStats", "PassReport"]

Layer = Literal["upstream", "projection", "mirror", "xds", "proxy"]
LAYERS: Final[tuple[Layer, ...]] = ("upstream", "projection", "mirror", "xds", "proxy")
#: The layers compared in passes; "proxy" is compared at each client's Ack instead.
PASS_LAYERS: Final[tuple[Layer, ...]] = ("upstream", "projection", "mirror", "xds")


@attrs.frozen
class Divergence:
    """One service whose copy in a layer differs from its source for longer than grace.

    ``target`` names the copy: the upstream's configured name, the
    projection's root, the mirror's root, the xDS stream (node id and
    peer), or the proxy's client id. For a mirror ``service`` is the parent
    path of the znodes named, for an xDS stream the resource name (the ids
    then being the resource types that differ). A proxy reports a digest
    of its table, not the table, so its divergences name no instances and
    have age 0 (found at the Ack). ``missing`` are instance ids (znode names for a
    projection) the source has and the copy lacks, ``extra`` the reverse,
    ``differing`` those both have with different values. ``age`` is how
    long, in seconds, the difference has been seen. ``repaired`` says
    whether the resync made the copy equal again (None: no repair tried).
    """

    layer: Layer
    target: str
    service: str
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    differing: tuple[str, ...]
    age: float
    repaired: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class PassReport:
    """One pass over one layer: when, how long, what it read, what it found.

    ``reads`` counts upstream requests (directory listings, ranges,
    catalog queries), not instances. ``skipped`` names targets not
    compared (an upstream disconnected or without a direct read) and why.
    """

    layer: Layer
    started: float
    duration: float
    services: int
    reads: int
    divergences: tuple[Divergence, ...]
    skipped: tuple[str, ...] = ()
    error: str | None = None

    @property
    def consistent(self) -> bool:
        return not self.divergences and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "started": self.started, "duration": self.duration,
            "services": self.services, "reads": self.reads, "consistent": self.consistent,
            "divergences": [d.to_json() for d in self.divergences],
            "skipped": list(self.skipped), "error": self.error,
        }  # fmt: skip


@attrs.define
class LayerStats:
    """Counters of one layer since start, for ``/metrics`` and ``/status``."""

    passes: int = 0
    divergences_total: int = 0
    repairs_total: int = 0
    #: Wall-clock time of the last pass that completed without an error (0: none yet).
    last_success: float = 0.0
    last: PassReport | None = None
    #: The latest divergences found outside passes (proxies' Acks), newest last, bounded.
    recent: list[Divergence] = attrs.Factory(list)
