"""ZooKeeper's watch tables: which connection waits for which change of which path.

Two tables, as in ZooKeeper 3.8's ``DataTree``: data watches (getData, exists)
and child watches (getChildren). Each table is one of ZooKeeper's
``WatchManager``: per path, a set of watchers, and per (watcher, path) ONE
mode (STANDARD, PERSISTENT or PERSISTENT_RECURSIVE) in the table's own
``WatcherModeManager``. The two tables' modes are independent, which is what
a client sees when it mixes persistent and one-shot watches on one path:

* ``addWatch`` (either mode) registers in both tables with that mode (3.8.0
  puts a recursive watch in the child table too);
* a one-shot watch (getData/exists on the data table, getChildren on the
  child table) sets that table's mode back to STANDARD, so ``addWatch(/w,
  PERSISTENT_RECURSIVE)`` then ``getChildren(/w, watch)`` leaves a recursive
  data watch and a one-shot child watch: both fire, each by its own rules;
* the last registration in a table wins there: a recursive ``addWatch`` over
  a persistent one turns its NodeChildrenChanged events off.

A change triggers a table at its path and, when the table holds any recursive
watch, at every ancestor too: a recursive watch hears every event but
NodeChildrenChanged, at its path or below; a standard or persistent one only
events at its own path; a standard one is then removed. One trigger sends
each watcher one event; NodeDeleted triggers the data table, then the child
table without the watchers the first already told.

``checkWatches`` is ZooKeeper 3.8.0's ``containsWatcher``, which asks whether
the table holds ANY watcher of the path, not whether the asking connection
does; ``removeWatches`` removes only the asker's own. (ZooKeeper 3.9 changed
much of this; 3.8 is the specification.)
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Iterator

from dispatcher.zk.codec.paths import parent_of
from dispatcher.zk.codec.protocol import EventType


class Mode(enum.Enum):
    STANDARD = 0
    PERSISTENT = 1
    PERSISTENT_RECURSIVE = 2


class WatcherType(enum.IntEnum):
    """The ``type`` of checkWatches and removeWatches."""

    CHILDREN = 1
    DATA = 2
    ANY = 3


_RECURSIVE = Mode.PERSISTENT_RECURSIVE
_STANDARD = Mode.STANDARD
_CHILDREN_CHANGED = EventType.NODE_CHILDREN_CHANGED


class WatchTable:
    """One of ZooKeeper's two ``WatchManager``s: watchers by path, their modes.

    ``watchers`` maps a path to its non-empty set of watchers. ``modes`` holds
    only the persistent modes: a (watcher, path) that is absent is STANDARD,
    so a table of one-shot watches (the common case) fires without looking
    modes up.
    """

    __slots__ = ("modes", "paths_of", "recursive", "watchers")

    def __init__(self) -> None:
        self.watchers: dict[str, set[Hashable]] = {}
        self.modes: dict[tuple[Hashable, str], Mode] = {}
        self.paths_of: dict[Hashable, set[str]] = {}
        #: How many recursive modes the table holds: while 0, a trigger looks
        #: at its own path only (ZooKeeper's ``recursiveQty``).
        self.recursive = 0

    def add(self, path: str, watcher: Hashable, mode: Mode) -> None:
        self.watchers.setdefault(path, set()).add(watcher)
        self.paths_of.setdefault(watcher, set()).add(path)
        key = (watcher, path)
        before = self.modes.pop(key, _STANDARD)
        if before is _RECURSIVE:
            self.recursive -= 1
        if mode is not _STANDARD:
            self.modes[key] = mode
            if mode is _RECURSIVE:
                self.recursive += 1

    def _forget_mode(self, watcher: Hashable, path: str) -> None:
        if self.modes.pop((watcher, path), _STANDARD) is _RECURSIVE:
            self.recursive -= 1

    def remove(self, path: str, watcher: Hashable) -> bool:
        """Remove ``watcher``'s watch of ``path``; False if it had none."""
        paths = self.paths_of.get(watcher)
        if paths is None or path not in paths:
            return False
        paths.discard(path)
        if not paths:
            del self.paths_of[watcher]
        watchers = self.watchers[path]
        watchers.discard(watcher)
        if not watchers:
            del self.watchers[path]
        self._forget_mode(watcher, path)
        return True

    def drop(self, watcher: Hashable) -> None:
        """Every watch of ``watcher`` (its connection closed)."""
        for path in self.paths_of.pop(watcher, ()):
            watchers = self.watchers[path]
            watchers.discard(watcher)
            if not watchers:
                del self.watchers[path]
            self._forget_mode(watcher, path)

    def contains(self, path: str, watcher: Hashable) -> bool:
        """ZooKeeper 3.8.0's ``containsWatcher``: true when ANY watcher watches
        ``path`` here. (Its other case, the asker's own recursive watch of
        ``path``, is in the table too; ``watcher`` is kept for the signature.)"""
        return path in self.watchers

    def trigger(self, path: str, event: EventType, fired: list[Hashable]) -> None:
        """Append to ``fired`` who hears ``event`` at ``path`` and is not in it yet;
        remove the one-shot watches it uses up, also those of watchers already
        in ``fired`` (ZooKeeper's suppressed watchers lose them too)."""
        told = set(fired) if fired else None
        watchers = self.watchers.get(path)
        if watchers:
            modes = self.modes
            if not modes:
                # All one-shot: every watcher hears it and loses its watch.
                del self.watchers[path]
                self._used_up(path, watchers)
                if told is None:
                    fired.extend(watchers)
                else:
                    fired.extend(w for w in watchers if w not in told)
                    told.update(watchers)
            else:
                used = []
                for watcher in watchers:
                    mode = modes.get((watcher, path), _STANDARD)
                    if mode is _STANDARD:
                        used.append(watcher)
                    elif mode is _RECURSIVE and event is _CHILDREN_CHANGED:
                        continue
                    if told is None:
                        fired.append(watcher)
                    elif watcher not in told:
                        fired.append(watcher)
                        told.add(watcher)
                if used:
                    if len(used) == len(watchers):
                        del self.watchers[path]
                    else:
                        watchers.difference_update(used)
                    self._used_up(path, used)
        if self.recursive and event is not _CHILDREN_CHANGED:
            if told is None:
                told = set(fired)
            modes = self.modes
            for ancestor in _ancestors(path):
                for watcher in self.watchers.get(ancestor, ()):
                    if modes.get((watcher, ancestor)) is _RECURSIVE and watcher not in told:
                        fired.append(watcher)
                        told.add(watcher)

    def _used_up(self, path: str, used: Iterable[Hashable]) -> None:
        paths_of = self.paths_of
        for watcher in used:
            paths = paths_of.get(watcher)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del paths_of[watcher]

    def count(self) -> int:
        return sum(len(watchers) for watchers in self.watchers.values())


