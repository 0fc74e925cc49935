"""A double of Consul's HTTP API: the one place the test suite stands in for Consul.

No Consul binary can be installed on the machines that run this suite (see
DESIGN.md), so the Consul adapter is tested against this in-process HTTP
server instead; real Consul is exercised by the compose files under
``docker/``. Every other registry in the suite is a real server. This module
implements, as Consul documents them, exactly the parts of the API that
``adapters/consul.py`` uses, and serves them two ways:

* over HTTP on a real loopback socket (:meth:`ConsulDouble.start`), what the
  adapter's default transport, py-consul, talks to;
* in process (:meth:`ConsulDouble.fetch`, the adapter's ``Fetch``), so that a
  test on trio's ``MockClock`` sees blocking queries held for exactly their
  ``wait`` in virtual time.

Both go through one coroutine, :meth:`ConsulDouble.serve`: the state lives
in the test's trio run and a held query waits on trio's clock. The HTTP
server's threads hand each request to that run, so the double must be used
(created, controlled, started) from inside it.

* ``GET /v1/catalog/services``: a map of service name to the union of its
  tags (https://developer.hashicorp.com/consul/api-docs/catalog#list-services).
* ``GET /v1/health/service/<name>``: one entry per instance, each with its
  ``Node``, ``Service`` and ``Checks``, where ``Checks`` holds the node's own
  checks (``serfHealth``) as well as the instance's
  (https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service).
* Blocking queries (https://developer.hashicorp.com/consul/api-docs/features/blocking):
  every successful response carries ``X-Consul-Index``; a request with
  ``?index=N`` (N > 0) hangs until the index relevant to it exceeds N or
  ``wait`` elapses (a Go duration such as ``"500ms"``, ``"10s"``, ``"5m"``;
  5 minutes when absent, capped at 10 minutes, plus up to ``wait / 16`` of
  random jitter), then answers with the current state and index, changed or
  not. ``index=0`` or no index is an ordinary, immediate read.
* Indexes as Consul's state store keeps them: one Raft index that every
  write advances; ``catalog/services`` answers with the index of the last
  write to the services table (registrations and deregistrations, not check
  updates), ``health/service/<name>`` with the index of the last write that
  touched that service (its instances, their checks, their nodes' checks), or
  the services-table index for a service that does not exist.
* Errors as Consul answers them: a plain-text body and no ``X-Consul-Index``
  (Consul sets the index only on successful reads); ``400`` for a malformed
  ``index`` or ``wait``; ``404`` for other paths; ``405`` for other methods.

Test controls (called from the test, not over HTTP): :meth:`~ConsulDouble.add_node`,
:meth:`~ConsulDouble.register`, :meth:`~ConsulDouble.deregister`,
:meth:`~ConsulDouble.set_check`, :meth:`~ConsulDouble.reset_index` (a snapshot
restore: the index goes backwards), :meth:`~ConsulDouble.fail` /
:meth:`~ConsulDouble.recover` (answer 500 "No cluster leader"),
:meth:`~ConsulDouble.answer_zero_index` (the old Consul bug the blocking-query
docs warn about), and :meth:`~ConsulDouble.requests`, a log of every request
with its parameters, token, status, the index it was answered with, and when
(trio's clock) it arrived and was answered.

Left out, on purpose (the adapter uses none of it): writes over HTTP (the
agent and catalog register endpoints; tests register through the controls),
ACL enforcement (``X-Consul-Token`` is recorded, never checked), datacenters
(``dc`` is ignored), consistency modes (``stale``/``consistent`` are
ignored), filtering (``passing``, ``tag``, ``filter``, ``node-meta``, ``near``),
namespaces, partitions and peers, Connect, gzip, and every other endpoint.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import attrs
import consul
import trio

from adapters.consul import Query

__all__ = ["DEFAULT_NODE", "BusyLoopError", "ConsulDouble", "RequestRecord", "parse_go_duration"]

_T = TypeVar("_T")

DEFAULT_NODE: Final = "node-1"
"""The node that :meth:`ConsulDouble.register` puts instances on unless told otherwise."""

CHECK_STATUSES: Final = frozenset({"passing", "warning", "critical"})

_DEFAULT_WAIT: Final = 5 * 60.0  # Consul's default when index is given without wait
_MAX_WAIT: Final = 10 * 60.0  # Consul caps wait at 10 minutes
# Requests at one instant of trio's clock past which the double refuses to go
# on: under a MockClock a client that asks without ever waiting stops virtual
# time, so without this it would spin until the suite's timeout.
_BUSY_LOOP: Final = 1000
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"1m30s"``, ``"250ms"``), as Consul's ``wait`` takes.

    Go's ``time.ParseDuration`` accepts a bare ``"0"`` and otherwise needs a
    unit on every number; anything else is a ``ValueError``, which Consul
    answers with 400.
    """
    if text == "0":
        return 0.0
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


