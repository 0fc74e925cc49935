"""The admin endpoint's JSON views: instances, the snapshot and the shard map.

Pure functions of immutable values (a :class:`~dispatcher.core.snapshot.Snapshot`
never changes once made), so :func:`render_snapshot` may run in a worker
thread without a lock. The HTTP server (:mod:`dispatcher.faces.admin.http`)
decides when to render and what to cache; this module only says what the
answer looks like.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from dispatcher.core.model import Instance
from dispatcher.core.snapshot import Snapshot

if TYPE_CHECKING:
    from dispatcher.core.ownership import Ownership
    from dispatcher.wire import Owner

__all__ = ["instance_json", "json_body", "render_snapshot", "shard_map", "snapshot_json"]


def json_body(value: object) -> bytes:
    """``value`` as a compact UTF-8 JSON response body, newline-terminated."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def instance_json(instance: Instance) -> dict[str, Any]:
    """One instance as the admin endpoint shows it (``/snapshot``)."""
    source = instance.source
    return {
        "id": instance.instance_id,
        "host": instance.host,
        "port": instance.port,
        "weight": instance.weight,
        "zone": instance.zone,
        "protocol": instance.protocol,
        "health": instance.health.value,
        "metadata": dict(instance.metadata.items()),
        "source": None
        if source is None
        else {"adapter": source.adapter, "key": source.key, "revision": source.revision},
    }


def snapshot_json(
    snapshot: Snapshot, services: Collection[str] | None = None, limit: int | None = None
) -> dict[str, Any]:
    """``{"version", "services": {name: {"version", "instances": [...]}}}``.

    ``services`` narrows the answer; a named service that has no instances
    is listed with none (and the version it last changed at), so a caller
    can tell "empty" from "not asked for". ``limit`` keeps the first
    ``limit`` services by name and adds ``total_services`` and ``truncated``,
    so that a page can show a large registry's head without fetching it all.
    """
    names = sorted(snapshot) if services is None else sorted(set(services))
    total = len(names)
    if limit is not None:
        names = names[:limit]
    result: dict[str, Any] = {}
    for name in names:
        entry = snapshot.full(name)
        instances = entry.instances
        result[name] = {
            "version": entry.version,
            "instances": [instance_json(instances[key]) for key in sorted(instances)],
        }
    if limit is None:
        return {"version": snapshot.version, "services": result}
    return {"version": snapshot.version, "services": result, "total_services": total,
            "truncated": total > len(names)}  # fmt: skip


def render_snapshot(
    snapshot: Snapshot, services: Collection[str] | None, limit: int | None
) -> bytes:
    """:func:`snapshot_json` as a response body (see :func:`json_body`).

    Reads only immutable values, so it is safe in a worker thread.
    """
    return json_body(snapshot_json(snapshot, services, limit))


def shard_map(
    ownership: Ownership,
    services: Iterable[str],
    node: str,
    members: Iterable[Owner] = (),
    *,
    membership_connected: bool | None = None,
) -> dict[str, Any]:
    """``/shards`` of a sharded Dispatcher: who owns each of ``services`` as of one epoch.

    ``{"sharding": "on", "node", "epoch", "members": [{"id", "subscribe_address",
    "zookeeper_address", "services": count}], "services": {name: owner id or null}}``,
    plus ``membership_connected`` when known. ``members`` are listed even when they own
    nothing; an owner that is not among them is added; null means nobody owns it now.
    """
    listed: dict[str, dict[str, Any]] = {}
    for member in members:
        listed[member.id] = {**member.to_json(), "services": 0}
    owners: dict[str, str | None] = {}
    for service in sorted(services):
        owner = ownership.owner_of(service)
        if owner is None:
            owners[service] = None
            continue
        owners[service] = owner.id
        entry = listed.get(owner.id)
        if entry is None:
            entry = listed[owner.id] = {**owner.to_json(), "services": 0}
        entry["services"] += 1
    result: dict[str, Any] = {
        "sharding": "on",
        "node": node,
        "epoch": ownership.epoch,
        "members": [listed[key] for key in sorted(listed)],
        "services": owners,
    }
    if membership_connected is not None:
        result["membership_connected"] = membership_connected
    return result
