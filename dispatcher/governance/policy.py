"""The policy model: how the consumers of a service call it.

A :class:`Policy` says, for one service (and optionally for one consumer application calling
that service), what every consumer applies: timeouts, retries, load balancing, weight
overrides, zone affinity, outlier ejection, circuit breaking and a traffic split by instance
tag. Every field is optional: an unset field (``None``) means "not said here", so the
per-consumer policy can override the per-service one field by field
(:meth:`Policy.overlay`), and what nobody set is left to each consumer's own default.

A :class:`PolicySet` is the whole document, as kept in the governance store and as an
operator writes it (TOML or JSON)::

    [services."shop.Cart"]
    connect_timeout = 0.5                  # seconds
    request_timeout = 2.0                  # seconds
    retries = { count = 2, on = ["connect-failure", "reset"], budget = 20 }
    load_balancing = { policy = "ring_hash", hash_key = "header:x-user-id" }
    weights = { instances = { "10.0.0.7:8080" = 50 }, zones = { "eu-1a" = 200 } }
    zone_affinity = { enabled = true, fallback_threshold = 70 }
    outlier_ejection = { consecutive_failures = 5, interval = 10, base_ejection_time = 30,
                         max_ejection_percent = 50 }
    circuit_breaking = { max_connections = 1000, max_pending = 100 }
    split = { "version=v1" = 95, "version=v2" = 5 }

    [consumers."web-frontend"."shop.Cart"]  # only for the application "web-frontend"
    request_timeout = 5.0

Units and ranges (a value outside them is refused, naming the key):

* ``connect_timeout`` 0.001-300 s, ``request_timeout`` 0.001-3600 s;
* ``retries.count`` 0-10; ``retries.on`` a non-empty list of :data:`RETRY_ON`;
  ``retries.budget`` 0-100: at most that percentage of the requests in flight may be retries;
* ``load_balancing.policy`` one of :data:`LB_POLICIES`; ``hash_key`` (``ring_hash`` only, and
  required there) is ``source_ip``, ``header:<name>``, ``cookie:<name>`` or ``query:<name>``;
* ``weights.instances`` (by ``host:port``) and ``weights.zones`` (by zone name) 0-10000,
  replacing the registry's weight of the instance or multiplying the zone's share relative to
  100;
* ``zone_affinity.fallback_threshold`` 0-100: when fewer than this percentage of the local
  zone's instances are healthy, traffic spreads over every zone;
* ``outlier_ejection``: ``consecutive_failures`` 1-1000, ``interval`` and
  ``base_ejection_time`` 0.1-3600 s, ``max_ejection_percent`` 0-100;
* ``circuit_breaking``: ``max_connections`` 1-1000000, ``max_pending`` 0-1000000;
* ``split``: ``"<tag>=<value>" = <percent>`` entries, all on the same tag, each 0-100,
  summing to 100.

Overlaying (per-consumer over per-service): scalar fields and the fields of ``retries``,
``zone_affinity``, ``outlier_ejection`` and ``circuit_breaking`` one by one;
``weights.instances`` and ``weights.zones`` entry by entry; ``load_balancing`` and ``split``
whole, since their parts only make sense together.

The canonical rendering (:meth:`PolicySet.to_json`) sorts keys, leaves unset fields out and
writes whole numbers without a fraction, so equal sets render to equal bytes.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

import attrs

from dispatcher.core.upstream import reject_unknown

__all__ = [
    "LB_POLICIES",
    "RETRY_ON",
    "Change",
    "CircuitBreaking",
    "LoadBalancing",
    "OutlierEjection",
    "Policy",
    "PolicyError",
    "PolicySet",
    "Retries",
    "Split",
    "Weights",
    "ZoneAffinity",
    "canonical_json",
    "diff",
]

RETRY_ON: Final = (
    "5xx",
    "connect-failure",
    "gateway-error",
    "refused-stream",
    "reset",
    "timeout",
    "unavailable",
)
"""The failures a retry may follow (the names Envoy's ``retry_on`` uses for the same)."""

LB_POLICIES: Final = ("wrr", "p2c", "ring_hash")
"""Weighted round robin, power of two choices, consistent hashing on ``hash_key``."""

MAX_NAME: Final = 512
"""Longest service, consumer, instance, zone or tag name accepted."""

_HASH_KEY = re.compile(r"source_ip|(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+")

JSON: TypeAlias = Any
"""A value as ``json`` reads and writes it."""


class PolicyError(ValueError):
    """A policy document is malformed; the message names the policy and the key path."""


def canonical_json(value: JSON) -> str:
    """``value`` as JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# ------------------------------------------------------------------ reading helpers


@attrs.frozen
class _Where:
    """Where a value sits in a document, for error messages: ``<scope>: <path>``."""

    scope: str
    path: str = ""

    def at(self, key: str) -> _Where:
        return _Where(self.scope, f"{self.path}.{key}" if self.path else key)

    def fail(self, message: str) -> NoReturn:
        where = f"{self.scope}: {self.path}" if self.path else self.scope
        raise PolicyError(f"{where}: {message}")

    def table(self, value: object, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(f"must be a table, got {_shown(value)}")
        try:
            reject_unknown(value, known, self.path, PolicyError)
        except PolicyError as exc:
            raise PolicyError(f"{self.scope}: {exc}") from None
        return value

    def number(self, value: object, low: float, high: float, unit: str = "") -> float | int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number, got {_shown(value)}")
        if not (math.isfinite(value) and low <= value <= high):
            self.fail(f"must be between {_num(low)} and {_num(high)}{unit}, got {_shown(value)}")
        return _num(value)

    def integer(self, value: object, low: int, high: int) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be a whole number, got {_shown(value)}")
        if not low <= value <= high:
            self.fail(f"must be between {low} and {high}, got {value}")
        return value

    def name(self, value: object, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{what} must be a non-empty string, got {_shown(value)}")
        if len(value) > MAX_NAME:
            self.fail(f"{what} is longer than {MAX_NAME} characters")
        return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(value: float | int) -> float | int:
    """Whole numbers as int, so that ``95`` and ``95.0`` render alike."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _pairs(value: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> tuple[tuple[Any, Any], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted(items))


def _quoted(key: str) -> str:
    """A map key as one path segment: bare if it is a plain word, JSON-quoted otherwise."""
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key) else json.dumps(key)