@attrs.define
class RequestRecord:
    """One HTTP request the double received; ``status`` and ``index`` are set when answered."""

    method: str
    path: str
    params: Mapping[str, str]
    token: str | None
    arrived: float  # trio.current_time()
    status: int | None = None
    index: int | None = None  # the X-Consul-Index answered, None for errors
    answered: float | None = None

    @property
    def blocking_index(self) -> int | None:
        """The ``index`` the client asked to wait past, or None for a non-blocking read."""
        value = self.params.get("index")
        return int(value) if value is not None and value.isdigit() else None


@attrs.define
class _Node:
    name: str
    address: str
    create_index: int
    modify_index: int
    node_id: str


@attrs.define
class _Check:
    node: str
    check_id: str
    status: str
    service_id: str  # "" for a node-level check such as serfHealth
    service_name: str
    create_index: int
    modify_index: int


@attrs.define
class _Service:
    node: str
    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: dict[str, str]
    weights: tuple[int, int]
    create_index: int
    modify_index: int


class BusyLoopError(RuntimeError):
    """A client asked more than ``_BUSY_LOOP`` times without trio's clock moving."""


class _Unavailable(Exception):
    """The double is told to fail: answer 500 the way a Consul server without a leader does."""


class ConsulDouble:
    """A double of a Consul agent's HTTP API (see the module docstring).

    Create it, control it and serve it from one trio run: every write
    advances the Raft index and wakes the blocking queries it concerns, and
    a held query waits on that run's clock. :meth:`fetch` needs nothing
    more; :meth:`start` (or ``with``) also serves HTTP on 127.0.0.1.

    With ``consul_service`` (the default) the catalog holds the ``consul``
    service itself, as every real Consul cluster's does (each server
    registers it on port 8300), so a client that discovers every service sees
    it too. ``jitter=False`` holds a blocking query for exactly its ``wait``
    instead of adding up to ``wait / 16`` as Consul does, so that a test on
    virtual time can assert exact times.
    """

    def __init__(
        self, *, datacenter: str = "dc1", consul_service: bool = True, jitter: bool = True
    ) -> None:
        self.datacenter = datacenter
        self._jitter = jitter
        # Set and replaced on every change: what held queries wait on.
        self._changed = trio.Event()
        self._raft_index = 1
        self._services_index = 1  # last write to the services table
        self._service_index: dict[str, int] = {}  # service name -> last write touching it
        self._nodes: dict[str, _Node] = {}
        self._services: dict[tuple[str, str], _Service] = {}  # (node, service id)
        self._checks: dict[tuple[str, str], _Check] = {}  # (node, check id)
        self._log: list[RequestRecord] = []
        self._instant = (-math.inf, 0)  # (trio time, requests that arrived at it)
        self._restores = 0  # bumped by reset_index: abandons every blocking query
        self._failing: tuple[int, str] | None = None
        self._fail_budget: int | None = None
        self._zero_index = False
        self._closed = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        if consul_service:
            self.add_node("consul-server", "127.0.0.1")
            self.register("consul", "consul", port=8300, node="consul-server")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Serve HTTP on a free 127.0.0.1 port; call from inside the trio run."""
        self._trio_token = trio.lowlevel.current_trio_token()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.double = self  # type: ignore[attr-defined]  # how _Handler finds its double
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="consul-double",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; blocked queries are answered at once so their clients are released."""
        self._closed = True
        self._notify()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"``, what the adapter's ``address`` option takes."""
        if self._server is None:
            raise RuntimeError("the double is not started")
        return f"127.0.0.1:{self._server.server_port}"

    # ------------------------------------------------------------------ controls

    @property
    def index(self) -> int:
        """The current Raft index."""
        return self._raft_index

    def add_node(self, node: str, address: str, *, serf_health: str | None = "passing") -> None:
        """Add (or re-address) a node; ``serf_health=None`` makes a node with no checks at all,
        as an externally registered node (no agent, no ``serfHealth``) is."""
        index = self._write()
        existing = self._nodes.get(node)
        if existing is None:
            self._nodes[node] = _Node(node, address, index, index, _node_id(node))
        else:
            existing.address = address
            existing.modify_index = index
        if serf_health is not None:
            self._put_check(node, "serfHealth", serf_health, "", index)
        self._touch_node(node, index)
        self._notify()

    def register(
        self,
        service: str,
        service_id: str | None = None,
        *,
        port: int,
        address: str = "",
        node: str = DEFAULT_NODE,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        weights: tuple[int, int] = (1, 1),
        checks: Mapping[str, str] | None = None,
    ) -> str:
        """Register (or replace) an instance as an agent on ``node`` would; return its id.

        ``service_id`` defaults to ``service``, as Consul's does. A node that
        does not exist yet is created at 127.0.0.1 with a passing
        ``serfHealth``. ``checks`` maps check ids to statuses.
        """
        service_id = service_id or service
        if node not in self._nodes:
            self.add_node(node, "127.0.0.1")
        index = self._write()
        key = (node, service_id)
        previous = self._services.get(key)
        self._services[key] = _Service(
            node=node,
            service_id=service_id,
            name=service,
            address=address,
            port=port,
            tags=tuple(tags),
            meta=dict(meta or {}),
            weights=weights,
            create_index=previous.create_index if previous else index,
            modify_index=index,
        )
        for check_id, status in (checks or {}).items():
            self._put_check(node, check_id, status, service_id, index)
        self._services_index = index
        self._service_index[service] = index
        if previous is not None and previous.name != service:
            self._service_index[previous.name] = index
        self._notify()
        return service_id

    def deregister(self, service_id: str, *, node: str = DEFAULT_NODE) -> None:
        """Remove an instance and its checks."""
        removed = self._services.pop((node, service_id), None)
        if removed is None:
            raise KeyError(f"no service {service_id!r} on node {node!r}")
        index = self._write()
        for key in [k for k, c in self._checks.items() if c.node == node]:
            if self._checks[key].service_id == service_id:
                del self._checks[key]
        self._services_index = index
        self._service_index[removed.name] = index
        self._notify()

    def set_check(
        self, check_id: str, status: str, *, service_id: str = "", node: str = DEFAULT_NODE
    ) -> None:
        """Create or update a check; ``service_id=""`` makes it a node check.

        Like Consul, writing the status a check already has changes nothing
        and does not advance any index.
        """
        if node not in self._nodes:
            raise KeyError(f"no node {node!r}")
        if service_id and (node, service_id) not in self._services:
            raise KeyError(f"no service {service_id!r} on node {node!r}")
        existing = self._checks.get((node, check_id))
        if existing is not None and existing.status == status:
            return
        index = self._write()
        self._put_check(node, check_id, status, service_id, index)
        if service_id:
            self._service_index[self._services[(node, service_id)].name] = index
        else:
            self._touch_node(node, index)
        self._notify()

    def reset_index(self, to: int = 1) -> None:
        """Make every index go backwards to ``to``, keeping the data: a snapshot restore.

        Consul's blocking-query docs name this among the ways an index can go
        backwards. Consul's state store abandons every watch on a restore, so
        blocking queries in flight return at once with the new, lower index;
        this does the same. Later writes count up from ``to``.
        """
        self._raft_index = to
        self._services_index = to
        self._service_index = dict.fromkeys(self._service_index, to)
        records: list[_Node | _Service | _Check] = [
            *self._nodes.values(),
            *self._services.values(),
            *self._checks.values(),
        ]
        for record in records:
            record.create_index = min(record.create_index, to)
            record.modify_index = min(record.modify_index, to)
        self._restores += 1
        self._notify()

    def fail(self, requests: int | None = None, *, status: int = 500) -> None:
        """Answer ``status`` with "No cluster leader" (what a Consul agent answers while its
        servers have no leader) to the next ``requests`` requests, or until
        :meth:`recover` when None. Blocking queries in flight fail at once too, as
        they do when a leader is lost."""
        self._failing = (status, "No cluster leader")
        self._fail_budget = requests
        self._notify()

    def recover(self) -> None:
        self._failing = None
        self._fail_budget = None
        self._notify()

    def answer_zero_index(self, on: bool = True) -> None:
        """Fault injection: answer ``X-Consul-Index: 0`` without blocking.

        Consul's docs warn that some versions did this ("it is a bug in
        Consul if it is not [> 0]"), and that a client which sends ``index=0``
        back never blocks and spins; a correct client sends ``index=1``
        instead and rate-limits its loop. While on, blocking queries with
        an index below the real one return at once, so only the client's own
        rate limit stands between it and a busy loop.
        """
        self._zero_index = on
        self._notify()

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Copies of the logged requests, oldest first, optionally only those for ``path``."""
        return [attrs.evolve(r) for r in self._log if path is None or r.path == path]

    # ------------------------------------------------------------------ state helpers

    def _write(self) -> int:
        self._raft_index += 1
        return self._raft_index

    def _notify(self) -> None:
        """Wake every held query, which then looks again at what it waits for."""
        self._changed.set()
        self._changed = trio.Event()

    def _put_check(
        self, node: str, check_id: str, status: str, service_id: str, index: int
    ) -> None:
        if status not in CHECK_STATUSES:
            raise ValueError(
                f"check status must be one of {sorted(CHECK_STATUSES)}, not {status!r}"
            )
        existing = self._checks.get((node, check_id))
        service_name = self._services[(node, service_id)].name if service_id else ""
        self._checks[(node, check_id)] = _Check(
            node=node,
            check_id=check_id,
            status=status,
            service_id=service_id,
            service_name=service_name,
            create_index=existing.create_index if existing else index,
            modify_index=index,
        )

    def _touch_node(self, node: str, index: int) -> None:
        # A node's own checks appear in every one of its instances' health.
        for service in self._services.values():
            if service.node == node:
                self._service_index[service.name] = index

    # ------------------------------------------------------------------ reads

    def _catalog_services(self) -> tuple[int, Any]:
        tags: dict[str, set[str]] = {}
        for service in self._services.values():
            tags.setdefault(service.name, set()).update(service.tags)
        return self._services_index, {name: sorted(t) for name, t in sorted(tags.items())}

    def _health_service(self, name: str) -> tuple[int, Any]:
        index = self._service_index.get(name, self._services_index)
        entries = []
        for (node_name, _), service in sorted(self._services.items()):
            if service.name != name:
                continue
            node = self._nodes[node_name]
            checks = [
                c
                for c in self._checks.values()
                if c.node == node_name and c.service_id in ("", service.service_id)
            ]
            entries.append(
                {
                    "Node": self._node_json(node),
                    "Service": self._service_json(service),
                    "Checks": [self._check_json(c, service) for c in checks],
                }
            )
        return index, entries

    def _node_json(self, node: _Node) -> dict[str, Any]:
        return {
            "ID": node.node_id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": node.address, "wan": node.address},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": node.create_index,
            "ModifyIndex": node.modify_index,
        }

    @staticmethod
    def _service_json(service: _Service) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Address": service.address,
            "Meta": dict(service.meta),
            "Port": service.port,
            "Weights": {"Passing": service.weights[0], "Warning": service.weights[1]},
            "EnableTagOverride": False,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    @staticmethod
    def _check_json(check: _Check, service: _Service) -> dict[str, Any]:
        own = check.service_id == service.service_id
        return {
            "Node": check.node,
            "CheckID": check.check_id,
            "Name": "Serf Health Status" if check.check_id == "serfHealth" else check.check_id,
            "Status": check.status,
            "Notes": "",
            "Output": "",
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(service.tags) if own else [],
            "Type": "",
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    # ------------------------------------------------------------------ serving

    async def serve(
        self, method: str, path: str, params: Mapping[str, str], token: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one request as the agent would: ``(status, headers, body)``.

        The one entry point of both transports; the request is logged first,
        its status, index and answer time once it is answered. Raises
        :class:`BusyLoopError` instead, failing the test at once, for the
        ``_BUSY_LOOP``-th request at one instant of trio's clock.
        """
        now = trio.current_time()
        at, count = self._instant
        self._instant = (now, count + 1 if at == now else 1)
        if self._instant[1] > _BUSY_LOOP:
            raise BusyLoopError(
                f"{self._instant[1]} requests at one instant of trio time: a client in a busy loop"
            )
        record = RequestRecord(
            method=method, path=path, params=dict(params), token=token, arrived=now
        )
        self._log.append(record)
        headers: dict[str, str] = {}
        if method != "GET":
            status, body = 405, b"method not allowed\n"
        else:
            try:
                status, headers, body = await self._answer(record)
            except _Unavailable as failure:
                status, message = failure.args[0]
                body = f"{message}\n".encode()
        record.status = status
        record.index = int(headers["X-Consul-Index"]) if "X-Consul-Index" in headers else None
        record.answered = trio.current_time()
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return status, headers, body

    async def fetch(self, query: Query, convert: Callable[[str, Any], _T]) -> tuple[str, _T]:
        """The adapter's ``Fetch``, in process: what py-consul would send, return and raise.

        Like py-consul, it sends ``index`` (and with it ``wait``) only when
        the index is not 0, and raises ``consul.ConsulException("<status>
        <body>")`` for an answer that is not a result.
        """
        params = {"index": str(query.index), "wait": query.wait} if query.index else {}
        status, headers, body = await self.serve(
            "GET", f"/v1/{query.endpoint}", params, query.token
        )
        if status != 200:
            raise consul.ConsulException(f"{status} {body.decode()}")
        if "X-Consul-Index" not in headers:
            raise consul.ConsulException(f"Missing index header: {headers}")
        found = headers["X-Consul-Index"]
        return found, convert(found, json.loads(body))

    async def _answer(self, record: RequestRecord) -> tuple[int, dict[str, str], bytes]:
        read: Callable[[], tuple[int, Any]]
        if record.path == "/v1/catalog/services":
            read = self._catalog_services
        elif record.path.startswith("/v1/health/service/") and len(record.path) > 19:
            name = urllib.parse.unquote(record.path[len("/v1/health/service/") :])
            read = lambda: self._health_service(name)  # noqa: E731
        else:
            return 404, {}, b"404 page not found\n"
        try:
            min_index = int(record.params.get("index", "0"))
            if min_index < 0:
                raise ValueError
        except ValueError:
            return 400, {}, b"Invalid index\n"
        try:
            wait = parse_go_duration(record.params["wait"]) if "wait" in record.params else 0.0
        except ValueError:
            return 400, {}, b"Invalid wait time\n"
        wait = min(wait or _DEFAULT_WAIT, _MAX_WAIT)
        jitter = random.uniform(0, wait / 16) if self._jitter else 0.0
        deadline = record.arrived + wait + jitter

        restores = self._restores
        while True:
            self._check_failing()
            index, body = read()
            if (
                min_index == 0
                or index > min_index
                or self._closed
                or self._restores != restores
                or self._zero_index
                or trio.current_time() >= deadline
            ):
                break
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
        answered_index = 0 if self._zero_index else max(index, 1)
        headers = {
            "Content-Type": "application/json",
            "X-Consul-Index": str(answered_index),
            "X-Consul-Knownleader": "true",
            "X-Consul-Lastcontact": "0",
        }
        return 200, headers, json.dumps(body).encode()

    def _check_failing(self) -> None:
        if self._failing is None:
            return
        if self._fail_budget is not None:
            if self._fail_budget <= 0:
                self._failing = None
                return
            self._fail_budget -= 1
        raise _Unavailable(self._failing)

    def _handle(self, handler: _Handler) -> None:
        """Serve one HTTP request; runs in the server's per-connection thread."""
        split = urllib.parse.urlsplit(handler.path)
        params = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        assert self._trio_token is not None
        try:
            status, headers, body = trio.from_thread.run(
                self.serve,
                handler.command,
                split.path,
                params,
                handler.headers.get("X-Consul-Token"),
                trio_token=self._trio_token,
            )
        except (trio.RunFinishedError, trio.Cancelled):
            # The test's run is over (a client abandoned by a cancelled
            # adapter asks late): there is no agent left to answer for.
            handler.close_connection = True
            return
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as Consul's Go server does; every answer has a Content-Length.
    protocol_version = "HTTP/1.1"
    # Go sets TCP_NODELAY on every connection; without it, headers and body
    # written separately meet the client's delayed ACK and each answer stalls
    # for ~40 ms.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self.server.double._handle(self)  # type: ignore[attr-defined]

    do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # The request log is the record; stderr noise would only clutter test output.
        pass


def _node_id(node: str) -> str:
    # Consul's node ids are UUIDs; derive a stable one from the name.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"consul-double:{node}"))
