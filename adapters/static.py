"""The static upstream: instances listed in a TOML or JSON file, reloaded when it changes.

For services that no registry knows (a database, a partner's endpoint, a
laptop), or to try zkgate without one. The file is the whole truth: every
change to it becomes a complete :class:`~dispatcher.core.upstream.Listing`, which
the fan-in diffs into exactly the instances added, changed and removed.

File format, by suffix. TOML (``.toml``), one ``[[instance]]`` table each::

    [[instance]]
    service = "orders"          # required
    host = "10.0.0.7"           # required
    port = 8080                 # required
    id = "orders-a"             # optional; default "host:port"
    weight = 100                # optional, >= 0; default 100
    zone = "eu-west-1a"         # optional
    protocol = "grpc"           # optional
    health = "passing"          # optional: unknown (default), passing, failing
    metadata = { version = "1.4.2" }   # optional; string values only

JSON (``.json``): ``{"instances": [{"service": "orders", "host": ..., ...}]}``
with the same keys. An empty file or an empty list means no instances.
Unknown keys are errors, so a typo (``wieght``) cannot silently fall back to a
default; ``(service, id)`` must be unique.

Reloading. The file is polled every ``poll_interval`` seconds (no inotify:
no new dependency, and polling also works on network filesystems and for
editors that replace the file by renaming). It is re-read when its size,
modification time or inode change, and also while its modification time is
within two seconds of the read, because a write in the same timestamp tick
as the previous read would otherwise go unnoticed (git's "racily clean"
rule). Content whose hash equals what was last loaded is not parsed again.
A file is loaded only once it has stopped changing for a moment (its
size, time and inode the same a short settle time after the read): a writer
that truncates and then writes in place would otherwise be caught with an
empty file, and the empty Listing would remove every instance until the next
poll. Writing a temporary file and renaming it over the old one is still the
way to change the file atomically.

A file that cannot be read or parsed leaves the last good state served: the
upstream logs one line naming the file and the error (its line and column
for a syntax error, the instance and key for a bad value) and reports
``Status(False, ...)``; when the file is fixed, the new Listing is sent, then
``Status(True)``.

Interest. ``set_interest`` filters what is sent to the services asked for
(a Listing for exactly those services); widening it sends the newly
interesting ones from the state already loaded, without re-reading the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

import attrs
import trio

from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.upstream import (
    ConfigError,
    Listing,
    Status,
    UpstreamEvent,
    check_type,
    reject_unknown,
    require,
)

__all__ = ["StaticConfig", "StaticFileError", "StaticUpstream", "parse_instances"]

log = logging.getLogger(__name__)

_OPTIONS: Final = ("path", "poll_interval")
_SUFFIXES: Final = (".toml", ".json")
_INSTANCE_KEYS: Final = frozenset(
    {"service", "id", "host", "port", "weight", "zone", "protocol", "metadata", "health"}
)
_RACY_WINDOW_NS: Final = 2_000_000_000
_SETTLE: Final = 0.1  # seconds a file must stay unchanged after a read to be loaded


class StaticFileError(ValueError):
    """The file is not a valid instance list; the message says where (line, or instance and key)."""


@attrs.frozen
class StaticConfig:
    """The validated options of one static upstream."""

    path: Path
    poll_interval: float = 1.0

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any]) -> Self:
        where = f"upstream {name!r} (static)"
        reject_unknown(options, _OPTIONS, where)
        raw = require(options, "path", str, where)
        try:
            path = Path(raw).expanduser()
        except RuntimeError:  # what pathlib raises for ~user when there is no such user
            raise ConfigError(f"{where}: key 'path' cannot expand the ~ in {raw!r}") from None
        if path.suffix.lower() not in _SUFFIXES:
            raise ConfigError(f"{where}: key 'path' must name a .toml or .json file, not {path}")
        poll_interval = check_type(options.get("poll_interval", 1.0), "poll_interval", float, where)
        if not 0 < poll_interval < float("inf"):
            raise ConfigError(f"{where}: key 'poll_interval' must be > 0 seconds")
        return cls(path, poll_interval)


def parse_instances(
    adapter: str, path: Path, data: bytes, revision: int = 0
) -> tuple[Instance, ...]:
    """The instances a file's bytes describe (the format is in the module docstring).

    Raises :class:`StaticFileError` naming the line and column of a syntax
    error, or the instance and key of a bad value.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StaticFileError(f"not UTF-8 (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise StaticFileError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        container, label = "instances", "instances"
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message already ends "(at line L, column C)".
            raise StaticFileError(str(exc)) from None
        container, label = "instance", "[[instance]]"
    if not isinstance(document, dict):
        raise StaticFileError(f"the top level must be a table with {container!r}")
    reject_unknown(document, (container,), "", StaticFileError)
    entries = document.get(container, [])
    if not isinstance(entries, list):
        raise StaticFileError(f"{container!r} must be a list of {label} tables")

    instances: list[Instance] = []
    seen: dict[tuple[str, str], int] = {}
    for number, entry in enumerate(entries, start=1):
        where = f"{label} #{number}"
        instance = _instance(adapter, entry, where, revision)
        key = (instance.service, instance.instance_id)
        if key in seen:
            raise StaticFileError(
                f"{where}: service {key[0]!r} id {key[1]!r} repeats {label} #{seen[key]}"
            )
        seen[key] = number
        instances.append(instance)
    return tuple(instances)


def _instance(adapter: str, entry: object, where: str, revision: int) -> Instance:
    if not isinstance(entry, dict):
        raise StaticFileError(f"{where}: must be a table, not {type(entry).__name__}")
    reject_unknown(entry, _INSTANCE_KEYS, where, StaticFileError)

    def get(key: str, kind: type, default: Any = None) -> Any:
        if key not in entry:
            if default is None:
                raise StaticFileError(f"{where}: missing key {key!r}")
            return default
        value = entry[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StaticFileError(
                f"{where}: key {key!r} must be {kind.__name__}, not {type(value).__name__}"
            )
        return value

    service = get("service", str)
    host = get("host", str)
    port = get("port", int)
    metadata = get("metadata", dict, {})
    for meta_key, value in metadata.items():
        if not isinstance(value, str):
            raise StaticFileError(
                f"{where}: metadata {meta_key!r} must be a string, not {type(value).__name__}"
            )
    health = get("health", str, Health.UNKNOWN.value)
    if health not in {h.value for h in Health}:
        raise StaticFileError(
            f"{where}: key 'health' must be unknown, passing or failing, not {health!r}"
        )
    instance_id = get("id", str, f"{host}:{port}")
    try:
        return Instance(
            service,
            instance_id,
            host,
            port,
            weight=get("weight", int, 100),
            zone=get("zone", str, ""),
            protocol=get("protocol", str, ""),
            metadata=metadata,
            health=health,
            source=Source(adapter, f"{service}/{instance_id}", revision),
        )
    except (TypeError, ValueError) as exc:
        raise StaticFileError(f"{where}: {exc}") from None


@attrs.frozen
class _Read:
    """What one read of the file found: its identity on disk and its bytes."""

    signature: tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)
    racy: bool  # modified so recently that a same-tick rewrite could be missed
    data: bytes


def _read(path: Path) -> _Read:
    with path.open("rb") as file:
        stat = os.fstat(file.fileno())
        data = file.read()
    racy = time.time_ns() - stat.st_mtime_ns < _RACY_WINDOW_NS
    return _Read((stat.st_mtime_ns, stat.st_size, stat.st_ino), racy, data)


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class StaticUpstream:
    """A TOML or JSON file of instances as an upstream (format and rules: module docstring).

    Options: ``path`` (required; ``.toml`` or ``.json``) and ``poll_interval``
    (seconds between checks of the file, default 1).
    """

    def __init__(self, name: str, config: StaticConfig) -> None:
        self.name = name
        self.config = config
        self._interest: frozenset[str] | None = None
        self._interest_changed: trio.Event | None = None
        self._instances: tuple[Instance, ...] | None = None  # the last good state
        self._good_digest: bytes | None = None
        self._bad_digest: bytes | None = None  # content already reported as broken
        self._signature: tuple[int, int, int] | None = None
        self._racy = True
        self._revision = 0
        self._status: Status | None = None  # the last Status sent

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, StaticConfig.from_options(name, options))

    def set_interest(self, services: frozenset[str] | None) -> None:
        self._interest = services
        if self._interest_changed is not None:
            self._interest_changed.set()

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        # Forget what was sent, so that a restarted run lists the file again.
        self._good_digest = self._bad_digest = self._signature = self._status = None
        while True:
            self._interest_changed = trio.Event()
            await self._check(events)
            with trio.move_on_after(self.config.poll_interval):
                await self._interest_changed.wait()
            if self._interest_changed.is_set() and self._instances is not None:
                await events.send(self._listing())

    async def _check(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        path = self.config.path
        try:
            unchanged = (
                self._signature is not None
                and not self._racy
                and await trio.to_thread.run_sync(_signature, path) == self._signature
            )
            if unchanged:
                return
            read = await trio.to_thread.run_sync(_read, path)
            await trio.sleep(min(_SETTLE, self.config.poll_interval / 2))
            if await trio.to_thread.run_sync(_signature, path) != read.signature:
                return  # being written right now: read it again at the next poll
        except OSError as exc:
            self._signature = None
            self._bad_digest = None
            await self._report(events, False, f"{path}: cannot read: {exc.strerror or exc}")
            return
        self._signature, self._racy = read.signature, read.racy
        digest = hashlib.sha256(read.data).digest()
        if digest == self._good_digest:
            await self._report(events, True)
            return
        if digest == self._bad_digest:
            return  # already reported; keep waiting for a fix
        try:
            instances = await trio.to_thread.run_sync(
                parse_instances, self.name, path, read.data, self._revision + 1
            )
        except StaticFileError as exc:
            self._bad_digest = digest
            await self._report(events, False, f"{path}: {exc}; keeping the last good state")
            return
        self._revision += 1
        self._good_digest, self._bad_digest = digest, None
        self._instances = instances
        await events.send(self._listing())
        await self._report(events, True)

    def _listing(self) -> Listing:
        assert self._instances is not None
        interest = self._interest
        if interest is None:
            return Listing(self._instances)
        return Listing(tuple(i for i in self._instances if i.service in interest), interest)

    async def _report(
        self, events: trio.MemorySendChannel[UpstreamEvent], connected: bool, detail: str = ""
    ) -> None:
        status = Status(connected, detail or str(self.config.path))
        if status == self._status:
            return
        if not connected:
            log.warning(
                "static file unusable",
                extra={"path": str(self.config.path), "upstream": self.name, "detail": detail},
            )
        elif self._status is not None:
            log.info(
                "static file loaded again",
                extra={"path": str(self.config.path), "upstream": self.name},
            )
        self._status = status
        await events.send(status)