def _optional(where: _Where, table: Mapping[str, Any], key: str, read: Any) -> Any:
    return read(where.at(key), table[key]) if key in table else None


# ------------------------------------------------------------------------ sections


@attrs.frozen(kw_only=True)
class Retries:
    """How often and after which failures a request is tried again."""

    count: int | None = None
    on: tuple[str, ...] | None = None
    budget: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("count", "on", "budget")

    @classmethod
    def parse(cls, where: _Where, value: object) -> Retries:
        table = where.table(value, cls.KEYS)
        return cls(
            count=_optional(where, table, "count", lambda w, v: w.integer(v, 0, 10)),
            on=_optional(where, table, "on", _retry_on),
            budget=_optional(where, table, "budget", lambda w, v: w.number(v, 0, 100)),
        )


def _retry_on(where: _Where, value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        where.fail(f"must be a non-empty list of {', '.join(RETRY_ON)}, got {_shown(value)}")
    for item in value:
        if item not in RETRY_ON:
            where.fail(f"must be some of {', '.join(RETRY_ON)}, got {_shown(item)}")
    if len(set(value)) != len(value):
        where.fail("lists a failure twice")
    return tuple(sorted(value))


@attrs.frozen(kw_only=True)
class LoadBalancing:
    """Which instance gets the next request; replaced whole by an overlay."""

    policy: str
    hash_key: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("policy", "hash_key")

    @classmethod
    def parse(cls, where: _Where, value: object) -> LoadBalancing:
        table = where.table(value, cls.KEYS)
        if "policy" not in table:
            where.at("policy").fail(f"required (one of {', '.join(LB_POLICIES)})")
        policy = table["policy"]
        if policy not in LB_POLICIES:
            where.at("policy").fail(
                f"must be one of {', '.join(LB_POLICIES)}, got {_shown(policy)}"
            )
        hash_key = table.get("hash_key")
        if policy == "ring_hash":
            if hash_key is None:
                where.at("hash_key").fail("required with ring_hash")
            if not isinstance(hash_key, str) or not _HASH_KEY.fullmatch(hash_key):
                where.at("hash_key").fail(
                    "must be source_ip, header:<name>, cookie:<name> or query:<name>, "
                    f"got {_shown(hash_key)}"
                )
        elif hash_key is not None:
            where.at("hash_key").fail(f"only applies to ring_hash, not {policy}")
        return cls(policy=policy, hash_key=hash_key)


@attrs.frozen(kw_only=True)
class Weights:
    """Weight overrides: per instance (``host:port``) and per zone; overlaid entry by entry."""

    instances: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_pairs)
    zones: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_pairs)

    KEYS: ClassVar[tuple[str, ...]] = ("instances", "zones")

    @classmethod
    def parse(cls, where: _Where, value: object) -> Weights:
        table = where.table(value, cls.KEYS)
        maps: dict[str, dict[str, int]] = {}
        for key, what in (("instances", "an instance (host:port)"), ("zones", "a zone")):
            inner = where.at(key)
            entries = table.get(key, {})
            if not isinstance(entries, Mapping):
                inner.fail(f"must be a table, got {_shown(entries)}")
            maps[key] = {
                inner.name(name, what): inner.at(_quoted(name)).integer(weight, 0, 10_000)
                for name, weight in entries.items()
            }
        return cls(instances=maps["instances"], zones=maps["zones"])


