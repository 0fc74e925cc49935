"""The xDS resource cache: each watched service's resources, encoded once per change.

The cache sits between the :class:`~dispatcher.core.subscriptions.SubscriptionHub`
and the ADS streams (go-control-plane's ``pkg/cache`` to the streams'
``pkg/server``). It holds ONE hub subscription per service that any stream
wants, opened by the first stream that asks and closed when the last one
leaves, so the hub (and through it the upstream registries) sees one interest
per service however many Envoys and gRPC clients follow it; and one
:data:`~dispatcher.core.subscriptions.EVERYTHING` subscription while any
stream holds a wildcard (CDS/LDS) subscription.

A hub update is only a signal: the cache reads the service's current entry
from the hub's snapshot and re-encodes its resources when the entry's version
differs from the one it holds. Two subscriptions reporting the same change
(a service's own and the wildcard one) therefore cost one encoding, and a
subscriber that fell behind skips straight to the newest state. Watchers (the
streams) are then told which service changed; they decide what to send.

Resource versions are ``<incarnation>-<service version>``: the incarnation
is random per cache, so a client that reconnects after a restart with the
versions it held (Delta's ``initial_resource_versions``) cannot match a
different content that happens to carry the same snapshot version.

Policies. Given a :class:`~dispatcher.governance.feed.GovernanceFeed` of policy
documents, the cache renders each service's policy into its resources
(:mod:`~dispatcher.faces.xds.policy`). A new governance version re-encodes the
services whose policy it changed, and only what of them the change touches; the
others keep their bytes and their versions. A client whose node metadata names its
application (``zkgate.application``) gets the effective policy of that application
(:meth:`~dispatcher.governance.policy.PolicySet.effective`): the service's own
resources unless a per-consumer policy exists for that pair, in which case a variant
encoded for that application, once per change as well. Without a feed, or before it
has loaded, resources carry no policy.

Everything here runs on the trio thread and never awaits while it mutates
state.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import Protocol

import trio

from dispatcher.core.snapshot import ServiceEntry
from dispatcher.core.subscriptions import EVERYTHING, Subscription, SubscriptionHub
from dispatcher.faces.policy_feed import policy_sets
from dispatcher.faces.xds.metrics import XdsMetrics
from dispatcher.faces.xds.policy import tcp_tag
from dispatcher.faces.xds.resources import (
    Resource,
    ServiceResources,
    encode_outbound_listener,
    encode_service,
)
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import PolicySet

__all__ = ["ResourceCache", "Watcher"]

_log = logging.getLogger(__name__)


class Watcher(Protocol):
    """Something told when a watched service's resources change (or it disappears)."""

    def service_changed(self, service: str) -> None:
        """Called synchronously on the trio thread; must only note the change."""


