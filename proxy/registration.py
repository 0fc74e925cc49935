"""The sidecar registers itself in zkgate's ZooKeeper face (mesh onboarding).

A consumer switched onto the mesh sees its own host's sidecar among the providers of a
service (:mod:`dispatcher.faces.mesh.views`): the address the sidecar registered for that
service, as the data (``HOST:PORT``) of the ephemeral znode ``<root>/<host>/<service>``
(``root`` is the Dispatcher's ``[mesh] sidecars``, ``/zkgate/sidecars`` by default; ``host``
is the address the consumers on this host connect from).

:class:`SidecarRegistration` holds one session to the ZooKeeper face through zkgate's own
trio client (:class:`~dispatcher.zk.client.ZooKeeperClient`, opened by
:func:`dispatcher.store_clients.zookeeper_client`: over TLS to the face's ``secure_listen``
with ``RegistrationSettings.tls``, authenticated with DIGEST-MD5 with
``RegistrationSettings.sasl``) and:

* creates the parents (persistent) and each service's ephemeral znode once connected;
* after the session expired (the server dropped the ephemerals with it), creates them again
  on the new session;
* when a node of that path is held by another session (a previous process of this proxy,
  whose session the server has not expired yet), retries with backoff until it is gone:
  the other session's registration is not ours to delete;
* when the face refuses its SASL credentials, logs an error naming the user (never the
  password) and tries again with a new session after a pause of up to a minute: the face's
  users may be fixed meanwhile. A TLS handshake the face refuses (or whose certificate this
  side does not trust) is logged by the client with its reason, and retried;
* when stopped (cancelled), closes its session, which removes the znodes at once.

Nothing in the data path waits for it: the listeners open before, and a face that cannot
be reached only delays the consumers' switch to the sidecar.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import Final

import attrs
import trio

from dispatcher.backoff import Backoff
from dispatcher.store_clients import zookeeper_client
from dispatcher.tls import ClientTls, client_context
from dispatcher.zk.client import (
    Connected,
    ConnectionLost,
    KeeperError,
    SessionEvent,
    ZooKeeperClient,
    split_connect_string,
)
from dispatcher.zk.codec.paths import InvalidPath, join, validate_path
from dispatcher.zk.codec.protocol import CreateMode, Err
from dispatcher.zk.sasl_client import SaslCredentials

__all__ = ["DEFAULT_ROOT", "RegistrationSettings", "SidecarRegistration"]

log = logging.getLogger(__name__)

DEFAULT_ROOT: Final = "/zkgate/sidecars"
"""Where sidecars register unless told otherwise: the Dispatcher's ``[mesh] sidecars``."""
#: Longest pause (seconds) before a new session after the face refused the credentials.
_MAX_REFUSED_PAUSE: Final = 60.0


@attrs.frozen
class RegistrationSettings:
    """Where and as whom to register (``zkgate proxy --register ...``)."""

    #: The ZooKeeper face's connect string (``HOST:PORT[,HOST:PORT...]``).
    zookeeper: str
    #: The address the consumers on this host connect from (the znode's parent's name).
    host: str
    root: str = DEFAULT_ROOT
    session_timeout: float = 10.0
    #: TLS to the face's ``secure_listen`` (``--register-tls-*``); None: plain text.
    tls: ClientTls | None = None
    #: The DIGEST-MD5 user of the session (``--register-sasl-*``); None: no SASL.
    sasl: SaslCredentials | None = None

    def __attrs_post_init__(self) -> None:
        try:
            split_connect_string(self.zookeeper)
        except ValueError as exc:
            raise ValueError(f"--register {self.zookeeper!r}: {exc}") from None
        if not self.host or "/" in self.host:
            raise ValueError(f"the sidecar's host {self.host!r} is not a znode name")
        try:
            validate_path(self.root)
        except InvalidPath as exc:
            raise ValueError(f"the sidecars' root {self.root!r}: {exc}") from None
        if not 1.0 <= self.session_timeout <= 600.0:
            raise ValueError("the registration's session timeout must be 1 to 600 seconds")
        if self.tls is not None:
            if (self.tls.cert is None) != (self.tls.key is None):
                raise ValueError("--register-tls-cert and --register-tls-key go together")
            try:
                client_context(self.tls)
            except (OSError, ssl.SSLError) as exc:
                # Loaded now so that a wrong path stops the start, not the first session.
                raise ValueError(
                    f"--register-tls-*: cannot load the certificate files: {exc}"
                ) from None

    def path(self, service: str) -> str:
        return join(join(self.root, self.host), service)


