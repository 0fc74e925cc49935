"""Twitter/Finagle ServerSets (also written by Aurora).

Each member of a server set is an ephemeral sequential znode
``member_<10-digit sequence>`` in the set's directory, holding JSON::

    {"serviceEndpoint":{"host":"10.0.0.5","port":31010},
     "additionalEndpoints":{"http":{"host":"10.0.0.5","port":8080}},
     "status":"ALIVE","shard":0}

Finagle's reader also takes an optional ``"metadata"`` object of strings,
and only reads znodes whose name starts with ``member_``.

Mapping to the model: the service is the set's directory (a server set has
no name of its own), the instance id is the znode name without ``member_``,
the service endpoint is host and port, and status maps to health: ALIVE is
passing, DEAD and STOPPED failing, anything else unknown. Additional
endpoints become metadata ``serverset.endpoint.<name>`` = ``host:port``,
the shard ``serverset.shard``, and the ``metadata`` object's entries plain
metadata.

Not represented: weight, zone, protocol. ``unknown`` health renders as
ALIVE, because Finagle routes only to ALIVE members and an instance nobody
has checked is still one to route to (its registration is its liveness).
"""

from __future__ import annotations

from typing import Any, Final

from adapters.layouts import (
    as_int,
    as_port,
    json_bytes,
    json_object,
    node_name,
    node_text,
    text_map,
)
from dispatcher.core.model import Health, Instance, Source
from dispatcher.wire import join_address, parse_address

__all__ = ["MEMBER_PREFIX", "NAME", "directory", "parse", "render", "service_of"]

NAME: Final = "serverset"

MEMBER_PREFIX: Final = "member_"
_ENDPOINT_PREFIX: Final = "serverset.endpoint."
_SHARD: Final = "serverset.shard"
_HEALTH_BY_STATUS: Final = {
    "ALIVE": Health.PASSING,
    "DEAD": Health.FAILING,
    "STOPPED": Health.FAILING,
}
_STATUS_BY_HEALTH: Final = {
    Health.PASSING: "ALIVE",
    Health.UNKNOWN: "ALIVE",
    Health.FAILING: "DEAD",
}


def directory(service: str) -> str:
    """The set's own path: a server set is identified by where it lives."""
    return service.strip("/")


def service_of(directory: str) -> str | None:
    """The service a set directory holds (its path), or None for the root itself."""
    return directory.strip("/") or None


def _endpoint(value: object) -> tuple[str, int] | None:
    if not isinstance(value, dict):
        return None
    host = value.get("host")
    port = as_port(value.get("port"))
    if not isinstance(host, str) or not host or port is None:
        return None
    return host, port


def _split_host_port(text: str) -> tuple[str, int] | None:
    try:
        return parse_address(text, default_host=None)
    except ValueError:
        return None


def parse(service: str, name: str, data: bytes, *, source: Source | None = None) -> Instance | None:
    """One ``member_*`` znode as an Instance; None for other znodes and garbage."""
    if not name.startswith(MEMBER_PREFIX):
        return None
    instance_id = node_text(name.removeprefix(MEMBER_PREFIX))
    record = json_object(data)
    if record is None or not instance_id:
        return None
    main = _endpoint(record.get("serviceEndpoint"))
    if main is None:
        return None
    host, port = main

    metadata = text_map(record.get("metadata")) or {}
    additional = record.get("additionalEndpoints")
    if isinstance(additional, dict):
        for endpoint_name, value in additional.items():
            endpoint = _endpoint(value)
            if endpoint is not None:
                metadata[_ENDPOINT_PREFIX + endpoint_name] = join_address(*endpoint)
    shard = as_int(record.get("shard"))
    if shard is not None:
        metadata[_SHARD] = str(shard)
    health = _HEALTH_BY_STATUS.get(str(record.get("status")), Health.UNKNOWN)

    try:
        return Instance(
            service, instance_id, host, port, metadata=metadata, health=health, source=source
        )
    except (TypeError, ValueError):
        return None


def render(instance: Instance) -> tuple[str, bytes]:
    """``instance`` as a server set member: ``(member_<id>, JSON)``.

    Field order follows what Twitter's and Aurora's writers produce;
    ``shard`` and ``metadata`` are written only when there is one.
    """
    additional: dict[str, dict[str, Any]] = {}
    plain: dict[str, str] = {}
    shard: int | None = None
    for key, value in instance.metadata.items():
        if key.startswith(_ENDPOINT_PREFIX):
            endpoint = _split_host_port(value)
            if endpoint is not None:
                additional[key.removeprefix(_ENDPOINT_PREFIX)] = {
                    "host": endpoint[0],
                    "port": endpoint[1],
                }
                continue
        elif key == _SHARD:
            shard = as_int(value)
            if shard is not None:
                continue
        plain[key] = value

    record: dict[str, Any] = {
        "serviceEndpoint": {"host": instance.host, "port": instance.port},
        "additionalEndpoints": additional,
        "status": _STATUS_BY_HEALTH[instance.health],
    }
    if shard is not None:
        record["shard"] = shard
    if plain:
        record["metadata"] = plain
    return MEMBER_PREFIX + node_name(instance.instance_id), json_bytes(record)