class ResourceCache:
    """Encoded resources of every service some watcher wants; see the module docstring.

    :meth:`run` must be running (it owns the tasks that follow the hub)
    before :meth:`watch` or :meth:`watch_all` is called.
    """

    def __init__(
        self,
        hub: SubscriptionHub,
        metrics: XdsMetrics | None = None,
        policies: GovernanceFeed | None = None,
    ) -> None:
        self._hub = hub
        self.metrics = metrics if metrics is not None else XdsMetrics()
        self.incarnation = secrets.token_hex(4)
        self._feed = policies
        #: The governance version whose policies the resources carry (0: none yet).
        self.policy_version = 0
        self._policies = PolicySet()
        self._entries: dict[str, ServiceResources] = {}
        # The snapshot entry each held service was encoded from (variants are built from it).
        self._sources: dict[str, ServiceEntry] = {}
        # (service, application) -> resources under that application's own policy; only
        # pairs the policy document names, so the document bounds it.
        self._variants: dict[tuple[str, str], ServiceResources] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._all_watchers: set[Watcher] = set()
        self._all_subscription: Subscription | None = None
        # Sidecar listeners depend only on (service, address, port) and the part of the
        # policy a TCP proxy applies; kept while their service is watched, so equal nodes
        # share one encoding.
        self._outbound: dict[tuple[str, str, int, str], Resource] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the hub for the watched services until cancelled, then close every
        subscription."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._feed is not None:
                    nursery.start_soon(self._follow_policies, self._feed)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for subscription in (*self._subscriptions.values(), self._all_subscription):
                if subscription is not None:
                    subscription.close()
            self._subscriptions.clear()
            self._all_subscription = None

    # ----------------------------------------------------------------- reading

    def get(self, service: str, application: str = "") -> ServiceResources | None:
        """The current resources of a watched service for a client of ``application`` ('':
        unknown); None when it has no instances."""
        held = self._entries.get(service)
        if held is None or not application:
            return held
        policy = self._policies.consumer(application, service)
        if policy is None:
            return held
        effective = self._policies.effective(service, application)
        key = (service, application)
        variant = self._variants.get(key)
        if variant is None or variant.version != held.version or variant.policy != effective:
            before = variant
            variant = encode_service(self._sources[service], held.version, variant, effective)
            self._count_change(before, variant)
            self._variants[key] = variant
        return variant

    def services(self) -> Iterator[str]:
        """Every service with resources now (all of the snapshot while a wildcard is watched)."""
        return iter(self._entries)

    def outbound(self, service: str, address: str, port: int, application: str = "") -> Resource:
        """The sidecar listener of a watched ``service`` on ``address:port`` for a client of
        ``application``, encoded once."""
        policy = self._policies.effective(service, application or None)
        key = (service, address, port, tcp_tag(policy))
        resource = self._outbound.get(key)
        if resource is None:
            resource = encode_outbound_listener(service, address, port, policy)
            self._count(len(resource.any))
            self._outbound[key] = resource
        return resource

    # ---------------------------------------------------------------- watching

    def watch(self, watcher: Watcher, services: Iterable[str]) -> None:
        """Start telling ``watcher`` about ``services``; their resources are current at return."""
        for service in services:
            watchers = self._watchers.get(service)
            if watchers is None:
                watchers = self._watchers[service] = set()
                self._follow(service)
            watchers.add(watcher)

    def unwatch(self, watcher: Watcher, services: Iterable[str]) -> None:
        """Stop telling ``watcher`` about ``services``; the last watcher's leaving closes the
        service's hub subscription."""
        for service in services:
            watchers = self._watchers.get(service)
            if watchers is None:
                continue
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[service]
                subscription = self._subscriptions.pop(service, None)
                if subscription is not None:
                    subscription.close()
                if not self._all_watchers:
                    self._forget(service)

    def watch_all(self, watcher: Watcher) -> None:
        """Tell ``watcher`` about every service; the whole snapshot is current at return."""
        if not self._all_watchers:
            self._all_subscription = self._hub.subscribe((EVERYTHING,))
            self._spawn(self._all_subscription)
            for service in tuple(self._hub.snapshot):
                self._refresh(service)
        self._all_watchers.add(watcher)

    def unwatch_all(self, watcher: Watcher) -> None:
        """Stop telling ``watcher`` about every service."""
        if watcher not in self._all_watchers:
            return
        self._all_watchers.discard(watcher)
        if self._all_watchers:
            return
        if self._all_subscription is not None:
            self._all_subscription.close()
            self._all_subscription = None
        for service in tuple(self._entries):
            if service not in self._watchers:
                self._forget(service)

    # ---------------------------------------------------------------- internals

    def _follow(self, service: str) -> None:
        subscription = self._hub.subscribe((service,))
        self._subscriptions[service] = subscription
        self._spawn(subscription)
        self._refresh(service)

    def _spawn(self, subscription: Subscription) -> None:
        if self._nursery is None:
            subscription.close()
            raise RuntimeError("ResourceCache.run() is not running")
        self._nursery.start_soon(self._drain, subscription)

    async def _drain(self, subscription: Subscription) -> None:
        async for update in subscription:
            service = update.service
            if service in self._watchers or self._all_watchers:
                self._refresh(service)

    def _refresh(self, service: str, *, policy_changed: bool = False) -> None:
        entry = self._hub.snapshot.get(service)
        held = self._entries.get(service)
        if entry is None:
            if held is None:
                return
            self._forget(service)
        else:
            version = f"{self.incarnation}-{entry.version}"
            policy = self._policies.effective(service)
            if held is not None and held.version == version and held.policy == policy:
                if not policy_changed:
                    return
            else:
                encoded = encode_service(entry, version, held, policy)
                # A change re-encodes what it touches: the assignment for an instance
                # change, the policy's part for a policy change; everything when the
                # service (re)appears.
                self._count_change(held, encoded)
                self._entries[service] = encoded
                self._sources[service] = entry
        # Also when following starts: a wildcard watcher may hold an older version
        # that the EVERYTHING subscription has not reported yet, and would
        # otherwise never hear of this one.
        for watcher in (*self._watchers.get(service, ()), *self._all_watchers):
            watcher.service_changed(service)

    def _forget(self, service: str) -> None:
        self._entries.pop(service, None)
        self._sources.pop(service, None)
        for key in [key for key in self._outbound if key[0] == service]:
            del self._outbound[key]
        for pair in [pair for pair in self._variants if pair[0] == service]:
            del self._variants[pair]

    # ---------------------------------------------------------------- policies

    async def _follow_policies(self, feed: GovernanceFeed) -> None:
        async for version, policies in policy_sets(feed):
            self._apply_policies(version, policies)

    def _apply_policies(self, version: int, policies: PolicySet) -> None:
        """Put ``policies`` in force: re-encode and announce the services they change."""
        old, self._policies, self.policy_version = self._policies, policies, version
        touched = {
            service
            for service in {name for name, _ in (*old.services, *policies.services)}
            if old.service(service) != policies.service(service)
        }
        touched.update(
            service
            for consumer, service in {pair for pair, _ in (*old.consumers, *policies.consumers)}
            if old.consumer(consumer, service) != policies.consumer(consumer, service)
        )
        for pair in [
            pair for pair in self._variants if policies.consumer(pair[1], pair[0]) is None
        ]:
            del self._variants[pair]
        for service in sorted(touched):
            if service not in self._entries:
                continue
            for key in [key for key in self._outbound if key[0] == service]:
                del self._outbound[key]
            # Variants are encoded again when next asked for, from what they hold.
            self._refresh(service, policy_changed=True)
        _log.info("xds: policies in force", extra={"version": version, "services": len(touched)})

    def _count_change(self, before: ServiceResources | None, after: ServiceResources) -> None:
        """Count the resources of ``after`` that are not ``before``'s: the ones encoded."""
        if before is None:
            self._count(after.encoded_bytes)
            return
        for old, new in (
            (before.cluster, after.cluster),
            (before.assignment, after.assignment),
            (before.api_listener, after.api_listener),
            (before.route, after.route),
        ):
            if new is not old:
                self._count(len(new.any))

    def _count(self, size: int) -> None:
        self.metrics.encodings += 1
        self.metrics.bytes_encoded += size
        _log.debug("xds: encoded %d bytes", size)
