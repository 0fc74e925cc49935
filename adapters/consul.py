"""The Consul upstream: services from a Consul agent's catalog, watched with blocking queries.

One *blocking loop* follows ``/v1/catalog/services`` to learn which services
exist (unless the config names a fixed set), and one loop per service of
interest follows ``/v1/health/service/<name>``; each loop keeps its own index,
and each answer for service S becomes ``Listing(instances, services={S})``,
which the fan-in diffs against what it held for S: exact, and nothing to
reconcile here. A service that leaves the catalog gets an empty Listing and its
loop stops.

The loops follow Consul's rules for blocking-query clients
(https://developer.hashicorp.com/consul/api-docs/features/blocking,
"Implementation Details"):

* Send ``?index=<X-Consul-Index of the previous answer>&wait=<wait>``; the
  agent holds the request until that index is passed or ``wait`` elapses. An
  answer is no guarantee of a change, so a Listing is emitted only when the
  instances differ from the last one sent.
* **Reset the index if it goes backwards**: an answer whose index is lower than
  the one sent (a snapshot restore, a server that lost state) sets the index
  to 0, restarting the loop with a non-blocking read, so that updates are not
  missed for as long as the old, too-high index would take to be reached.
* **Sanity-check that the index is greater than zero**: after each answer the
  index is raised to at least 1, because blocking on index 0 does not block
  (some Consul versions answered 0, sending unaware clients into a busy loop).
* **Rate limit**: consecutive calls of one loop start at least ``min_interval``
  apart, so an agent that answers at once (the bugs above, or a service that
  changes constantly) costs at most one request per ``min_interval`` per loop.
  Changes made within that interval arrive together, at most that much later.
* Consul adds up to ``wait / 16`` of jitter on its side; the ``wait`` sent is
  also drawn from ``[wait * 15/16, wait]`` so that gateways started together
  do not all renew their queries in lockstep.

After any failed call the loop backs off (full jitter), and its next call is a
non-blocking read (index 0): the first answer after an outage is the complete
current state, sent at once rather than after a blocking query times out.

Health. Consul reports check states; the instance's health is: any check
``critical`` (or a state this module does not know) → ``failing``; otherwise
any ``warning`` → ``passing``; all ``passing`` → ``passing``; no checks at
all → ``unknown``. A warning is routed to on purpose: Consul's own DNS
interface answers with warning instances unless ``only_passing`` is set, and
in this model only ``failing`` means "do not route here". Their weight is
then ``Weights.Warning`` (otherwise ``Weights.Passing``), as in Consul's DNS SRV
answers. The checks counted are all that Consul returns for the instance:
its own and its node's (``serfHealth``, node maintenance).

Instance ids. Consul identifies an instance by (node, service id): the
service id is unique only on one agent, and defaults to the service name, so
two nodes each running "web" both call their instance "web". The instance id
(and ``Source.key``) is therefore ``"<node>/<service id>"``.

Threads. py-consul is blocking (requests), so each call runs in a worker
thread through ``trio.to_thread.run_sync(..., abandon_on_cancel=True)``: a
cancelled loop does not wait for its query to time out; the abandoned thread
finishes on its own within ``wait`` and its answer is dropped. The threads
come from this upstream's own capacity limiter rather than trio's default
one, which the whole process shares and which long-held blocking queries
would exhaust. Each loop has its own client (its own requests session and
connection), since a requests session is not meant to be shared between
threads.

Transport. A loop asks its queries through a :class:`Fetch`, one per loop,
made by the ``connect`` the upstream is given; the default is the py-consul
client in worker threads described above. Tests give an in-process one, so
that blocking queries, rate limits and backoff run on trio's clock, virtual
under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, Self, TypeVar

import attrs
import consul
import requests
import trio

from dispatcher.backoff import Backoff
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.upstream import (
    ConfigError,
    Inspection,
    Listing,
    Status,
    UpstreamEvent,
    check_type,
    reject_unknown,
    require,
)
from dispatcher.wire import join_address, parse_address

__all__ = ["ConsulConfig", "ConsulUpstream", "Fetch", "Query", "instance_from_entry"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_OPTIONS: Final = ("address", "scheme", "token", "services", "wait", "min_interval")
_DEFAULT_WAIT: Final = 60.0
_MAX_WAIT: Final = 600.0  # Consul caps wait at 10 minutes
_DEFAULT_MIN_INTERVAL: Final = 1.0
# Threads blocked in queries, per upstream: one per service of interest plus
# the catalog, plus abandoned ones finishing their last wait. Past this the
# loops take turns (each still catches up through its index), rather than
# starting threads without limit.
_MAX_THREADS: Final = 512
_HEALTHY_STATES: Final = frozenset({"passing", "warning"})
# What a call can fail with: the agent's answers (ConsulException covers 4xx,
# 5xx and undecodable bodies), the network, and an index header that is not a
# number.
_CALL_ERRORS: Final = (consul.ConsulException, requests.RequestException, ValueError)


@attrs.frozen
class ConsulConfig:
    """The validated options of one Consul upstream."""

    host: str
    port: int
    scheme: str = "http"
    token: str | None = None
    services: frozenset[str] | None = None  # None: every service in the catalog
    wait: float = _DEFAULT_WAIT
    min_interval: float = _DEFAULT_MIN_INTERVAL

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any]) -> Self:
        where = f"upstream {name!r} (consul)"
        reject_unknown(options, _OPTIONS, where)
        host, port = _parse_address(require(options, "address", str, where), where)
        scheme = check_type(options.get("scheme", "http"), "scheme", str, where)
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}: key 'scheme' must be 'http' or 'https', not {scheme!r}")
        token = options.get("token")
        if token is not None:
            check_type(token, "token", str, where)
        services = None
        if "services" in options:
            listed = check_type(options["services"], "services", list, where)
            if not listed or not all(isinstance(s, str) and s for s in listed):
                raise ConfigError(f"{where}: key 'services' must be a non-empty list of names")
            services = frozenset(listed)
        wait = check_type(options.get("wait", _DEFAULT_WAIT), "wait", float, where)
        if not 0 < wait <= _MAX_WAIT:
            raise ConfigError(f"{where}: key 'wait' must be in (0, {_MAX_WAIT:g}] seconds")
        min_interval = check_type(
            options.get("min_interval", _DEFAULT_MIN_INTERVAL), "min_interval", float, where
        )
        if not 0 <= min_interval < math.inf:
            raise ConfigError(f"{where}: key 'min_interval' must be >= 0 seconds")
        return cls(host, port, scheme, token or None, services, wait, min_interval)


@attrs.frozen
class Query:
    """One call of a loop: a read of the catalog or of one service's health."""

    service: str | None  # None: /v1/catalog/services; else /v1/health/service/<service>
    index: int  # the X-Consul-Index to wait past; 0 is a plain, non-blocking read
    wait: str  # how long the agent may hold it, as a Go duration ("58125ms")
    token: str | None

    @property
    def endpoint(self) -> str:
        """The API path below ``/v1/``, which also names the loop in logs and Status."""
        return _endpoint(self.service)


