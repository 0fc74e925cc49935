"""One ADS stream's protocol state, without I/O: State-of-the-World and Delta.

The gRPC side hands each request's bytes to :meth:`AdsStream.receive` and,
whenever ``on_ready`` has been called, asks :meth:`AdsStream.next_response`
for bytes to write until it answers None. Responses are built when asked
for, from the cache's current resources, so a stream that is slow to take
them never queues more than one pending response per type: a change that
arrives meanwhile is folded into the one response still to be built (the
same collapse as the hub's dirty marking).

Per type URL a stream keeps the names subscribed (or a wildcard, for
clusters and listeners), the versions of what it last sent, and that
response's nonce. The protocol rules followed (the xDS REST and gRPC
protocol, as go-control-plane's ``sotw`` and ``delta`` servers apply them):

* A request whose ``response_nonce`` is the type's last nonce is an ACK, or
  a NACK when ``error_detail`` is set. A NACK keeps the last ACKed version,
  is counted and logged once per nonce, and nothing is re-sent because of
  it: the next response for that type goes out only when its content (or
  the subscription) changes, so a client never receives the same rejected
  content in a loop.
* A nonce this stream sent earlier is stale. In SotW the whole request is
  ignored (the client sends a current one; the latest request always carries
  the full name list). In Delta its subscribe/unsubscribe still apply, since
  they are increments that would otherwise be lost, but it ACKs nothing.
* A numeric nonce above every nonce this stream has sent is from the
  future: INVALID_ARGUMENT. A nonce on the first request for a type is
  ignored (a client resuming after a server restart may send its old one).
* SotW Cluster and Listener responses list every resource the client holds;
  a resource left out is removed. Delta lists changed resources and names
  removed ones in ``removed_resources``, including subscribed names that do
  not exist (the client's "does not exist" answer).
* A type URL this server does not serve (``type.googleapis.com/...``) gets
  one empty answer per request that carries no nonce (its ACK is not
  answered again); an empty or malformed type URL is INVALID_ARGUMENT.
* Bounds: names over all types (and outbound ports asked in node
  metadata) at most ``max_names`` (RESOURCE_EXHAUSTED), at most a few
  unanswered unknown types.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Final

import attrs
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message

from dispatcher.faces.xds.cache import ResourceCache
from dispatcher.faces.xds.config import XdsLimits
from dispatcher.faces.xds.metrics import XdsMetrics
from dispatcher.faces.xds.resources import (
    APPLICATION_KEY,
    CLUSTER,
    KNOWN_TYPES,
    LISTENER,
    Resource,
    length_delimited,
    outbound_ports,
)

__all__ = ["AdsStream", "DeltaStream", "Refusal", "SotwStream", "StreamError"]

_log = logging.getLogger(__name__)

_TYPE_PREFIX: Final = "type.googleapis.com/"
_MAX_TYPE_URL: Final = 256
_MAX_UNKNOWN_PENDING: Final = 8
_MAX_LOGGED_DETAIL: Final = 200
_WILDCARD: Final = "*"
_WILDCARD_TYPES: Final = frozenset((CLUSTER, LISTENER))
#: Services the test-only fault hook may hold at once.
_MAX_SKIPPING: Final = 64

# DiscoveryResponse and DeltaDiscoveryResponse field numbers (resources are
# pre-framed by resources.Resource).
_SOTW_VERSION: Final = 1
_SOTW_TYPE_URL: Final = 4
_SOTW_NONCE: Final = 5
_DELTA_TYPE_URL: Final = 4
_DELTA_NONCE: Final = 5
_DELTA_REMOVED: Final = 6
# Framing every response repeats, made once: the known type URLs as field 4 (in
# both messages), and the tags of the version and nonce fields, whose values
# are decimal counters and so always shorter than 128 bytes, a one-byte length.
_TYPE_URL_FIELDS: Final = MappingProxyType(
    {type_url: length_delimited(_SOTW_TYPE_URL, type_url.encode()) for type_url in KNOWN_TYPES}
)
_SOTW_VERSION_TAG: Final = bytes((_SOTW_VERSION << 3 | 2,))
_SOTW_NONCE_TAG: Final = bytes((_SOTW_NONCE << 3 | 2,))
_DELTA_NONCE_TAG: Final = bytes((_DELTA_NONCE << 3 | 2,))


class Refusal(enum.Enum):
    """The gRPC status a refused stream ends with (named as in ``grpc.StatusCode``)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class StreamError(Exception):
    """The stream must end with ``refusal`` and ``message`` (sent to the client)."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message


@attrs.define(slots=True)
class _TypeState:
    """One type URL on one stream."""

    names: set[str] = attrs.field(factory=set)
    wildcard: bool = False
    answered: bool = False
    # True when the next look must send even if nothing changed (a first
    # request, or a subscription change the client waits to hear about).
    force: bool = False
    dirty: bool = False
    nonce: str = ""
    version_info: str = ""
    acked: str = ""
    nack_logged: str = ""
    # What the client holds as far as this stream knows: name -> version, and
    # for Delta, None for "told it does not exist".
    sent: dict[str, str | None] = attrs.field(factory=dict)
    # What the client holds by its last ACK (``sent`` when it ACKed): name -> version.
    acked_sent: dict[str, str | None] = attrs.field(factory=dict)


class AdsStream:
    """What SotW and Delta streams share; see the module docstring."""

    variant: str = ""

    def __init__(
        self,
        cache: ResourceCache,
        limits: XdsLimits,
        metrics: XdsMetrics,
        on_ready: Callable[[], None],
        peer: str = "",
    ) -> None:
        self._cache = cache
        self._limits = limits
        self._metrics = metrics
        self._on_ready = on_ready
        self.peer = peer
        self._types: dict[str, _TypeState] = {}
        self._unknown: collections.deque[str] = collections.deque()
        self._nonces = 0
        self._versions = 0
        self._node_seen = False
        self.node_id = ""
        #: The consumer application the node's metadata names ('' if none): whose policies
        #: apply to it.
        self.application = ""
        self._outbound_address = ""
        self._outbound: dict[str, int] = {}
        self._watched: set[str] = set()
        self._watching_all = False
        self._closed = False
        #: Test-only fault: services whose next change this stream ignores (bounded).
        self._skipping: set[str] = set()

    # ------------------------------------------------------------ public

    def receive(self, raw: bytes) -> None:
        """Handle one request's bytes; raises :class:`StreamError` to end the stream."""
        if self._closed:
            return
        self._metrics.requests += 1
        try:
            self._receive(raw)
        except StreamError:
            self._metrics.bad_requests += 1
            raise

    def next_response(self) -> bytes | None:
        """The next response to write, built now from the current resources; None if none."""
        if self._closed:
            return None
        for type_url in KNOWN_TYPES:
            state = self._types.get(type_url)
            if state is None or not (state.dirty or state.force):
                continue
            encoded = self._build(type_url, state)
            state.dirty = state.force = False
            if encoded is not None:
                state.answered = True
                self._metrics.pushes += 1
                self._metrics.bytes_pushed += len(encoded)
                return encoded
        if self._unknown:
            encoded = self._empty(self._unknown.popleft(), self._next_nonce())
            self._metrics.pushes += 1
            self._metrics.bytes_pushed += len(encoded)
            return encoded
        return None

    def close(self) -> None:
        """Drop every watch; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cache.unwatch(self, self._watched)
        self._watched = set()
        if self._watching_all:
            self._cache.unwatch_all(self)
            self._watching_all = False

    def service_changed(self, service: str) -> None:
        """The cache's signal: mark every type whose content may involve ``service``."""
        if service in self._skipping:
            self._skipping.discard(service)
            return
        marked = False
        for type_url, state in self._types.items():
            if (
                service in state.names
                or (state.wildcard and type_url == CLUSTER)
                or (state.wildcard and type_url == LISTENER and service in self._outbound)
            ):
                state.dirty = True
                marked = True
        if marked:
            self._on_ready()

    def acked_version(self, type_url: str) -> str:
        """The last version the client accepted for ``type_url`` ('' before any ACK)."""
        state = self._types.get(type_url)
        return state.acked if state is not None else ""

    def acked_resources(self, type_url: str) -> dict[str, str]:
        """The resources of ``type_url`` the client holds by its last ACK: name ->
        version (empty before any ACK). For inspection."""
        state = self._types.get(type_url)
        if state is None:
            return {}
        return {name: v for name, v in state.acked_sent.items() if v is not None}

    def current_resources(self, type_url: str) -> dict[str, str] | None:
        """The resources of ``type_url`` this stream should hold now (name ->
        version), from the cache; None when the type was never answered."""
        state = self._types.get(type_url)
        if state is None or not state.answered or self._closed:
            return None
        return {name: r.version for name, r in self._desired(type_url, state).items()}

    def rejected(self, type_url: str) -> bool:
        """Whether the client NACKed the last response of ``type_url``."""
        state = self._types.get(type_url)
        return state is not None and bool(state.nonce) and state.nack_logged == state.nonce

    def resend(self, type_urls: Iterable[str]) -> None:
        """Send ``type_urls`` again from the cache's current resources, even
        where this stream thinks the client has them (inspection's repair)."""
        marked = False
        for type_url in type_urls:
            state = self._types.get(type_url)
            if state is not None and state.answered and not self._closed:
                # Forgotten, so that a Delta response carries every resource again.
                state.sent = {}
                state.force = True
                marked = True
        if marked:
            self._on_ready()

    def skip_next_change(self, service: str) -> None:
        """Test-only fault: ignore the cache's next signal for ``service``, so the
        client keeps (and has ACKed) an old version, as a lost push would leave it."""
        if len(self._skipping) < _MAX_SKIPPING:
            self._skipping.add(service)

    # ------------------------------------------------------- subclass API

    def _receive(self, raw: bytes) -> None:
        raise NotImplementedError

    def _build(self, type_url: str, state: _TypeState) -> bytes | None:
        raise NotImplementedError

    def _empty(self, type_url: str, nonce: str) -> bytes:
        raise NotImplementedError

    # ----------------------------------------------------------- helpers

    @staticmethod
    def _decode(parse: Callable[[bytes], message.Message], raw: bytes) -> message.Message:
        try:
            return parse(raw)
        except (message.DecodeError, ValueError, RuntimeError) as exc:
            raise StreamError(Refusal.INVALID_ARGUMENT, f"undecodable request: {exc}") from None

    def _check_type(self, type_url: str) -> bool:
        """True when ``type_url`` is served; False for a well-formed unknown one."""
        if type_url in KNOWN_TYPES:
            return True
        if (
            not type_url.startswith(_TYPE_PREFIX)
            or len(type_url) > _MAX_TYPE_URL
            or len(type_url) == len(_TYPE_PREFIX)
        ):
            raise StreamError(
                Refusal.INVALID_ARGUMENT,
                f"type_url must be type.googleapis.com/<message>, got {type_url[:80]!r}",
            )
        return False

    def _unknown_type(self, type_url: str, nonce: str) -> None:
        # Answering an ACK of the empty answer would ping-pong forever.
        if nonce:
            return
        if len(self._unknown) >= _MAX_UNKNOWN_PENDING:
            raise StreamError(Refusal.RESOURCE_EXHAUSTED, "too many unanswered unknown types")
        self._unknown.append(type_url)
        self._on_ready()

    def _check_names(self, count: int) -> None:
        if count > self._limits.max_names:
            raise StreamError(
                Refusal.RESOURCE_EXHAUSTED,
                f"{count} resource names on one stream, at most {self._limits.max_names}",
            )

    def _total_names(self) -> int:
        return sum(len(state.names) for state in self._types.values())

    def _node(self, node: base_pb2.Node) -> None:
        if self._node_seen:
            return
        self._node_seen = True
        self.node_id = node.id[:256]
        named = node.metadata.fields.get(APPLICATION_KEY)
        if named is not None:
            if named.WhichOneof("kind") != "string_value" or len(named.string_value) > 512:
                raise StreamError(
                    Refusal.INVALID_ARGUMENT,
                    f"node metadata {APPLICATION_KEY}: expected an application name "
                    "(a string of at most 512 characters)",
                )
            self.application = named.string_value
        try:
            self._outbound_address, self._outbound = outbound_ports(
                node.metadata, self._limits.max_names
            )
        except ValueError as exc:
            raise StreamError(Refusal.INVALID_ARGUMENT, str(exc)) from None

    def _future(self, nonce: str) -> bool:
        return nonce.isdigit() and len(nonce) < 20 and int(nonce) > self._nonces

    def _next_nonce(self) -> str:
        self._nonces += 1
        return str(self._nonces)

    def _ack_or_nack(self, type_url: str, state: _TypeState, version: str, error: str) -> None:
        if not error:
            state.acked = version
            state.acked_sent = dict(state.sent)
            self._metrics.acks += 1
            return
        if state.nack_logged == state.nonce:
            return
        state.nack_logged = state.nonce
        self._metrics.nacks += 1
        _log.warning(
            "xds: %s rejected %s version %s (keeping %s): %s",
            self.node_id or self.peer or "a client",
            type_url.rpartition(".")[2],
            state.version_info,
            state.acked or "none",
            error[:_MAX_LOGGED_DETAIL],
        )

    def _update_watches(self) -> None:
        wanted: set[str] = set()
        everything = False
        for type_url, state in self._types.items():
            wanted |= state.names
            if state.wildcard and type_url == CLUSTER:
                everything = True
            if state.wildcard and type_url == LISTENER:
                wanted |= self._outbound.keys()
        wanted.discard(_WILDCARD)
        added, gone = wanted - self._watched, self._watched - wanted
        self._watched = wanted
        # Watch the new ones before dropping the old ones, so a service that
        # moves between types keeps its hub subscription.
        self._cache.watch(self, added)
        if everything and not self._watching_all:
            self._cache.watch_all(self)
        self._watching_all, was_all = everything, self._watching_all
        if was_all and not everything:
            self._cache.unwatch_all(self)
        self._cache.unwatch(self, gone)

    def _desired(self, type_url: str, state: _TypeState) -> dict[str, Resource]:
        """Every resource of ``type_url`` this stream should hold now, by name."""
        cache = self._cache
        out: dict[str, Resource] = {}
        if state.wildcard and type_url == CLUSTER:
            for service in cache.services():
                held = cache.get(service, self.application)
                if held is not None:
                    out[service] = held.cluster
        if state.wildcard and type_url == LISTENER:
            for service, port in sorted(self._outbound.items()):
                if cache.get(service) is not None:
                    listener = cache.outbound(
                        service, self._outbound_address, port, self.application
                    )
                    out[listener.name] = listener
        for name in state.names:
            held = cache.get(name, self.application)
            if held is not None:
                resource = held.get(type_url)
                if resource is not None:
                    out[name] = resource
        return out


