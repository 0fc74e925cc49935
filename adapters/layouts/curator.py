"""Apache Curator service discovery (``curator-x-discovery``).

Instances live at ``<base>/<name>/<id>``; the data is the ``ServiceInstance``
as Curator's ``JsonInstanceSerializer`` (Jackson) writes it. Curator 5.4
writes exactly these fields, in this order::

    {"name":"orders","id":"5f1c…","address":"10.0.0.7","port":8080,
     "sslPort":null,"payload":null,"registrationTimeUTC":1700000000000,
     "serviceType":"DYNAMIC","uriSpec":{"parts":[{"value":"scheme",
     "variable":true},{"value":"://","variable":false},…]}}

``payload`` is the application's own object with Jackson's class tag
(``{"@class":"java.util.LinkedHashMap","zone":"az1"}``), or null. Newer
ServiceInstances also have an ``enabled`` flag that the default serializer
does not write; when present and false the instance is failing.

Mapping to the model: ``name`` is the service, ``id`` the instance id,
``address``/``port`` the endpoint (``sslPort`` when there is no ``port``),
the payload's scalar entries are metadata, and the protocol is the literal
scheme the uriSpec starts with (``{scheme}`` is ``https`` when an sslPort is
set, else ``http``, as Curator builds it). Fields with no model slot are
kept in metadata under ``curator.*`` keys so that rendering a parsed
instance reproduces the record: ``curator.sslPort``,
``curator.serviceType`` (when not DYNAMIC), ``curator.registrationTimeUTC``
(when not 0), ``curator.uriSpec`` (when it is not the one the protocol
implies) and ``curator.payloadClass`` (the payload's ``@class``, when it is
not :data:`DEFAULT_PAYLOAD_CLASS`).

Not represented: weight, zone and health other than ``failing``-by-
``enabled`` (Curator has no such fields; the renderer never writes
``enabled``, to keep exactly the default serializer's field set).
"""

from __future__ import annotations

import re
from typing import Any, Final

from adapters.layouts import as_int, as_port, as_text, json_bytes, json_object, node_name, node_text
from dispatcher.core.model import Health, Instance, Metadata, Source

__all__ = [
    "DEFAULT_PAYLOAD_CLASS",
    "NAME",
    "directory",
    "parse",
    "render",
    "service_of",
]

NAME: Final = "curator"

DEFAULT_PAYLOAD_CLASS: Final = "java.util.LinkedHashMap"
"""The ``@class`` written for a metadata payload that did not come from Curator.

A consumer whose ``ServiceDiscovery`` payload type is ``Map`` or ``Object``
accepts it; one with its own payload class would fail the cast, which is
why an instance without metadata is rendered with a null payload, which
every consumer accepts.
"""

_SSL_PORT: Final = "curator.sslPort"
_SERVICE_TYPE: Final = "curator.serviceType"
_REGISTERED: Final = "curator.registrationTimeUTC"
_URI_SPEC: Final = "curator.uriSpec"
_PAYLOAD_CLASS: Final = "curator.payloadClass"
_PAYLOAD_TEXT: Final = "curator.payload"
_RESERVED: Final = frozenset(
    {_SSL_PORT, _SERVICE_TYPE, _REGISTERED, _URI_SPEC, _PAYLOAD_CLASS, _PAYLOAD_TEXT}
)
_SERVICE_TYPES: Final = frozenset({"DYNAMIC", "STATIC", "PERMANENT", "DYNAMIC_SEQUENTIAL"})
_DEFAULT_SERVICE_TYPE: Final = "DYNAMIC"
_LEADING_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_TOKENS: Final = re.compile(r"[{}]|[^{}]+")


def directory(service: str) -> str:
    """``<name>``: Curator keeps each service's instances directly under the base path."""
    return service


def service_of(directory: str) -> str | None:
    """The service of a ``<name>`` directory, or None for a nested path."""
    name = directory.strip("/")
    return name if name and "/" not in name else None


def _spec_parts(spec: str) -> list[dict[str, Any]] | None:
    """``spec`` split into Curator's uriSpec parts, as ``new UriSpec(spec)`` does.

    Literal text between braces is one part, a braced name is a variable
    (trimmed); None for unbalanced braces, which Curator rejects.
    """
    parts: list[dict[str, Any]] = []
    inside = False
    for token in _TOKENS.findall(spec):
        if token == "{":
            if inside:
                return None
            inside = True
        elif token == "}":
            if not inside:
                return None
            inside = False
        else:
            parts.append({"value": token.strip() if inside else token, "variable": inside})
    return None if inside else parts