class SidecarRegistration:
    """Keeps ``addresses`` (service -> ``HOST:PORT``) registered; see the module docstring."""

    def __init__(self, settings: RegistrationSettings, addresses: Mapping[str, str]) -> None:
        for service in addresses:
            if not service or "/" in service:
                raise ValueError(f"service {service!r} cannot be registered: not a znode name")
        self.settings = settings
        self.addresses = dict(addresses)
        #: The services registered on the current session.
        self.registered: set[str] = set()
        self._new_session = trio.Event()
        self._changed = trio.Event()

    async def wait_registered(self) -> None:
        """Until every service is registered (for tests and start-up logs)."""
        while self.registered != set(self.addresses):
            await self._changed.wait()

    def _on_session(self, event: SessionEvent) -> None:
        if isinstance(event, Connected) and not event.resumed:
            # A new session: whatever the old one registered is gone with it.
            self.registered.clear()
            self._new_session.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register until cancelled (started at once); the session closes on the way out."""
        task_status.started()
        refused = Backoff(initial=1.0, maximum=_MAX_REFUSED_PAUSE)
        while True:
            await self._session()
            # Only a refused credential ends a session: the same one would be refused at
            # once again, so the pause is long, and the log says whose it was.
            sasl = self.settings.sasl
            log.error("the ZooKeeper face refused the sidecar's SASL credentials; retrying",
                      extra={"zookeeper": self.settings.zookeeper,
                             "user": None if sasl is None else sasl.username})  # fmt: skip
            await refused.sleep()

    async def _session(self) -> None:
        """Register on one client's sessions; returns when the face refused its credentials."""
        settings = self.settings
        client, self._chroot = zookeeper_client(
            settings.zookeeper, settings.session_timeout, tls=settings.tls, sasl=settings.sasl,
            on_session=self._on_session,
        )  # fmt: skip
        self._new_session = trio.Event()
        self.registered.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_registered, client)
            try:
                await client.run()
            except KeeperError as exc:
                if exc.err != Err.AUTHFAILED:
                    raise
            nursery.cancel_scope.cancel()

    async def _keep_registered(self, client: ZooKeeperClient) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            await self._new_session.wait()
            try:
                await client.wait_connected()
                await self._register_all(client)
            except (ConnectionLost, KeeperError) as exc:
                log.warning("cannot register the sidecar yet; retrying", extra={
                    "zookeeper": self.settings.zookeeper, "error": str(exc),
                })  # fmt: skip
                await backoff.sleep()
                continue
            backoff.reset()
            self._new_session = trio.Event()

    async def _register_all(self, client: ZooKeeperClient) -> None:
        for service, address in self.addresses.items():
            if service in self.registered:
                continue
            path = self._chroot + self.settings.path(service)
            await self._ensure_parents(client, path)
            try:
                await client.create(path, address.encode(), flags=CreateMode.EPHEMERAL)
            except KeeperError as exc:
                if exc.err != Err.NODEEXISTS:
                    raise
                stat = await client.exists(path)
                if stat is None or stat.ephemeral_owner != client.session_id:
                    raise  # another session's registration: wait for it to expire
            self.registered.add(service)
            log.info("sidecar registered", extra={"path": path, "listen": address})
            self._changed.set()
            self._changed = trio.Event()

    @staticmethod
    async def _ensure_parents(client: ZooKeeperClient, path: str) -> None:
        parts = path.split("/")[1:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:depth])
            try:
                await client.create(parent)
            except KeeperError as exc:
                if exc.err != Err.NODEEXISTS:
                    raise
