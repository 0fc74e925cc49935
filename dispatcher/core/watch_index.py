"""Who is interested in what: the indexed watch table.

N consumers watching the same key must cost the upstream registry one
watch, not N. :class:`WatchIndex` keeps, for every key, the set of its
subscribers, and tells the caller exactly when a key gains its first
subscriber (create the one upstream interest) and loses its last (drop it).
It also keeps the reverse map, so that a closing session or a departing
proxy can be removed from every key at once without scanning the table.

Keys are whatever the caller indexes by: a service name, a znode path, a
path prefix. Keep one index per kind of interest (ZooKeeper's data, child
and persistent-recursive watches on the same path are different interests)
or put the kind in the key.

This module bounds nothing: the number of keys and subscribers is decided
by the callers, who must bound them (per session watch limits, per proxy
subscription limits) before calling :meth:`WatchIndex.add`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, KeysView
from typing import Generic, TypeVar

__all__ = ["WatchIndex"]

K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Hashable)


def _path_prefixes(path: str) -> Iterator[str]:
    """``/a/b/c`` -> ``/``, ``/a``, ``/a/b``, ``/a/b/c``: whole components only.

    ``/ab`` is not under ``/a``, so prefixes are cut at separators rather
    than at every character.
    """
    if path.startswith("/"):
        yield "/"
    start = 1
    while (cut := path.find("/", start)) != -1:
        yield path[:cut]
        start = cut + 1
    if path != "/":
        yield path


class WatchIndex(Generic[K, S]):
    """A map from keys to their subscribers, with first/last edges reported.

    Subscribers form a set per key: adding the same subscriber twice is a
    no-op, and one ``remove`` takes it out. Subscribers are returned in the
    order they subscribed, so fan-out order is deterministic.

    Lookups return fresh tuples, never live views: firing a one-shot watch
    usually removes it, and the caller must be free to mutate the index while
    iterating over what it got back.
    """

    __slots__ = ("_by_key", "_by_subscriber")

    def __init__(self) -> None:
        # dict[..., None] is an insertion-ordered set.
        self._by_key: dict[K, dict[S, None]] = {}
        self._by_subscriber: dict[S, dict[K, None]] = {}

    def add(self, key: K, subscriber: S) -> bool:
        """Subscribe ``subscriber`` to ``key``.

        Returns True when ``key`` had no subscriber before this call: the
        caller then creates the one upstream interest for it.
        """
        subscribers = self._by_key.get(key)
        first = subscribers is None
        if subscribers is None:
            subscribers = self._by_key[key] = {}
        subscribers[subscriber] = None
        self._by_subscriber.setdefault(subscriber, {})[key] = None
        return first

    def remove(self, key: K, subscriber: S) -> bool:
        """Unsubscribe ``subscriber`` from ``key`` (a no-op if it was not subscribed).

        Returns True when this removed the last subscriber of ``key``: the
        caller then drops the upstream interest.
        """
        subscribers = self._by_key.get(key)
        if subscribers is None or subscriber not in subscribers:
            return False
        del subscribers[subscriber]
        keys = self._by_subscriber[subscriber]
        del keys[key]
        if not keys:
            del self._by_subscriber[subscriber]
        if subscribers:
            return False
        del self._by_key[key]
        return True

    def remove_subscriber(self, subscriber: S) -> tuple[K, ...]:
        """Unsubscribe ``subscriber`` from every key (a session closed).

        Returns the keys that lost their last subscriber, in the order the
        subscriber had added them, for the caller to drop upstream.
        """
        emptied: list[K] = []
        for key in self._by_subscriber.pop(subscriber, {}):
            subscribers = self._by_key[key]
            del subscribers[subscriber]
            if not subscribers:
                del self._by_key[key]
                emptied.append(key)
        return tuple(emptied)

    def subscribers(self, key: K) -> tuple[S, ...]:
        """The subscribers of exactly ``key`` (empty if none)."""
        return tuple(self._by_key.get(key, ()))

    def keys_of(self, subscriber: S) -> tuple[K, ...]:
        """The keys ``subscriber`` is subscribed to (empty if none)."""
        return tuple(self._by_subscriber.get(subscriber, ()))

    def matching(self: WatchIndex[str, S], path: str) -> tuple[S, ...]:
        """Subscribers of every key that is ``path`` or a component prefix of it.

        This is the lookup for recursive watches: a key ``/a`` matches
        ``/a`` and ``/a/b/c`` but not ``/ab``, and ``/`` matches every
        absolute path. It costs one dict lookup per path component, however
        many keys the index holds. A subscriber of several matching keys is
        returned once, like ZooKeeper delivers one event per watcher however
        many of its recursive watches cover the path.
        """
        found: dict[S, None] = {}
        by_key = self._by_key
        for prefix in _path_prefixes(path):
            subscribers = by_key.get(prefix)
            if subscribers:
                found.update(subscribers)
        return tuple(found)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        """The number of keys that have at least one subscriber."""
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"WatchIndex(keys={len(self._by_key)}, subscribers={len(self._by_subscriber)})"

    def keys(self) -> KeysView[K]:
        """A live view of the keys that have at least one subscriber.

        Live, unlike the other lookups, so that counting or testing
        membership costs nothing; copy it before mutating the index while
        iterating.
        """
        return self._by_key.keys()