def _spec_text(value: object) -> str | None:
    """A uriSpec object back to its spec string; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("parts"), list):
        return None
    pieces: list[str] = []
    for part in value["parts"]:
        if not isinstance(part, dict) or not isinstance(part.get("value"), str):
            return None
        text = part["value"]
        pieces.append(f"{{{text}}}" if part.get("variable") is True else text)
    return "".join(pieces)


def _canonical_spec(protocol: str) -> str:
    return f"{protocol}://{{address}}:{{port}}"


def _protocol(spec: str | None, has_ssl: bool) -> str:
    if spec is None:
        return ""
    if spec.startswith("{scheme}://"):
        return "https" if has_ssl else "http"
    match = _LEADING_SCHEME.match(spec)
    return match.group(1) if match else ""


def parse(service: str, name: str, data: bytes, *, source: Source | None = None) -> Instance | None:
    """One Curator instance znode as an Instance; None if it is not one.

    ``service`` is the directory's name (used when the JSON lacks ``name``);
    the JSON's ``id`` is the instance id, falling back to the znode
    ``name`` (Curator names the znode after the id).
    """
    record = json_object(data)
    if record is None:
        return None
    address = record.get("address")
    port = as_port(record.get("port"))
    ssl_port = as_port(record.get("sslPort"))
    instance_id = record.get("id")
    if not isinstance(instance_id, str) or not instance_id:
        instance_id = node_text(name) or ""
    json_name = record.get("name")
    service_name = service or (json_name if isinstance(json_name, str) else "")
    # A plain port wins; an instance registered with only its TLS port listens there.
    listen_port = port if port is not None else ssl_port
    if not isinstance(address, str) or listen_port is None:
        return None

    metadata: dict[str, str] = {}
    payload = record.get("payload")
    if isinstance(payload, dict):
        for key, value in payload.items():
            text = as_text(value)
            if key == "@class":
                # The default class is what render writes anyway.
                if text is not None and text != DEFAULT_PAYLOAD_CLASS:
                    metadata[_PAYLOAD_CLASS] = text
            elif text is not None:
                metadata[key] = text
    elif isinstance(payload, str):
        metadata[_PAYLOAD_TEXT] = payload

    if ssl_port is not None:
        metadata[_SSL_PORT] = str(ssl_port)
    service_type = record.get("serviceType")
    if isinstance(service_type, str) and service_type != _DEFAULT_SERVICE_TYPE:
        metadata[_SERVICE_TYPE] = service_type
    registered = as_int(record.get("registrationTimeUTC"))
    if registered:
        metadata[_REGISTERED] = str(registered)
    spec = _spec_text(record.get("uriSpec"))
    protocol = _protocol(spec, ssl_port is not None)
    if spec is not None and spec != _canonical_spec(protocol):
        metadata[_URI_SPEC] = spec

    try:
        return Instance(
            service_name,
            instance_id,
            address,
            listen_port,
            protocol=protocol,
            metadata=metadata,
            health=Health.FAILING if record.get("enabled") is False else Health.UNKNOWN,
            source=source,
        )
    except (TypeError, ValueError):
        return None


def _payload(metadata: Metadata) -> Any:
    if _PAYLOAD_TEXT in metadata:
        return metadata[_PAYLOAD_TEXT]
    # A metadata key "@class" from another registry must not pose as
    # Jackson's type tag.
    entries = {k: v for k, v in metadata.items() if k not in _RESERVED and k != "@class"}
    if not entries and _PAYLOAD_CLASS not in metadata:
        return None
    # Jackson's class tag comes first, as Jackson writes it.
    return {"@class": metadata.get(_PAYLOAD_CLASS, DEFAULT_PAYLOAD_CLASS), **entries}


def render(instance: Instance) -> tuple[str, bytes]:
    """``instance`` as Curator writes it: ``(id, ServiceInstance JSON)``.

    Exactly the default ``JsonInstanceSerializer``'s field set and order,
    compact as Jackson writes it. The znode name is the
    id, as Curator names it, escaped by :func:`~adapters.layouts.node_name`
    where ZooKeeper would refuse it. Without recorded Curator fields the
    instance is ``DYNAMIC``, registered at time 0 (renders are
    deterministic, so an unchanged instance never looks changed), with no
    sslPort and, if it has a protocol, the uriSpec
    ``<protocol>://{address}:{port}``.
    """
    metadata = instance.metadata
    spec = metadata.get(_URI_SPEC)
    if spec is None and instance.protocol:
        spec = _canonical_spec(instance.protocol)
    parts = _spec_parts(spec) if spec is not None else None
    service_type = metadata.get(_SERVICE_TYPE, _DEFAULT_SERVICE_TYPE)
    if service_type not in _SERVICE_TYPES:
        service_type = _DEFAULT_SERVICE_TYPE
    record = {
        "name": instance.service,
        "id": instance.instance_id,
        "address": instance.host,
        "port": instance.port,
        "sslPort": as_port(metadata.get(_SSL_PORT)),
        "payload": _payload(metadata),
        "registrationTimeUTC": as_int(metadata.get(_REGISTERED)) or 0,
        "serviceType": service_type,
        "uriSpec": {"parts": parts} if parts is not None else None,
    }
    return node_name(instance.instance_id), json_bytes(record)
