"""ZooKeeper's watch tables: which connection waits for which change of which path.

Two tables, as in ZooKeeper's ``DataTree``: data watches (getData, exists, and
persistent watches) and child watches (getChildren, and non-recursive
persistent watches). A standard watch fires once; persistent ones stay; a
recursive one also fires for every path below it, but never for
NodeChildrenChanged.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterator

from dispatcher.zk.paths import parent_of
from dispatcher.zk.protocol import EventType


class Mode(enum.IntFlag):
    STANDARD = 1
    PERSISTENT = 2
    PERSISTENT_RECURSIVE = 4


class WatchTable:
    """path → {watcher: modes}, with the reverse index needed to drop a watcher."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[Hashable, Mode]] = {}
        self._by_watcher: dict[Hashable, set[str]] = {}
        self.recursive_count = 0

    def add(self, path: str, watcher: Hashable, mode: Mode = Mode.STANDARD) -> None:
        watchers = self._by_path.setdefault(path, {})
        before = watchers.get(watcher, Mode(0))
        if mode & Mode.PERSISTENT_RECURSIVE and not before & Mode.PERSISTENT_RECURSIVE:
            self.recursive_count += 1
        watchers[watcher] = before | mode
        self._by_watcher.setdefault(watcher, set()).add(path)

    def contains(self, path: str, watcher: Hashable, mode: Mode | None = None) -> bool:
        modes = self._by_path.get(path, {}).get(watcher)
        if modes is None:
            return False
        return mode is None or bool(modes & mode)

    def remove(self, path: str, watcher: Hashable, mode: Mode | None = None) -> bool:
        """Drop ``mode`` (every mode when None); True when something was removed."""
        watchers = self._by_path.get(path)
        if watchers is None or watcher not in watchers:
            return False
        before = watchers[watcher]
        after = Mode(0) if mode is None else before & ~mode
        if after == before:
            return False
        self._set(path, watchers, watcher, before, after)
        return True

    def _set(
        self, path: str, watchers: dict[Hashable, Mode], watcher: Hashable, before: Mode,
        after: Mode,
    ) -> None:
        if before & Mode.PERSISTENT_RECURSIVE and not after & Mode.PERSISTENT_RECURSIVE:
            self.recursive_count -= 1
        if after:
            watchers[watcher] = after
            return
        del watchers[watcher]
        if not watchers:
            del self._by_path[path]
        paths = self._by_watcher.get(watcher)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._by_watcher[watcher]

    def drop_watcher(self, watcher: Hashable) -> None:
        for path in self._by_watcher.pop(watcher, set()):
            watchers = self._by_path[path]
            if watchers.pop(watcher) & Mode.PERSISTENT_RECURSIVE:
                self.recursive_count -= 1
            if not watchers:
                del self._by_path[path]

    def trigger(self, path: str, recursive_too: bool) -> list[Hashable]:
        """The watchers to notify of a change at ``path``; standard watches are used up."""
        fired: list[Hashable] = []
        watchers = self._by_path.get(path)
        if watchers:
            for watcher, modes in list(watchers.items()):
                fired.append(watcher)
                if modes & Mode.STANDARD:
                    self._set(path, watchers, watcher, modes, modes & ~Mode.STANDARD)
        if recursive_too and self.recursive_count:
            for ancestor in _ancestors(path):
                for watcher, modes in self._by_path.get(ancestor, {}).items():
                    if modes & Mode.PERSISTENT_RECURSIVE and watcher not in fired:
                        fired.append(watcher)
        return fired

    def paths_of(self, watcher: Hashable) -> set[str]:
        return self._by_watcher.get(watcher, set())

    def watchers_of(self, path: str) -> dict[Hashable, Mode]:
        return self._by_path.get(path, {})

    @property
    def path_count(self) -> int:
        return len(self._by_path)

    @property
    def watch_count(self) -> int:
        return sum(len(watchers) for watchers in self._by_path.values())

    def items(self) -> Iterator[tuple[str, dict[Hashable, Mode]]]:
        return iter(self._by_path.items())

    def watchers(self) -> Iterator[tuple[Hashable, set[str]]]:
        return iter(self._by_watcher.items())


def _ancestors(path: str) -> Iterator[str]:
    while path != "/":
        path = parent_of(path)
        yield path


class WatchManager:
    """Both tables, and the rules that map a tree change to the watches it fires."""

    def __init__(self) -> None:
        self.data = WatchTable()
        self.child = WatchTable()

    def fire(self, path: str, event: EventType) -> list[Hashable]:
        """Who hears ``event`` at ``path``, each once, in ZooKeeper's order."""
        if event is EventType.NODE_CHILDREN_CHANGED:
            return self.child.trigger(path, recursive_too=False)
        fired = self.data.trigger(path, recursive_too=True)
        if event is EventType.NODE_DELETED:
            for watcher in self.child.trigger(path, recursive_too=False):
                if watcher not in fired:
                    fired.append(watcher)
        return fired

    def drop_watcher(self, watcher: Hashable) -> None:
        self.data.drop_watcher(watcher)
        self.child.drop_watcher(watcher)

    @property
    def watch_count(self) -> int:
        return self.data.watch_count + self.child.watch_count