@attrs.frozen(kw_only=True)
class ZoneAffinity:
    """Keep traffic in the caller's zone unless too little of it is healthy."""

    enabled: bool | None = None
    fallback_threshold: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("enabled", "fallback_threshold")

    @classmethod
    def parse(cls, where: _Where, value: object) -> ZoneAffinity:
        table = where.table(value, cls.KEYS)
        return cls(
            enabled=_optional(where, table, "enabled", _boolean),
            fallback_threshold=_optional(
                where, table, "fallback_threshold", lambda w, v: w.number(v, 0, 100)
            ),
        )


def _boolean(where: _Where, value: object) -> bool:
    if not isinstance(value, bool):
        where.fail(f"must be true or false, got {_shown(value)}")
    return value


@attrs.frozen(kw_only=True)
class OutlierEjection:
    """When an instance that keeps failing is taken out of rotation, and for how long."""

    consecutive_failures: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "consecutive_failures",
        "interval",
        "base_ejection_time",
        "max_ejection_percent",
    )

    @classmethod
    def parse(cls, where: _Where, value: object) -> OutlierEjection:
        table = where.table(value, cls.KEYS)

        def seconds(w: _Where, v: object) -> float:
            return w.number(v, 0.1, 3600, " seconds")

        return cls(
            consecutive_failures=_optional(
                where, table, "consecutive_failures", lambda w, v: w.integer(v, 1, 1000)
            ),
            interval=_optional(where, table, "interval", seconds),
            base_ejection_time=_optional(where, table, "base_ejection_time", seconds),
            max_ejection_percent=_optional(
                where, table, "max_ejection_percent", lambda w, v: w.number(v, 0, 100)
            ),
        )


@attrs.frozen(kw_only=True)
class CircuitBreaking:
    """Bounds on what one consumer keeps open towards the service."""

    max_connections: int | None = None
    max_pending: int | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("max_connections", "max_pending")

    @classmethod
    def parse(cls, where: _Where, value: object) -> CircuitBreaking:
        table = where.table(value, cls.KEYS)
        return cls(
            max_connections=_optional(
                where, table, "max_connections", lambda w, v: w.integer(v, 1, 1_000_000)
            ),
            max_pending=_optional(
                where, table, "max_pending", lambda w, v: w.integer(v, 0, 1_000_000)
            ),
        )


@attrs.frozen(kw_only=True)
class Split:
    """Traffic shares by the value of one instance tag, e.g. ``version``: v1 95 %, v2 5 %.

    ``shares`` is ``(tag value, percent)`` sorted by value; the percentages sum to 100. An
    instance whose tag matches no share gets none of the traffic while a split is in force.
    """

    tag: str
    shares: tuple[tuple[str, float], ...] = attrs.field(converter=_pairs)

    @classmethod
    def parse(cls, where: _Where, value: object) -> Split:
        if not isinstance(value, Mapping) or not value:
            where.fail(f'must be a table of "<tag>=<value>" = <percent>, got {_shown(value)}')
        tags: set[str] = set()
        shares: dict[str, float] = {}
        for selector, percent in value.items():
            at = where.at(_quoted(str(selector)))
            tag, equals, tag_value = str(selector).partition("=")
            if not equals or not tag or not tag_value or len(selector) > MAX_NAME:
                at.fail('the key must be "<tag>=<value>", like "version=v2"')
            tags.add(tag)
            shares[tag_value] = at.number(percent, 0, 100)
        if len(tags) > 1:
            where.fail(f"every share must select on the same tag, got {', '.join(sorted(tags))}")
        total = math.fsum(shares.values())
        if abs(total - 100) > 1e-9:
            where.fail(f"the shares must sum to 100, got {_num(round(total, 6))}")
        return cls(tag=tags.pop(), shares=shares)

    def render(self) -> dict[str, float]:
        return {f"{self.tag}={value}": percent for value, percent in self.shares}


# -------------------------------------------------------------------------- policy

Section: TypeAlias = (
    Retries | LoadBalancing | Weights | ZoneAffinity | OutlierEjection | CircuitBreaking | Split
)


