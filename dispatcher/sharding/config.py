"""The ``[sharding]`` table (this Dispatcher as one shard) and the ``[membership]`` table
(where the shards register), as ``zkgate serve`` reads them::

    [membership]                    # see dispatcher.sharding.membership.MembershipConfig
    kind = "zookeeper"              # zookeeper | etcd | memory
    address = "10.0.0.5:2181"       # ZooKeeper connect string, or etcd host:port

    [sharding]                      # see dispatcher.sharding.ownership
    id = "gw-eu-1"                  # member id; default node_id
    weight = 1.0                    # capacity weight
    balance = 1.10                  # bounded-load factor: the same everywhere, Meta Servers too
    subscribe_address = "10.0.0.7:7000"   # advertised; default the bound [subscriptions] port
    zookeeper_address = "10.0.0.7:2181"   # advertised; default the bound ZooKeeper port
    services = ["orders", "users"]  # names to put in the shared catalog at start
    warm_timeout = 10.0             # a service not loaded by then is served anyway

``[sharding]`` needs ``[membership]``; ``[membership]`` alone is the store of the
governance policies only (this Dispatcher is then no shard). :mod:`dispatcher.config`
checks that, and what a shard requires of the rest of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError
from dispatcher.sharding.assignment import DEFAULT_BALANCE
from dispatcher.sharding.membership import MembershipConfig, MembershipConfigError
from dispatcher.sharding.ownership import DEFAULT_WARM_TIMEOUT

__all__ = ["ShardingConfig", "parse_membership", "parse_sharding"]

_SHARDING_KEYS: Final = (
    "id", "weight", "balance", "subscribe_address", "zookeeper_address", "services",
    "warm_timeout",
)  # fmt: skip


@attrs.frozen
class ShardingConfig:
    """The ``[sharding]`` table: this Dispatcher as one shard
    (see :mod:`dispatcher.sharding.ownership`).

    ``id`` None means the node id. Advertised addresses left empty are taken from the bound
    ports when the gateway starts.
    """

    id: str | None = None
    weight: float = 1.0
    balance: float = DEFAULT_BALANCE
    subscribe_address: str = ""
    zookeeper_address: str = ""
    services: tuple[str, ...] = ()
    warm_timeout: float = DEFAULT_WARM_TIMEOUT

    def to_mapping(self) -> dict[str, Any]:
        """The ``[sharding]`` table as TOML would give it."""
        result: dict[str, Any] = {
            "weight": self.weight, "balance": self.balance, "services": list(self.services),
            "warm_timeout": self.warm_timeout,
        }  # fmt: skip
        for key in ("id", "subscribe_address", "zookeeper_address"):
            if getattr(self, key):
                result[key] = getattr(self, key)
        return result


def parse_membership(table: Mapping[str, Any], base_dir: Path | None = None) -> MembershipConfig:
    """Check the ``[membership]`` table, its errors raised as :class:`ConfigError`; relative
    paths in it are relative to ``base_dir``."""
    try:
        return MembershipConfig.from_table(table, base_dir=base_dir)
    except MembershipConfigError as exc:
        raise ConfigError(str(exc)) from None


def parse_sharding(table: Mapping[str, Any]) -> ShardingConfig:
    """Check the ``[sharding]`` table."""
    where = "sharding"
    settings.reject_unknown(table, _SHARDING_KEYS, where)
    options: dict[str, Any] = {}
    if "id" in table:
        member_id = settings.string(table["id"], f"{where}.id")
        if "/" in member_id or member_id in (".", ".."):
            raise ConfigError(f"{where}.id: must not contain '/' or be '.' or '..'")
        options["id"] = member_id
    for key, low in (("weight", 0.0), ("balance", 1.0), ("warm_timeout", 0.0)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{where}.{key}: must be a number, not {settings.type_name(value)}"
                )
            bounded = value >= low if key == "balance" else value > low
            if not bounded or value in (float("inf"), float("nan")) or value != value:
                bound = ">= 1" if key == "balance" else "> 0"
                raise ConfigError(f"{where}.{key}: must be a finite number {bound}, not {value}")
            options[key] = float(value)
    for key in ("subscribe_address", "zookeeper_address"):
        if key in table:
            options[key] = settings.address(table[key], f"{where}.{key}")
    if "services" in table:
        services = table["services"]
        if not isinstance(services, list) or not all(
            isinstance(name, str) and name and name not in (".", "..") for name in services
        ):
            raise ConfigError(f"{where}.services: must be an array of service names")
        options["services"] = tuple(services)
    return ShardingConfig(**options)