class SotwStream(AdsStream):
    """``StreamAggregatedResources``: every response is the whole state of its type."""

    variant = "sotw"

    def _receive(self, raw: bytes) -> None:
        request = self._decode(discovery_pb2.DiscoveryRequest.FromString, raw)
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        if request.HasField("node"):
            self._node(request.node)
        type_url = request.type_url
        if not type_url:
            raise StreamError(Refusal.INVALID_ARGUMENT, "type_url is required on an ADS stream")
        self._check_names(len(request.resource_names))
        nonce = request.response_nonce
        if not self._check_type(type_url):
            self._unknown_type(type_url, nonce)
            return
        state = self._types.get(type_url)
        if state is not None and state.answered and nonce:
            if nonce != state.nonce:
                if self._future(nonce):
                    raise StreamError(Refusal.INVALID_ARGUMENT, f"nonce {nonce} was never sent")
                self._metrics.stale_nonces += 1
                return
            # HasField first: reading error_detail builds a message even when absent.
            error = (
                (request.error_detail.message or "rejected")
                if request.HasField("error_detail")
                else ""
            )
            self._ack_or_nack(type_url, state, request.version_info, error)
        names = set(request.resource_names)
        wildcard = _WILDCARD in names or (
            not names
            and type_url in _WILDCARD_TYPES
            and (state is None or not state.answered or state.wildcard)
        )
        names.discard(_WILDCARD)
        if state is None:
            state = self._types[type_url] = _TypeState(force=True)
        elif not state.answered:
            state.force = True
        elif names == state.names and wildcard == state.wildcard:
            # An ACK: the usual request, and one per stream per push; the
            # subscription, and so the watches and the name count, stand.
            if state.force:
                self._on_ready()
            return
        if names != state.names or wildcard != state.wildcard:
            state.force = True
        previous = state.names
        state.names, state.wildcard = names, wildcard
        try:
            self._check_names(self._total_names())
        except StreamError:
            state.names = previous
            raise
        self._update_watches()
        if state.force:
            self._on_ready()

    def _build(self, type_url: str, state: _TypeState) -> bytes | None:
        desired = self._desired(type_url, state)
        versions: dict[str, str | None] = {name: r.version for name, r in desired.items()}
        if not state.force and versions == state.sent:
            return None
        state.sent = versions
        self._versions += 1
        state.version_info = str(self._versions)
        state.nonce = self._next_nonce()
        version, nonce = state.version_info.encode(), state.nonce.encode()
        return b"".join(
            (
                _SOTW_VERSION_TAG,
                bytes((len(version),)),
                version,
                *(desired[name].sotw for name in sorted(desired)),
                _TYPE_URL_FIELDS[type_url],
                _SOTW_NONCE_TAG,
                bytes((len(nonce),)),
                nonce,
            )
        )

    def _empty(self, type_url: str, nonce: str) -> bytes:
        return length_delimited(_SOTW_TYPE_URL, type_url.encode()) + length_delimited(
            _SOTW_NONCE, nonce.encode()
        )