def _endpoint(service: str | None) -> str:
    return "catalog/services" if service is None else f"health/service/{service}"


class Fetch(Protocol):
    """How a loop asks a :class:`Query`: the transport, injectable for tests.

    Returns the answer's ``X-Consul-Index`` as sent and ``convert(index,
    body)`` of its decoded JSON body; ``convert`` is pure and may run in
    another thread. An answer that is not a result (4xx, 5xx, no index
    header, undecodable) raises ``consul.ConsulException``; a failed
    connection raises ``requests.RequestException``.
    """

    async def __call__(self, query: Query, convert: Callable[[str, Any], _T]) -> tuple[str, _T]:
        """Ask ``query`` and return its index and converted body."""
        ...


def _parse_address(address: str, where: str) -> tuple[str, int]:
    """``(host, port)``; an IPv6 host keeps its brackets (py-consul pastes it into a URL)."""
    try:
        host, port = parse_address(address, default_host=None, allow_port_zero=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: key 'address' must be 'host:port': {exc}") from None
    return join_address(host, port).removesuffix(f":{port}"), port


def instance_from_entry(
    adapter: str, service: str, entry: Mapping[str, Any], index: int
) -> Instance:
    """One ``/v1/health/service/<service>`` entry as an :class:`Instance`.

    ``index`` (the answer's ``X-Consul-Index``) is the revision when the entry
    carries no ``ModifyIndex``. Raises ``KeyError``, ``TypeError``, ``ValueError`` or
    ``AttributeError``
    for an entry that does not describe an instance.
    """
    node = entry["Node"]
    record = entry["Service"]
    checks = entry.get("Checks") or ()
    states = {check.get("Status") for check in checks}
    if not checks:
        health = Health.UNKNOWN
    elif not states <= _HEALTHY_STATES:
        health = Health.FAILING
    else:
        health = Health.PASSING
    weights = record.get("Weights") or {}
    weight_key = "Warning" if health is Health.PASSING and "warning" in states else "Passing"
    metadata = {str(key): str(value) for key, value in (record.get("Meta") or {}).items()}
    tags = record.get("Tags") or ()
    if tags:
        metadata["consul.tags"] = ",".join(str(tag) for tag in tags)
    revisions = [record.get("ModifyIndex") or 0, *(c.get("ModifyIndex") or 0 for c in checks)]
    key = f"{node['Node']}/{record['ID']}"
    return Instance(
        service,
        key,
        record.get("Address") or node["Address"],
        record["Port"],
        weight=int(weights.get(weight_key, 1)),
        metadata=metadata,
        health=health,
        source=Source(adapter, key, int(max(revisions)) or index),
    )


class ConsulUpstream:
    """A Consul agent as an upstream (see the module docstring for how it watches).

    Options: ``address`` ("host:port", required), ``scheme`` ("http" or
    "https"), ``token`` (an ACL token; when absent py-consul falls back to
    ``CONSUL_HTTP_TOKEN``), ``services`` (a fixed list of service names;
    default: every service in the catalog), ``wait`` (seconds a blocking
    query may be held, default 60, at most 600) and ``min_interval`` (seconds
    between the starts of two calls of one loop, default 1).

    ``connect`` makes each loop's :class:`Fetch` when the loop starts; the
    default is py-consul over HTTP to ``config``'s address.
    """

    def __init__(
        self, name: str, config: ConsulConfig, *, connect: Callable[[], Fetch] | None = None
    ) -> None:
        self.name = name
        self.config = config
        self._connect = self._http_fetch if connect is None else connect
        self._interest: frozenset[str] | None = None
        self._catalog: frozenset[str] | None = config.services
        self._loops: dict[str, trio.CancelScope] = {}
        self._failing: dict[str, str] = {}  # loop -> why its last call failed
        self._connected: bool | None = None  # the last Status sent
        self._nursery: trio.Nursery | None = None
        self._events: trio.MemorySendChannel[UpstreamEvent] | None = None
        self._limiter: trio.CapacityLimiter | None = None

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, ConsulConfig.from_options(name, options))

    def set_interest(self, services: frozenset[str] | None) -> None:
        self._interest = services
        self._reconcile()

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        # Everything starts afresh, so a restarted run lists every service again.
        self._events = events
        self._limiter = trio.CapacityLimiter(_MAX_THREADS)
        self._catalog = self.config.services
        self._failing.clear()
        self._connected = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.services is None:
                    nursery.start_soon(self._catalog_loop)
                self._reconcile()
                # Stay up with no loop at all (a fixed list nobody is interested
                # in yet): set_interest may start some later.
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._loops.clear()

    async def inspect(self, services: frozenset[str] | None) -> Inspection:
        """Read ``services`` (None: the configured list, else the catalog) with
        plain, non-blocking queries: one per service and one for the catalog.
        The revision is the highest ``X-Consul-Index`` answered."""
        if self._limiter is None:
            raise ConnectionError(f"consul upstream {self.name!r} is not running")
        fetch = self._connect()
        token = self.config.token
        revision = 0
        names = services if services is not None else self.config.services
        if names is None:
            found, catalog = await fetch(
                Query(None, 0, "1s", token), lambda _found, body: frozenset(body or {})
            )
            revision = int(found)
            names = catalog
        instances: list[Instance] = []
        for service in sorted(names):
            found, listed = await fetch(
                Query(service, 0, "1s", token),
                lambda found, body, service=service: self._instances(  # type: ignore[misc]
                    service, body or (), int(found)
                ),
            )
            revision = max(revision, int(found))
            instances.extend(listed)
        reads = len(names) + (services is None and self.config.services is None)
        return Inspection(tuple(instances), services, revision, reads)

    # ------------------------------------------------------------------ loops

    def _reconcile(self) -> None:
        """Start a loop for each wanted service that has none; cancel the unwanted ones."""
        nursery = self._nursery
        if nursery is None:
            return  # not running (yet, or any more): run() reconciles when it starts
        known = self._catalog or frozenset()
        wanted = known if self._interest is None else known & self._interest
        for service in set(self._loops) - wanted:
            self._stop(service)
        for service in wanted - set(self._loops):
            scope = trio.CancelScope()
            self._loops[service] = scope
            nursery.start_soon(self._service_loop, service, scope)

    def _stop(self, service: str) -> None:
        self._loops.pop(service).cancel()
        if self._failing.pop(f"health/service/{service}", None) is not None:
            # That loop held the upstream disconnected; nobody else may answer soon.
            assert self._nursery is not None
            self._nursery.start_soon(self._report)

    async def _catalog_loop(self) -> None:
        def convert(found: str, services: Any) -> frozenset[str]:
            return frozenset(services or ())

        async def handle(names: frozenset[str]) -> None:
            before = self._catalog or frozenset()
            self._catalog = names
            for service in sorted(before - names):
                if service in self._loops:
                    self._stop(service)
                    # The loop is cancelled first, so nothing it had in flight
                    # can arrive after this.
                    await self._send(Listing((), frozenset({service})))
            self._reconcile()

        await self._poll(None, convert, handle)

    async def _service_loop(self, service: str, scope: trio.CancelScope) -> None:
        last: frozenset[Instance] | None = None

        def convert(found: str, entries: Any) -> tuple[Instance, ...]:
            return self._instances(service, entries or (), int(found))

        async def handle(instances: tuple[Instance, ...]) -> None:
            nonlocal last
            current = frozenset(instances)
            if current != last:
                last = current
                await self._send(Listing(instances, frozenset({service})))

        with scope:
            await self._poll(service, convert, handle)

    async def _poll(
        self,
        service: str | None,
        convert: Callable[[str, Any], _T],
        handle: Callable[[_T], Awaitable[None]],
    ) -> None:
        """Run one blocking loop forever, by the rules in the module docstring."""
        config = self.config
        fetch = self._connect()
        what = _endpoint(service)
        backoff = Backoff()
        index = 0
        next_start = trio.current_time()
        while True:
            await trio.sleep_until(next_start)
            next_start = trio.current_time() + config.min_interval
            wait = f"{round(config.wait * random.uniform(15 / 16, 1) * 1000)}ms"
            try:
                found, result = await fetch(Query(service, index, wait, config.token), convert)
                answered = int(found)
            except _CALL_ERRORS as exc:
                index = 0  # re-list as soon as the agent answers again
                await self._failed(what, exc)
                await backoff.sleep()
                continue
            backoff.reset()
            if answered < index:
                log.info(
                    "consul index went backwards; re-listing from index 0",
                    extra={"upstream": self.name, "query": what, "index": answered,
                           "previous_index": index},
                )  # fmt: skip
                index = 0
            else:
                index = max(answered, 1)
            await handle(result)
            await self._succeeded(what)

    def _http_fetch(self) -> Fetch:
        """A loop's py-consul client, each call in a worker thread (see the module docstring)."""
        config = self.config
        client = consul.Consul(host=config.host, port=config.port, scheme=config.scheme)
        limiter = self._limiter
        assert limiter is not None

        def call(query: Query) -> tuple[str, Any]:
            if query.service is None:
                return client.catalog.services(
                    index=query.index, wait=query.wait, token=query.token
                )
            return client.health.service(
                query.service, index=query.index, wait=query.wait, token=query.token
            )

        async def fetch(query: Query, convert: Callable[[str, Any], _T]) -> tuple[str, _T]:
            def blocking() -> tuple[str, _T]:
                found, body = call(query)
                return found, convert(found, body)

            return await trio.to_thread.run_sync(blocking, abandon_on_cancel=True, limiter=limiter)

        return fetch

    def _instances(self, service: str, entries: Any, index: int) -> tuple[Instance, ...]:
        # Called as a Fetch's convert, in the worker thread by default: pure
        # conversion, no trio state.
        instances = []
        for entry in entries:
            try:
                instances.append(instance_from_entry(self.name, service, entry, index))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "skipping a consul entry that describes no instance",
                    extra={"service": service, "upstream": self.name, "error": repr(exc)},
                )
        return tuple(instances)

    # ------------------------------------------------------------------ status

    async def _send(self, event: UpstreamEvent) -> None:
        assert self._events is not None
        await self._events.send(event)

    async def _failed(self, what: str, exc: BaseException) -> None:
        detail = f"consul {self.config.host}:{self.config.port}: {what}: {exc}"
        if what not in self._failing:
            log.warning("consul query failing", extra={
                "upstream": self.name, "address": f"{self.config.host}:{self.config.port}",
                "query": what, "error": str(exc),
            })  # fmt: skip
        self._failing[what] = detail
        await self._report()

    async def _succeeded(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            log.info("consul query answers again", extra={"upstream": self.name, "query": what})
        await self._report()

    async def _report(self) -> None:
        """Send a Status when the upstream's state flips: disconnected while any loop fails."""
        connected = not self._failing
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            await self._send(Status(True, f"consul {self.config.host}:{self.config.port}"))
        else:
            await self._send(Status(False, next(iter(self._failing.values()))))
