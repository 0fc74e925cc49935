"""The weight each instance of a service gets under a policy's ``weights`` and ``split``.

Consumers that balance by instance weight (Envoy and gRPC through xDS, Dubbo consumers
through override URLs) apply a policy's weight overrides and its split by tag as one weight
per instance: :func:`instance_weights`. zkgate's proxy draws the split's tag value first
and balances within it (``proxy/policy.py``); with these weights a weighted balancer gives
each tag value the same share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from dispatcher.core.model import Health, Instance
from dispatcher.governance.policy import Policy, Weights
from dispatcher.wire import join_address

__all__ = ["SPLIT_SCALE", "instance_weights"]

SPLIT_SCALE: Final = 100
"""Weight units per split percent: a split's weights sum to about 10,000."""


def _weight(instance: Instance, weights: Weights) -> float:
    overrides = dict(weights.instances)
    weight = overrides.get(instance.instance_id)
    if weight is None:
        weight = overrides.get(join_address(instance.host, instance.port), instance.weight)
    return max(weight, 0) * dict(weights.zones).get(instance.zone, 100) / 100


def instance_weights(instances: Iterable[Instance], policy: Policy) -> dict[str, int]:
    """Each instance's weight under ``policy``, by instance id (0: it gets no traffic).

    Without weights or a split, the registry's. ``weights.instances`` (by instance id or
    ``host:port``) replace the registry's weight; ``weights.zones`` multiply it by
    ``weight / 100``. With a ``split``, an instance of a tag value with share ``s`` gets
    ``s * SPLIT_SCALE * w / W``, where ``w`` is its weight and ``W`` the sum over the
    value's instances that are not failing (so a failing instance, which consumers skip, does
    not shrink its value's share); an instance of no share's value gets 0. A split with
    a single value of non-zero share keeps the weights as they are within that value.
    """
    listed = tuple(instances)
    weights = policy.weights or Weights()
    if policy.weights is None:
        base = {i.instance_id: float(i.weight) for i in listed}
    else:
        base = {i.instance_id: _weight(i, weights) for i in listed}
    split = policy.split
    if split is None:
        return {key: _whole(value) for key, value in base.items()}
    shares = dict(split.shares)
    if sum(1 for share in shares.values() if share > 0) == 1:
        return {
            i.instance_id: _whole(base[i.instance_id])
            if shares.get(i.metadata.get(split.tag) or "", 0) > 0
            else 0
            for i in listed
        }
    totals: dict[str, float] = {}
    for instance in listed:
        value = instance.metadata.get(split.tag)
        if value in shares and instance.health is not Health.FAILING:
            totals[value] = totals.get(value, 0.0) + base[instance.instance_id]
    out: dict[str, int] = {}
    for instance in listed:
        value = instance.metadata.get(split.tag)
        own = base[instance.instance_id]
        total = totals.get(value, 0.0) if value is not None else 0.0
        if value not in shares or own <= 0:
            out[instance.instance_id] = 0
        else:
            # A value whose instances all fail: weighed among themselves (consumers skip them).
            out[instance.instance_id] = _whole(shares[value] * SPLIT_SCALE * own / (total or own))
    return out


def _whole(weight: float) -> int:
    """A positive weight as a whole number of at least 1; 0 stays 0."""
    return 0 if weight <= 0 else max(1, round(weight))
