"""zkgate's plain JSON layout, for clients that read ZooKeeper by hand.

``<service>/<instance id>`` holds::

    {"host":"10.0.0.9","port":8080,"weight":100,"zone":"az1",
     "metadata":{"version":"1.4.2"}}

It is the simplest thing a shell script or a small SDK can list and parse.
Missing ``weight`` means 100, missing ``zone`` none, missing ``metadata``
empty; non-string metadata scalars are read as their JSON text.

Not represented: protocol and health (a znode that exists is an instance to
use; failing instances are for the projection to leave out).
"""

from __future__ import annotations

from typing import Final

from adapters.layouts import (
    as_int,
    as_port,
    json_bytes,
    json_object,
    node_name,
    node_text,
    text_map,
)
from dispatcher.core.model import Instance, Source

__all__ = ["NAME", "directory", "parse", "render", "service_of"]

NAME: Final = "plain"

_DEFAULT_WEIGHT: Final = 100


def directory(service: str) -> str:
    """``<service>``: instances sit directly under the service's znode."""
    return service


def service_of(directory: str) -> str | None:
    """The service of a ``<service>`` directory, or None for a nested path."""
    name = directory.strip("/")
    return name if name and "/" not in name else None


def parse(service: str, name: str, data: bytes, *, source: Source | None = None) -> Instance | None:
    """One instance znode (named after the instance id) as an Instance; None for garbage."""
    record = json_object(data)
    instance_id = node_text(name)
    if record is None or not instance_id:
        return None
    host = record.get("host")
    port = as_port(record.get("port"))
    raw_weight = record.get("weight")
    weight = _DEFAULT_WEIGHT if raw_weight is None else as_int(raw_weight)
    zone = record.get("zone") or ""
    raw_metadata = record.get("metadata")
    metadata = {} if raw_metadata is None else text_map(raw_metadata)
    if (
        not isinstance(host, str)
        or port is None
        or weight is None
        or not isinstance(zone, str)
        or metadata is None
    ):
        return None
    try:
        return Instance(
            service,
            instance_id,
            host,
            port,
            weight=weight,
            zone=zone,
            metadata=metadata,
            source=source,
        )
    except (TypeError, ValueError):
        return None


def render(instance: Instance) -> tuple[str, bytes]:
    """``instance`` as ``(instance id, JSON)``, every field written out."""
    record = {
        "host": instance.host,
        "port": instance.port,
        "weight": instance.weight,
        "zone": instance.zone,
        "metadata": dict(instance.metadata),
    }
    return node_name(instance.instance_id), json_bytes(record)