class DeltaStream(AdsStream):
    """``DeltaAggregatedResources``: responses carry what changed and what was removed."""

    variant = "delta"

    def _receive(self, raw: bytes) -> None:
        request = self._decode(discovery_pb2.DeltaDiscoveryRequest.FromString, raw)
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
        if request.HasField("node"):
            self._node(request.node)
        type_url = request.type_url
        if not type_url:
            raise StreamError(Refusal.INVALID_ARGUMENT, "type_url is required on an ADS stream")
        subscribe = request.resource_names_subscribe
        unsubscribe = request.resource_names_unsubscribe
        self._check_names(len(subscribe) + len(request.initial_resource_versions))
        nonce = request.response_nonce
        if not self._check_type(type_url):
            self._unknown_type(type_url, nonce)
            return
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = _TypeState(force=True)
            state.wildcard = not subscribe and type_url in _WILDCARD_TYPES
            state.sent = dict(request.initial_resource_versions.items())
        elif state.answered and nonce:
            if nonce == state.nonce:
                error = (
                    (request.error_detail.message or "rejected")
                    if request.HasField("error_detail")
                    else ""
                )
                self._ack_or_nack(type_url, state, state.version_info, error)
            elif self._future(nonce):
                raise StreamError(Refusal.INVALID_ARGUMENT, f"nonce {nonce} was never sent")
            else:
                self._metrics.stale_nonces += 1
        for name in unsubscribe:
            if name == _WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
                state.sent.pop(name, None)
        for name in subscribe:
            if name == _WILDCARD:
                state.wildcard = True
            else:
                state.names.add(name)
        if subscribe:
            state.force = True
        self._check_names(self._total_names())
        self._update_watches()
        if state.force:
            self._on_ready()

    def _build(self, type_url: str, state: _TypeState) -> bytes | None:
        desired = self._desired(type_url, state)
        sent = state.sent
        changed = [r for name, r in sorted(desired.items()) if sent.get(name) != r.version]
        removed: list[str] = []
        for name in [n for n, version in sent.items() if version is not None]:
            if name not in desired:
                removed.append(name)
                if name in state.names:
                    sent[name] = None
                else:
                    del sent[name]
        for name in sorted(state.names):
            if name not in desired and name not in sent:
                # Subscribed but nonexistent: say so, once.
                removed.append(name)
                sent[name] = None
        if not changed and not removed and not state.force:
            return None
        for resource in changed:
            sent[resource.name] = resource.version
        self._versions += 1
        state.version_info = str(self._versions)
        state.nonce = self._next_nonce()
        nonce = state.nonce.encode()
        return b"".join(
            (
                *(resource.delta for resource in changed),
                _TYPE_URL_FIELDS[type_url],
                *(length_delimited(_DELTA_REMOVED, name.encode()) for name in removed),
                _DELTA_NONCE_TAG,
                bytes((len(nonce),)),
                nonce,
            )
        )

    def _empty(self, type_url: str, nonce: str) -> bytes:
        return length_delimited(_DELTA_TYPE_URL, type_url.encode()) + length_delimited(
            _DELTA_NONCE, nonce.encode()
        )
