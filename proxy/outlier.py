"""Local outlier detection: stop sending connections to an endpoint that refuses them.

The central health checker decides what is healthy for everyone, but it
checks on its own schedule; a proxy that sees connects fail now should not
wait for it. So, per endpoint, as Envoy's ``consecutive_local_origin_failure``:

* ``consecutive_failures`` connect failures in a row (refused, timed out,
  unreachable; under a policy's request timeout, a connection the endpoint
  did not answer in time too, see :mod:`proxy.policy`) eject the endpoint
  from this proxy's rotation for ``base_ejection * ejections`` seconds,
  capped at ``max_ejection``; a successful connect (answer) resets the count;
* the ejection count decays by one for every ``decay`` seconds (by default
  ``base_ejection``) the endpoint spends back in rotation, so an endpoint
  that failed once long ago is not punished like one that flaps;
* at most ``max_ejection_percent`` of a service's endpoints are ejected at
  once (at least one may always be, unless the percentage is 0, which
  switches ejection off; never the last one left), so a proxy whose own
  network broke does not eject everything;
* the detector says when it ejected, so the caller can report the endpoint
  to the owning Dispatcher and the central checker re-checks it at once.

When an ejection ends the endpoint simply comes back (the table's routing
set notices the time); the next failure, if it is still broken, ejects it
for longer.
"""

from __future__ import annotations

import attrs

from proxy.endpoints import EndpointState, ServiceTable

__all__ = ["OutlierDetector", "OutlierPolicy"]


def _positive(
    instance: object, attribute: attrs.Attribute[float] | attrs.Attribute[int], value: float
) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen
class OutlierPolicy:
    """When to eject an endpoint, and for how long; see the module docstring."""

    consecutive_failures: int = attrs.field(default=5, validator=_positive)
    base_ejection: float = attrs.field(default=30.0, validator=_positive)
    max_ejection: float = attrs.field(default=300.0, validator=_positive)
    max_ejection_percent: int = attrs.field(
        default=50, validator=[attrs.validators.ge(0), attrs.validators.le(100)]
    )
    #: Seconds back in rotation that forgive one ejection; None: ``base_ejection``.
    decay: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))


class OutlierDetector:
    """Applies an :class:`OutlierPolicy` to the endpoints of the tables it is shown."""

    def __init__(self, policy: OutlierPolicy | None = None) -> None:
        self.policy = policy or OutlierPolicy()
        #: Ejections made, over the detector's life.
        self.ejected_total = 0

    def success(self, table: ServiceTable, endpoint: EndpointState) -> None:
        """A connect to ``endpoint`` succeeded."""
        endpoint.consecutive_failures = 0

    def failure(self, table: ServiceTable, endpoint: EndpointState, now: float) -> bool:
        """A connect to ``endpoint`` failed at ``now``; True if that ejected it."""
        endpoint.consecutive_failures += 1
        policy = self.policy
        if endpoint.consecutive_failures < policy.consecutive_failures or endpoint.ejected(now):
            return False
        if not self._may_eject(table, now):
            return False
        if endpoint.returned_at > -float("inf"):
            served = now - endpoint.returned_at
            period = policy.decay or policy.base_ejection
            endpoint.ejections = max(0, endpoint.ejections - int(served // period))
        endpoint.ejections += 1
        duration = min(policy.base_ejection * endpoint.ejections, policy.max_ejection)
        endpoint.consecutive_failures = 0
        endpoint.returned_at = now + duration
        table.eject(endpoint, now + duration)
        self.ejected_total += 1
        return True

    def _may_eject(self, table: ServiceTable, now: float) -> bool:
        if self.policy.max_ejection_percent == 0:
            return False  # ejection switched off
        total = len(table)
        ejected = sum(1 for e in table if e.ejected(now))
        if ejected + 1 >= total:
            return False  # never the last one left
        allowed = max(1, total * self.policy.max_ejection_percent // 100)
        return ejected < allowed
