"""Who the live Dispatchers are, and which services exist: kept in an existing distributed store.

Dispatcher shards register themselves in a store that already solves liveness and agreement
(ZooKeeper's ephemeral znodes, etcd's leases), never in a consensus of our own. Everyone who
needs the shard map (every Dispatcher and every Meta Server) reads the same things from that
store and feeds members and catalog to :func:`dispatcher.sharding.assignment.assign`, so they all
compute the same owner for every service without talking to each other:

* **members**: one record per live Dispatcher: its id, capacity weight, and the addresses of its
  subscription port and its ZooKeeper face;
* **the catalog**: the set of service names to assign. Bounded loads make the owner of one
  service depend on the whole set, so the set must be one shared fact, not each party's own
  idea of which services exist;
* **the epoch**: a number that only grows, and is the same for everyone who saw the same
  state of the store (so a proxy can tell an older answer from a newer one, and two Meta Servers
  answer with the same epoch); and the **inputs epoch**, the epoch of the last change of the
  members or the catalog (what the assignment depends on), equally the same for everyone;
* **warm markers**: each Dispatcher publishes the inputs epoch for which it has loaded every
  service assigned to it. The handover rule in :mod:`dispatcher.sharding.ownership` waits for
  it ("the
  new owner loads and warms a service before the old one drops it"). A marker names an inputs
  epoch, not the reader's own view of things, so a marker left from an earlier membership can
  never pass for a current one, and two readers who skipped different views still agree on
  whether it covers the current assignment.

Publishing a warm marker is an epoch change on purpose: it is the moment a handover completes,
when the old owner's and the new owner's answers change (the Dispatcher's ownership protocol
promises that the epoch grows whenever an answer may change). The assignment itself depends
only on members and catalog, so such an epoch moves no service.

Layout in the store (``root`` defaults to ``/zkgate``)::

    ZooKeeper                                    etcd (keys)
    <root>/members/<id>   ephemeral, JSON        <root>/members/<id>   bound to the member's lease
    <root>/services/<q>   persistent, empty      <root>/services/<q>   no lease, empty value
    <root>/warm/<id>      ephemeral, "<inputs>"  <root>/warm/<id>      bound to the lease
                                                 <root>/epoch          departures (see below)

A member record is ``{"subscribe_address": ..., "zookeeper_address": ..., "weight": ...}``
and never changes while its ZooKeeper session or etcd lease lives (re-registering with other
addresses is a leave and a join). ``<q>`` is the service name percent-encoded
(:func:`quote_service`), since a znode name cannot hold ``/``; etcd uses the same encoding
so that both stores hold the same catalog text.

The catalog only grows: any Dispatcher may add names (:meth:`MembershipStore.add_services`,
used when a subscriber asks a Dispatcher for a service nobody has cataloged, and for the
``[sharding] services`` seed list); only an operator removes them, by deleting the node or key.

The epoch (the inputs epoch is the same without the warm markers' part):

* ZooKeeper: the largest pzxid of ``<root>/members``, ``<root>/services`` and ``<root>/warm``.
  ZooKeeper stores the pzxid with the parent and updates it on every child creation and
  deletion, including the deletion of an ephemeral when its session expires, so every reader
  of the same state reads the same number, and it survives a restart of the ensemble. A warm
  marker is therefore rewritten as a delete and a create in one ``multi``, never a setData.
* etcd: ``max(create_revision of every member and catalog key, mod_revision of every warm
  marker and of <root>/epoch)``. A lease expiry deletes keys and leaves no trace in the key
  space, so a reader who starts after a departure could not tell it happened; every party that
  sees a member, catalog or warm key deleted (at revision D) therefore *stamps* it with one
  transaction, ``if mod_revision(<root>/epoch) < D: put <root>/epoch``, which only the first
  of them wins. Readers hold a view with an unstamped deletion back until the stamp arrives
  (``stamp_grace`` at most, for a store nobody can write to), so the new membership is only
  ever published with the new epoch. A graceful leave deletes its keys and stamps in the same
  transaction. The epoch is a function of the key space alone, so compaction of etcd's history
  does not disturb it. One window remains: a reader that *starts* between a lease expiry and
  its stamp (a few milliseconds) publishes the smaller membership under the old epoch once,
  until the stamp arrives.
* memory: a counter bumped on every change.

Modules: this one holds the ``[membership]`` table and :func:`open_membership`, and re-exports
the values (:mod:`~dispatcher.sharding.membership_core`) and the three backends, one module each:
:mod:`~dispatcher.sharding.membership_zookeeper` (zkgate's own trio ZooKeeper client: one
ZooKeeper stack in the process, no threads), :mod:`~dispatcher.sharding.membership_etcd`
(python-etcd3, blocking, so its calls run in trio worker threads whose callbacks only hand a
note to the trio task) and :mod:`~dispatcher.sharding.membership_memory`. A backend keeps all
its state in its own trio task and touches no other backend's. Views are published through
:class:`ViewFeed`, which keeps only the latest: a slow reader skips intermediate views and
memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError, reject_unknown
from dispatcher.sharding.membership_core import (
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    MembershipStore,
    Registration,
    View,
    ViewFeed,
    owner_endpoints,
    quote_service,
    unquote_service,
)
from dispatcher.sharding.membership_etcd import EtcdMembership
from dispatcher.sharding.membership_memory import MemoryMembership, MemoryStore
from dispatcher.sharding.membership_zookeeper import ZooKeeperMembership
from dispatcher.tls import ClientTls, parse_client_tls
from dispatcher.zk.client import split_connect_string
from dispatcher.zk.sasl_client import SaslCredentials, load_credentials

__all__ = [
    "DEFAULT_ROOT",
    "KINDS",
    "EtcdMembership",
    "MembershipConfig",
    "MembershipConfigError",
    "MembershipStore",
    "MemoryMembership",
    "MemoryStore",
    "Registration",
    "View",
    "ViewFeed",
    "ZooKeeperMembership",
    "open_membership",
    "owner_endpoints",
    "quote_service",
    "unquote_service",
]

KINDS: Final = ("zookeeper", "etcd", "memory")


class MembershipConfigError(ValueError):
    """A ``[membership]`` value is wrong; the message names the key."""


@attrs.frozen
class MembershipConfig:
    """The ``[membership]`` table, shared by ``zkgate serve`` and ``zkgate meta``::

        [membership]
        kind = "zookeeper"            # zookeeper | etcd | memory
        address = "127.0.0.1:2181"    # ZooKeeper connect string, or etcd host:port
        root = "/zkgate"              # znode root / etcd key prefix
        session_timeout = 10.0        # ZooKeeper session timeout / etcd lease TTL, seconds
        stamp_grace = 2.0             # etcd: longest wait for a departure's stamp
        tls = { ca = "ca.pem", cert = "client.pem", key = "client-key.pem" }
        sasl_username = "zkgate"      # ZooKeeper: DIGEST-MD5 as this user, with
        sasl_password_file = "zk.pass"  # the password in this file (both or neither)

    ``tls`` (zookeeper and etcd) speaks TLS to the store: ``ca`` verifies its certificate
    (the system's CAs without it), ``cert``/``key`` is the client certificate that a
    ZooKeeper ``ssl.clientAuth=need`` or an etcd ``--client-cert-auth`` asks for,
    ``server_name`` the name checked against the store's certificate (the host dialled
    otherwise). Relative paths are relative to the configuration file's directory.

    A Dispatcher that dies without leaving loses its services after ``session_timeout`` (plus,
    for etcd, up to half a second of lease-expiry granularity).
    """

    kind: str
    address: str = ""
    root: str = DEFAULT_ROOT
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    stamp_grace: float = 2.0
    #: TLS to the store; None: plain text.
    tls: ClientTls | None = None
    #: ZooKeeper only: the DIGEST-MD5 user every session authenticates as; None: no SASL.
    sasl: SaslCredentials | None = None

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any], where: str = "membership", base_dir: Path | None = None
    ) -> MembershipConfig:
        """Check the table; raises :class:`MembershipConfigError` naming the bad key. The
        SASL password file is read now, so a missing one stops the start."""
        known = ("kind", "address", "root", "session_timeout", "stamp_grace", "tls",
                 *_SASL_KEYS)  # fmt: skip
        reject_unknown(table, known, where, MembershipConfigError)
        kind = table.get("kind")
        if kind not in KINDS:
            raise MembershipConfigError(
                f"{where}.kind: must be one of {', '.join(map(repr, KINDS))}, not {kind!r}"
            )
        address = table.get("address", "")
        if not isinstance(address, str):
            raise MembershipConfigError(f"{where}.address: must be a string")
        if kind != "memory" and not address:
            raise MembershipConfigError(f"{where}.address: required for kind {kind!r}")
        try:
            if kind == "etcd":
                _split_host_port(address)
            elif kind == "zookeeper":
                split_connect_string(address)
        except ValueError as exc:
            raise MembershipConfigError(f"{where}.address: {exc}") from None
        root = table.get("root", DEFAULT_ROOT)
        if (
            not isinstance(root, str)
            or not root.startswith("/")
            or root.endswith("/")
            or "//" in root
        ):
            raise MembershipConfigError(
                f"{where}.root: must be an absolute path without a trailing '/', not {root!r}"
            )
        timeouts: dict[str, float] = {}
        for key, default in (("session_timeout", DEFAULT_SESSION_TIMEOUT), ("stamp_grace", 2.0)):
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MembershipConfigError(f"{where}.{key}: must be a number of seconds")
            if not (math.isfinite(value) and value > 0):
                raise MembershipConfigError(f"{where}.{key}: must be > 0")
            timeouts[key] = float(value)
        tls = None
        if "tls" in table:
            if kind == "memory":
                raise MembershipConfigError(f"{where}.tls: kind 'memory' has no connection")
            try:
                tls = parse_client_tls(table["tls"], f"{where}.tls", base_dir)
            except ConfigError as exc:
                raise MembershipConfigError(str(exc)) from None
        sasl = _parse_sasl(table, kind, where, base_dir)
        return cls(
            kind, address, root, timeouts["session_timeout"], timeouts["stamp_grace"], tls, sasl
        )

    def to_mapping(self) -> dict[str, Any]:
        """The ``[membership]`` table as TOML would give it (never the SASL password)."""
        result: dict[str, Any] = {
            "kind": self.kind, "address": self.address, "root": self.root,
            "session_timeout": self.session_timeout, "stamp_grace": self.stamp_grace,
        }  # fmt: skip
        if self.tls is not None:
            result["tls"] = self.tls.to_mapping()
        if self.sasl is not None:
            result.update(self.sasl.to_mapping())
        return result


_SASL_KEYS: Final = ("sasl_username", "sasl_password_file")


def _parse_sasl(
    table: Mapping[str, Any], kind: str, where: str, base_dir: Path | None
) -> SaslCredentials | None:
    given = [key for key in _SASL_KEYS if key in table]
    if not given:
        return None
    if kind != "zookeeper":
        raise MembershipConfigError(
            f"{where}.{given[0]}: SASL is for kind 'zookeeper' only, not {kind!r}"
        )
    if len(given) == 1:
        other = _SASL_KEYS[1] if given[0] == _SASL_KEYS[0] else _SASL_KEYS[0]
        raise MembershipConfigError(f"{where}.{given[0]}: needs {other} too")
    try:
        username = settings.string(table["sasl_username"], f"{where}.sasl_username")
        path = settings.user_path(table["sasl_password_file"], f"{where}.sasl_password_file")
    except ConfigError as exc:
        raise MembershipConfigError(str(exc)) from None
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return load_credentials(username, path)
    except ValueError as exc:
        raise MembershipConfigError(f"{where}.sasl_password_file: {exc}") from None


def _split_host_port(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, not {address!r}")
    return host, int(port)


def open_membership(
    config: MembershipConfig, *, memory: MemoryStore | None = None, watch_warm: bool = True
) -> MembershipStore:
    """A backend for ``config``. ``memory`` is the shared in-process store for kind memory (a
    fresh one if None). ``watch_warm=False`` skips reading the warm markers' values (Meta
    Servers do not need them; on ZooKeeper the warm directory is still read for the epoch)."""
    if config.kind == "zookeeper":
        return ZooKeeperMembership(
            config.address,
            config.root,
            config.session_timeout,
            watch_warm=watch_warm,
            tls=config.tls,
            sasl=config.sasl,
        )
    if config.kind == "etcd":
        host, port = _split_host_port(config.address)
        return EtcdMembership(
            host,
            port,
            config.root,
            config.session_timeout,
            stamp_grace=config.stamp_grace,
            tls=config.tls,
        )
    return MemoryMembership(memory if memory is not None else MemoryStore())