@attrs.frozen(kw_only=True)
class Policy:
    """The policy of one service, or of one consumer application for one service.

    Every field is optional (``None``: not said here). Timeouts are seconds.
    """

    connect_timeout: float | None = None
    request_timeout: float | None = None
    retries: Retries | None = None
    load_balancing: LoadBalancing | None = None
    weights: Weights | None = None
    zone_affinity: ZoneAffinity | None = None
    outlier_ejection: OutlierEjection | None = None
    circuit_breaking: CircuitBreaking | None = None
    split: Split | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "connect_timeout",
        "request_timeout",
        "retries",
        "load_balancing",
        "weights",
        "zone_affinity",
        "outlier_ejection",
        "circuit_breaking",
        "split",
    )

    @classmethod
    def from_mapping(cls, table: object, scope: str = "policy") -> Policy:
        """Parse one policy; ``scope`` starts every error message (``policy "shop.Cart"``)."""
        where = _Where(scope)
        table = where.table(table, cls.KEYS)
        return cls(
            connect_timeout=_optional(
                where, table, "connect_timeout", lambda w, v: w.number(v, 0.001, 300, " seconds")
            ),
            request_timeout=_optional(
                where, table, "request_timeout", lambda w, v: w.number(v, 0.001, 3600, " seconds")
            ),
            retries=_optional(where, table, "retries", Retries.parse),
            load_balancing=_optional(where, table, "load_balancing", LoadBalancing.parse),
            weights=_optional(where, table, "weights", Weights.parse),
            zone_affinity=_optional(where, table, "zone_affinity", ZoneAffinity.parse),
            outlier_ejection=_optional(where, table, "outlier_ejection", OutlierEjection.parse),
            circuit_breaking=_optional(where, table, "circuit_breaking", CircuitBreaking.parse),
            split=_optional(where, table, "split", Split.parse),
        )

    def to_mapping(self) -> dict[str, JSON]:
        """The plain mapping :meth:`from_mapping` reads back; unset fields left out."""
        out: dict[str, JSON] = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, Split):
                out[key] = value.render()
            elif isinstance(value, Weights):
                out[key] = {k: dict(v) for k, v in attrs.asdict(value, recurse=False).items() if v}
            elif attrs.has(type(value)):
                out[key] = {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in attrs.asdict(value, recurse=False).items()
                    if v is not None
                }
            else:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, text: str | bytes, scope: str = "policy") -> Policy:
        try:
            table = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{scope}: not valid JSON: {exc}") from None
        return cls.from_mapping(table, scope)

    def to_json(self) -> str:
        """The canonical rendering (sorted keys, unset fields left out)."""
        return canonical_json(self.to_mapping())

    def overlay(self, over: Policy) -> Policy:
        """This policy with what ``over`` sets put on top (see the module docstring)."""
        merged: dict[str, object] = {}
        for key in self.KEYS:
            mine, theirs = getattr(self, key), getattr(over, key)
            if (
                theirs is None
                or mine is None
                or not attrs.has(type(theirs))
                or isinstance(theirs, LoadBalancing | Split)
            ):
                merged[key] = mine if theirs is None else theirs
            elif isinstance(theirs, Weights):
                assert isinstance(mine, Weights)
                merged[key] = Weights(
                    instances={**dict(mine.instances), **dict(theirs.instances)},
                    zones={**dict(mine.zones), **dict(theirs.zones)},
                )
            else:
                changes = {
                    k: v for k, v in attrs.asdict(theirs, recurse=False).items() if v is not None
                }
                merged[key] = attrs.evolve(mine, **changes)
        return Policy(**merged)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- policy set


def _scope(service: str, consumer: str | None = None) -> str:
    scope = f"policy {json.dumps(service)}"
    return scope if consumer is None else f"{scope} for consumer {json.dumps(consumer)}"


