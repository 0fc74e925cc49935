"""Who a ZooKeeper session is, as a consumer of services: mesh onboarding's identities.

A consumer is known, in this order, by

* its Dubbo registration: an ephemeral ``consumer://`` znode its session owns in a Dubbo
  projection's ``<root>/<service>/consumers``, whose URL names the ``application``, the
  host, and the framework version (``release``, or on Dubbo before 2.7 the ``dubbo``
  parameter, which then carried the release: Dubbo's own ``Version.getVersion`` reading);
* a ``[[mesh.consumer]]`` rule matching the session's address (Curator and plain clients,
  which write nothing that names them);
* its address alone: no application, so no switch applies to it.

The version check (``[mesh] min_version``) is decided here too: :func:`refusal` says why a
consumer may not be switched on, None when it may.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final
from urllib.parse import parse_qs, unquote_plus, urlsplit

import attrs

from dispatcher.faces.mesh.config import MeshConfig, parse_version

__all__ = ["Consumer", "from_dubbo_url", "identify", "refusal"]

DUBBO: Final = "dubbo"
_CONSUMERS_DIR: Final = "consumers"


@attrs.frozen
class Consumer:
    """One consumer's identity; ``source`` says how it was learnt
    (``dubbo-registration``, ``rule``, ``address``)."""

    application: str | None
    host: str
    framework: str | None
    version: str | None
    source: str


def from_dubbo_url(name: str) -> Consumer | None:
    """The consumer a Dubbo ``consumer://`` znode name describes; None for anything else."""
    try:
        url = urlsplit(unquote_plus(name, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        return None
    if url.scheme != "consumer" or not url.hostname:
        return None
    params = {key: values[-1] for key, values in parse_qs(url.query).items()}
    application = params.get("application") or None
    version = params.get("release") or params.get(DUBBO) or None
    return Consumer(application, url.hostname, DUBBO, version, "dubbo-registration")


def identify(
    registrations: Iterable[str], dubbo_roots: tuple[str, ...], address: str, config: MeshConfig
) -> Consumer:
    """The consumer behind a session that owns the ephemeral ``registrations`` (paths) and
    connects from ``address``."""
    for path in sorted(registrations):
        directory, _, name = path.rpartition("/")
        if not directory.endswith("/" + _CONSUMERS_DIR):
            continue
        if not any(directory.startswith(root + "/") for root in dubbo_roots):
            continue
        consumer = from_dubbo_url(name)
        if consumer is not None and consumer.application is not None:
            return consumer
    rule = config.rule_for(address)
    if rule is not None:
        return Consumer(rule.application, address, rule.framework, rule.version, "rule")
    return Consumer(None, address, None, None, "address")


def refusal(consumer: Consumer, config: MeshConfig) -> str | None:
    """Why ``consumer`` may not be switched on (the version check), or None."""
    if consumer.application is None:
        return "no application known (no Dubbo registration, no [[mesh.consumer]] rule)"
    if consumer.framework is None:
        return None
    minimum = config.min_version.get(consumer.framework)
    if minimum is None:
        return None
    if consumer.version is None:
        return f"{consumer.framework} version unknown; the minimum is {minimum}"
    have, need = parse_version(consumer.version), parse_version(minimum)
    if have is None or need is None or have < need:
        return f"{consumer.framework} {consumer.version} is below the minimum {minimum}"
    return None
