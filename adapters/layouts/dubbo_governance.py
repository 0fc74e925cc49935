"""A service's governance policy as Dubbo 2.7 consumers read it from ZooKeeper.

A Dubbo consumer's ``RegistryDirectory`` subscribes to a service's ``configurators`` and
``routers`` directories besides ``providers``; each child's name is a whole URL encoded as
``URLEncoder.encode(url, "UTF-8")`` (``ZookeeperRegistry.toUrlsWithoutEmpty`` decodes it
and parses it with ``URL.valueOf``). :func:`render` writes the service-level policy there:

* ``request_timeout`` and ``connect_timeout`` as one service-wide override, in
  milliseconds (``timeout``, ``connect.timeout``)::

      override://0.0.0.0/<service>?category=configurators&dynamic=false&enabled=true&timeout=2000

  ``AbstractConfigurator`` applies an override without a port to every provider URL a
  consumer holds (their parameters merged with the consumer's, so ``side=consumer``, and
  its host is ``0.0.0.0``: any consumer);
* the effective weight of each instance (``weights`` and ``split``, as
  :func:`~dispatcher.governance.weights.instance_weights` computes it), where it differs
  from the weight the provider registered, as one override per provider, which
  ``AbstractConfigurator`` matches by port and host::

      override://10.0.0.7:20880/<service>?category=configurators&dynamic=false&enabled=true&weight=9000

* a ``split`` as a condition route that keeps only the providers of the values with a
  share (``force=true``: none of the others, even when the values' providers are gone,
  as zkgate's proxy refuses them too)::

      condition://0.0.0.0/<service>?category=routers&dynamic=false&enabled=true&force=true
          &name=zkgate-split&priority=0&router=condition&rule=%3D%3E+version+%3D+v1%2Cv2
          &runtime=false

  A condition route selects, it does not share: with one value it is the whole split, and
  with several (95/5) the shares are the per-provider weight overrides above, the route
  only leaving the other values out. A tag value ``ConditionRouter``'s grammar cannot
  hold (a blank or one of ``&!=,``) makes no route; the weights (0 for those providers)
  still steer Dubbo's weighted balancers.

Dubbo matches these URLs to a consumer by group and version too (``UrlUtils.isMatch``), so
every set is rendered once per ``(group, version)`` the service's providers register. Not
rendered: retries (Dubbo retries every non-business failure; ``retries.on`` has no
spelling), load balancing, outlier ejection, circuit breaking, zone affinity and
per-consumer policies. Parameters are in ``URL.toFullString`` order, like the providers'
own URLs, so equal policies render to equal znode names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Final

from adapters.layouts.dubbo import encode, java_order
from dispatcher.core.model import Instance
from dispatcher.governance.policy import Policy
from dispatcher.governance.weights import instance_weights
from dispatcher.wire import join_address

__all__ = ["CONFIGURATORS", "ROUTERS", "SPLIT_ROUTE_NAME", "render", "split_rule"]

CONFIGURATORS: Final = "configurators"
ROUTERS: Final = "routers"
SPLIT_ROUTE_NAME: Final = "zkgate-split"
"""The ``name`` of the condition route a split renders (shown by Dubbo's admin console)."""

_ANYHOST: Final = "0.0.0.0"
# ConditionRouter's ROUTE_PATTERN splits on these and on blanks: a value holding one
# cannot be written in a rule.
_RULE_UNSAFE: Final = re.compile(r"[&!=,\s]")
# Dubbo's URL parser splits parameters on "&" and ";" without unescaping.
_PARAM_UNSAFE: Final = re.compile(r"[&;=\s]")


def _millis(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def _url(scheme: str, address: str, service: str, params: dict[str, str]) -> str:
    query = "&".join(f"{key}={params[key]}" for key in sorted(params, key=java_order))
    return f"{scheme}://{address}/{service}?{query}"


def split_rule(policy: Policy) -> str | None:
    """The condition rule of ``policy``'s split (``=> version = v1,v2``), or None when it
    has none or a value the rule grammar cannot hold."""
    split = policy.split
    if split is None:
        return None
    values = [value for value, share in split.shares if share > 0]
    if not values or any(_RULE_UNSAFE.search(text) for text in (split.tag, *values)):
        return None
    return f"=> {split.tag} = {','.join(values)}"


def _scopes(instances: Iterable[Instance]) -> list[dict[str, str]]:
    """The ``group``/``version`` parameters of each distinct pair the providers register."""
    pairs = {
        (instance.metadata.get("group", ""), instance.metadata.get("version", ""))
        for instance in instances
    }
    scopes = []
    for group, version in sorted(pairs):
        scope = {}
        if group and not _PARAM_UNSAFE.search(group):
            scope["group"] = group
        if version and not _PARAM_UNSAFE.search(version):
            scope["version"] = version
        scopes.append(scope)
    return scopes


def render(
    service: str, instances: Iterable[Instance], policy: Policy
) -> dict[str, dict[str, bytes]]:
    """``{"configurators": {znode name: data}, "routers": {...}}`` for ``service`` under
    ``policy``, given the providers shown (see the module docstring). Empty directories
    when the policy says nothing Dubbo applies."""
    shown = tuple(instances)
    configurators: dict[str, bytes] = {}
    routers: dict[str, bytes] = {}
    if _PARAM_UNSAFE.search(service) or not shown:
        return {CONFIGURATORS: configurators, ROUTERS: routers}
    base = {"category": CONFIGURATORS, "dynamic": "false", "enabled": "true"}
    timeouts: dict[str, str] = {}
    if policy.request_timeout is not None:
        timeouts["timeout"] = _millis(policy.request_timeout)
    if policy.connect_timeout is not None:
        timeouts["connect.timeout"] = _millis(policy.connect_timeout)
    weights = (
        instance_weights(shown, policy)
        if policy.weights is not None or policy.split is not None
        else {}
    )
    rule = split_rule(policy)
    for scope in _scopes(shown):
        if timeouts:
            url = _url("override", _ANYHOST, service, {**base, **scope, **timeouts})
            configurators[encode(url)] = b""
        for instance in shown:
            weight = weights.get(instance.instance_id, instance.weight)
            if weight == instance.weight or not _matches(instance, scope):
                continue
            address = join_address(instance.host, instance.port)
            url = _url("override", address, service, {**base, **scope, "weight": str(weight)})
            configurators[encode(url)] = b""
        if rule is not None:
            params = {
                "category": ROUTERS, "dynamic": "false", "enabled": "true", "force": "true",
                "name": SPLIT_ROUTE_NAME, "priority": "0", "router": "condition",
                "rule": encode(rule), "runtime": "false", **scope,
            }  # fmt: skip
            routers[encode(_url("condition", _ANYHOST, service, params))] = b""
    return {CONFIGURATORS: configurators, ROUTERS: routers}


def _matches(instance: Instance, scope: dict[str, str]) -> bool:
    """Whether ``instance`` registers the group and version of ``scope``."""
    return instance.metadata.get("group", "") == scope.get("group", "") and instance.metadata.get(
        "version", ""
    ) == scope.get("version", "")
