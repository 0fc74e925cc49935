"""ZooKeeper's watch tables: which connection waits for which change of which path.

Two tables, as in ZooKeeper's ``DataTree``: data watches (getData, exists, and
persistent watches) and child watches (getChildren, and non-recursive
persistent watches). A standard watch fires once; a persistent one stays; a
recursive one also fires for every path below it, but never for
NodeChildrenChanged.

As in ZooKeeper 3.8, a connection has ONE mode per path, shared by both
tables, and the last registration sets it: adding a recursive watch where a
persistent one was turns off its NodeChildrenChanged events, and a standard
watch set afterwards makes the watch one-shot again. (ZooKeeper 3.9 changed
this; 3.8 is the specification here.)
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterator

from dispatcher.zk.paths import parent_of
from dispatcher.zk.protocol import EventType


class Mode(enum.Enum):
    STANDARD = 0
    PERSISTENT = 1
    PERSISTENT_RECURSIVE = 2


class WatcherType(enum.IntEnum):
    """The ``type`` of checkWatches and removeWatches."""

    CHILDREN = 1
    DATA = 2
    ANY = 3


class WatchManager:
    """Both tables, the shared modes, and the rules that map changes to events."""

    def __init__(self) -> None:
        self.data: dict[str, set[Hashable]] = {}
        self.child: dict[str, set[Hashable]] = {}
        self._modes: dict[tuple[Hashable, str], Mode] = {}
        self._by_watcher: dict[Hashable, set[str]] = {}
        self._recursive = 0

    # --- registration ---

    def add_data(self, path: str, watcher: Hashable) -> None:
        self._add(self.data, path, watcher, Mode.STANDARD)

    def add_child(self, path: str, watcher: Hashable) -> None:
        self._add(self.child, path, watcher, Mode.STANDARD)

    def add_persistent(self, path: str, watcher: Hashable, recursive: bool) -> None:
        if recursive:
            self._add(self.data, path, watcher, Mode.PERSISTENT_RECURSIVE)
        else:
            self._add(self.data, path, watcher, Mode.PERSISTENT)
            self._add(self.child, path, watcher, Mode.PERSISTENT)

    def _add(self, table: dict[str, set[Hashable]], path: str, watcher: Hashable,
             mode: Mode) -> None:  # fmt: skip
        table.setdefault(path, set()).add(watcher)
        self._set_mode(watcher, path, mode)
        self._by_watcher.setdefault(watcher, set()).add(path)

    def _set_mode(self, watcher: Hashable, path: str, mode: Mode | None) -> None:
        key = (watcher, path)
        before = self._modes.pop(key, None)
        if before is Mode.PERSISTENT_RECURSIVE:
            self._recursive -= 1
        if mode is not None:
            self._modes[key] = mode
            if mode is Mode.PERSISTENT_RECURSIVE:
                self._recursive += 1

    def _discard(self, table: dict[str, set[Hashable]], path: str, watcher: Hashable) -> bool:
        watchers = table.get(path)
        if watchers is None or watcher not in watchers:
            return False
        watchers.discard(watcher)
        if not watchers:
            del table[path]
        if watcher not in self.data.get(path, ()) and watcher not in self.child.get(path, ()):
            self._set_mode(watcher, path, None)
            paths = self._by_watcher.get(watcher)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self._by_watcher[watcher]
        return True

    def _use_up(self, table: dict[str, set[Hashable]], path: str, used: list[Hashable]) -> None:
        """Remove fired one-shot watches: :meth:`_discard` for many watchers of
        one path at once (a change watched by thousands of sessions)."""
        watchers = table[path]
        if len(used) == len(watchers):
            del table[path]
        else:
            watchers.difference_update(used)
        other = self.child if table is self.data else self.data
        still = other.get(path, ())
        modes, by_watcher = self._modes, self._by_watcher
        for watcher in used:
            if watcher in still:
                continue
            # A one-shot watch's mode is STANDARD: nothing to count.
            modes.pop((watcher, path), None)
            paths = by_watcher.get(watcher)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del by_watcher[watcher]

    def contains(self, path: str, watcher: Hashable, kind: WatcherType) -> bool:
        in_data = watcher in self.data.get(path, ())
        in_child = watcher in self.child.get(path, ())
        if kind is WatcherType.DATA:
            return in_data
        if kind is WatcherType.CHILDREN:
            return in_child
        return in_data or in_child

    def remove(self, path: str, watcher: Hashable, kind: WatcherType) -> bool:
        removed = False
        if kind in (WatcherType.CHILDREN, WatcherType.ANY):
            removed |= self._discard(self.child, path, watcher)
        if kind in (WatcherType.DATA, WatcherType.ANY):
            removed |= self._discard(self.data, path, watcher)
        return removed

    def drop_watcher(self, watcher: Hashable) -> None:
        for path in list(self._by_watcher.get(watcher, ())):
            self._discard(self.data, path, watcher)
            self._discard(self.child, path, watcher)

    # --- triggering ---

    def fire(self, path: str, event: EventType) -> list[Hashable]:
        """Who hears ``event`` at ``path``, each once, in ZooKeeper's order."""
        if event is EventType.NODE_CHILDREN_CHANGED:
            return self._trigger(self.child, path, event, [])
        fired = self._trigger(self.data, path, event, [])
        if event is EventType.NODE_DELETED:
            self._trigger(self.child, path, event, fired)
        return fired

    def _trigger(self, table: dict[str, set[Hashable]], path: str, event: EventType,
                 fired: list[Hashable]) -> list[Hashable]:  # fmt: skip
        used_up = []
        modes = self._modes
        first = not fired
        for watcher in table.get(path, ()):
            mode = modes.get((watcher, path), Mode.STANDARD)
            if mode is Mode.PERSISTENT_RECURSIVE:
                if event is EventType.NODE_CHILDREN_CHANGED:
                    continue
            elif mode is Mode.STANDARD:
                used_up.append(watcher)
            if first or watcher not in fired:
                fired.append(watcher)
        if used_up:
            self._use_up(table, path, used_up)
        if self._recursive and table is self.data and event is not EventType.NODE_CHILDREN_CHANGED:
            for ancestor in _ancestors(path):
                for watcher in table.get(ancestor, ()):
                    mode = self._modes.get((watcher, ancestor))
                    if mode is Mode.PERSISTENT_RECURSIVE and watcher not in fired:
                        fired.append(watcher)
        return fired

    # --- reporting (four-letter words) ---

    @property
    def watch_count(self) -> int:
        """Data plus child watches, as ``mntr``'s zk_watch_count counts them."""
        return _count(self.data) + _count(self.child)

    @property
    def data_watch_count(self) -> int:
        return _count(self.data)

    def data_watchers(self) -> Iterator[tuple[Hashable, list[str]]]:
        by_watcher: dict[Hashable, list[str]] = {}
        for path, watchers in self.data.items():
            for watcher in watchers:
                by_watcher.setdefault(watcher, []).append(path)
        return iter(by_watcher.items())


def _count(table: dict[str, set[Hashable]]) -> int:
    return sum(len(watchers) for watchers in table.values())


def _ancestors(path: str) -> Iterator[str]:
    while path not in ("/", ""):
        path = parent_of(path)
        yield path