@attrs.frozen
class PolicySet:
    """Every service's policy, and the per-consumer ones: one governance document.

    ``services`` is ``(service, policy)`` sorted by service; ``consumers`` is
    ``((consumer, service), policy)`` sorted likewise.
    """

    services: tuple[tuple[str, Policy], ...] = attrs.field(default=(), converter=_pairs)
    consumers: tuple[tuple[tuple[str, str], Policy], ...] = attrs.field(
        default=(), converter=_pairs
    )

    KEYS: ClassVar[tuple[str, ...]] = ("services", "consumers")

    @classmethod
    def from_mapping(cls, document: object) -> PolicySet:
        """Parse a whole document (what ``tomllib`` or ``json`` give); :class:`PolicyError`
        names the first thing wrong in it."""
        where = _Where("policies")
        table = where.table(document, cls.KEYS)
        services: dict[str, Policy] = {}
        entries = table.get("services", {})
        if not isinstance(entries, Mapping):
            where.at("services").fail(f"must be a table, got {_shown(entries)}")
        for service, policy in entries.items():
            where.at("services").name(service, "a service name")
            services[service] = Policy.from_mapping(policy, _scope(service))
        consumers: dict[tuple[str, str], Policy] = {}
        apps = table.get("consumers", {})
        if not isinstance(apps, Mapping):
            where.at("consumers").fail(f"must be a table, got {_shown(apps)}")
        for consumer, per_service in apps.items():
            at = where.at("consumers")
            at.name(consumer, "a consumer application name")
            if not isinstance(per_service, Mapping):
                at.at(_quoted(consumer)).fail(
                    f"must be a table of service policies, got {_shown(per_service)}"
                )
            for service, policy in per_service.items():
                at.at(_quoted(consumer)).name(service, "a service name")
                consumers[consumer, service] = Policy.from_mapping(
                    policy, _scope(service, consumer)
                )
        return cls(services, consumers)

    @classmethod
    def from_json(cls, text: str | bytes) -> PolicySet:
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PolicyError(f"policies: not valid JSON: {exc}") from None
        return cls.from_mapping(document)

    def to_mapping(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        if self.services:
            out["services"] = {name: policy.to_mapping() for name, policy in self.services}
        if self.consumers:
            consumers: dict[str, dict[str, JSON]] = {}
            for (consumer, service), policy in self.consumers:
                consumers.setdefault(consumer, {})[service] = policy.to_mapping()
            out["consumers"] = consumers
        return out

    def to_json(self) -> str:
        """The canonical rendering: sorted keys, no unset fields, equal sets give equal text."""
        return canonical_json(self.to_mapping())

    def service(self, service: str) -> Policy | None:
        """The per-service policy as written, or None."""
        return _find(self.services, service)

    def consumer(self, consumer: str, service: str) -> Policy | None:
        """The per-consumer policy for ``service`` as written, or None."""
        return _find(self.consumers, (consumer, service))

    def effective(self, service: str, consumer: str | None = None) -> Policy:
        """What ``consumer`` (or any consumer, if None) applies when calling ``service``: the
        per-service policy with the per-consumer one overlaid field by field; an empty
        :class:`Policy` when neither exists."""
        base = self.service(service) or Policy()
        if consumer is None:
            return base
        over = self.consumer(consumer, service)
        return base if over is None else base.overlay(over)

    def scopes(self) -> Iterator[tuple[str, Policy]]:
        """``(scope, policy)`` of every policy, scope as error messages and diffs name it."""
        for service, policy in self.services:
            yield _scope(service), policy
        for (consumer, service), policy in self.consumers:
            yield _scope(service, consumer), policy


def _find(pairs: tuple[tuple[Any, Policy], ...], key: Any) -> Policy | None:
    index = bisect.bisect_left(pairs, key, key=lambda pair: pair[0])
    if index < len(pairs) and pairs[index][0] == key:
        return pairs[index][1]
    return None


# ---------------------------------------------------------------------------- diff


@attrs.frozen
class Change:
    """One field that differs: ``old`` or ``new`` is None where the field is unset."""

    scope: str
    path: str
    old: JSON
    new: JSON

    def __str__(self) -> str:
        def shown(value: JSON) -> str:
            return "(unset)" if value is None else canonical_json(value)

        return f"{self.scope}: {self.path}: {shown(self.old)} -> {shown(self.new)}"


def _leaves(value: JSON, path: str = "") -> Iterator[tuple[str, JSON]]:
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _leaves(value[key], f"{path}.{_quoted(key)}" if path else _quoted(key))
    else:
        yield path, value


def _flatten(policies: PolicySet | Policy) -> dict[tuple[str, str], JSON]:
    scoped = policies.scopes() if isinstance(policies, PolicySet) else [("policy", policies)]
    return {
        (scope, path): value
        for scope, policy in scoped
        for path, value in _leaves(policy.to_mapping())
    }


def diff(old: PolicySet | Policy, new: PolicySet | Policy) -> tuple[Change, ...]:
    """Every leaf field that differs between ``old`` and ``new``, by scope and path (a map
    entry or a split share is one field; a list such as ``retries.on`` is one value)."""
    before, after = _flatten(old), _flatten(new)
    return tuple(
        Change(scope, path, before.get((scope, path)), after.get((scope, path)))
        for scope, path in sorted(before.keys() | after.keys())
        if before.get((scope, path)) != after.get((scope, path))
    )