class WatchManager:
    """Both tables and the rules that map a change to the watchers it tells.

    ``data`` and ``child`` are the two tables' path → watchers maps, for
    readers that only ask who watches what (the mirror, the four-letter words).
    """

    def __init__(self) -> None:
        self.data_table = WatchTable()
        self.child_table = WatchTable()
        self.data = self.data_table.watchers
        self.child = self.child_table.watchers

    # --- registration ---

    def add_data(self, path: str, watcher: Hashable) -> None:
        """A one-shot data watch (getData, exists)."""
        self.data_table.add(path, watcher, _STANDARD)

    def add_child(self, path: str, watcher: Hashable) -> None:
        """A one-shot child watch (getChildren)."""
        self.child_table.add(path, watcher, _STANDARD)

    def add_persistent(self, path: str, watcher: Hashable, recursive: bool) -> None:
        """addWatch: both tables, the child table first (as setWatches2 does)."""
        mode = _RECURSIVE if recursive else Mode.PERSISTENT
        self.child_table.add(path, watcher, mode)
        self.data_table.add(path, watcher, mode)

    def hears_children(self, path: str) -> bool:
        """Whether a NodeChildrenChanged of ``path`` would tell anyone (a
        recursive watch sits in the child table but never hears one)."""
        watchers = self.child.get(path)
        if not watchers:
            return False
        modes = self.child_table.modes
        return any(modes.get((watcher, path)) is not _RECURSIVE for watcher in watchers)

    def contains(self, path: str, watcher: Hashable, kind: WatcherType) -> bool:
        """checkWatches: whether ZooKeeper 3.8.0 answers OK (not NOWATCHER)."""
        if kind is WatcherType.DATA:
            return self.data_table.contains(path, watcher)
        if kind is WatcherType.CHILDREN:
            return self.child_table.contains(path, watcher)
        return self.child_table.contains(path, watcher) or self.data_table.contains(path, watcher)

    def remove(self, path: str, watcher: Hashable, kind: WatcherType) -> bool:
        """removeWatches of ``watcher``'s own watches; False: it had none of ``kind``."""
        removed = False
        if kind in (WatcherType.CHILDREN, WatcherType.ANY):
            removed |= self.child_table.remove(path, watcher)
        if kind in (WatcherType.DATA, WatcherType.ANY):
            removed |= self.data_table.remove(path, watcher)
        return removed

    def drop_watcher(self, watcher: Hashable) -> None:
        self.data_table.drop(watcher)
        self.child_table.drop(watcher)

    # --- triggering ---

    def fire(self, path: str, event: EventType) -> list[Hashable]:
        """Who hears ``event`` at ``path``, each once, in ZooKeeper's order."""
        fired: list[Hashable] = []
        if event is _CHILDREN_CHANGED:
            self.child_table.trigger(path, event, fired)
            return fired
        self.data_table.trigger(path, event, fired)
        if event is EventType.NODE_DELETED:
            self.child_table.trigger(path, event, fired)
        return fired

    # --- reporting (four-letter words) ---

    @property
    def watch_count(self) -> int:
        """Data plus child watches, as ``mntr``'s zk_watch_count counts them."""
        return self.data_table.count() + self.child_table.count()

    @property
    def data_watch_count(self) -> int:
        return self.data_table.count()

    def data_watchers(self) -> Iterator[tuple[Hashable, list[str]]]:
        by_watcher: dict[Hashable, list[str]] = {}
        for path, watchers in self.data.items():
            for watcher in watchers:
                by_watcher.setdefault(watcher, []).append(path)
        return iter(by_watcher.items())


def _ancestors(path: str) -> Iterator[str]:
    while path not in ("/", ""):
        path = parent_of(path)
        yield path
