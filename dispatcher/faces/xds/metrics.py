"""The xDS server's counters: what an operator needs to see that pushes flow and stick."""

from __future__ import annotations

import attrs

__all__ = ["XdsMetrics"]


@attrs.define(slots=True)
class XdsMetrics:
    """Counters of one xDS server, mutated on the trio thread only.

    ``bytes_encoded`` and ``encodings`` count resource encodings (one per
    service change, however many streams receive it); ``pushes`` and
    ``bytes_pushed`` count responses written to streams. No counter carries
    a resource name, a node id or anything else a client chose, so a client
    cannot grow the metrics.
    """

    streams_opened: int = 0
    streams_active: int = 0
    streams_refused: int = 0
    requests: int = 0
    acks: int = 0
    nacks: int = 0
    stale_nonces: int = 0
    bad_requests: int = 0
    internal_errors: int = 0
    pushes: int = 0
    bytes_pushed: int = 0
    encodings: int = 0
    bytes_encoded: int = 0
