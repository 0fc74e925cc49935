"""Quota usage, as ZooKeeper 3.8 keeps it under ``/zookeeper/quota``.

zkCli's ``setquota`` creates ``/zookeeper/quota<path>/zookeeper_limits`` and
``.../zookeeper_stats``; from then on the server keeps the stats node's data
equal to the usage of ``<path>``'s subtree (``count=<znodes>,bytes=<data
bytes>``, the root included), counting every change below it. Limits are only
reported, never enforced: ZooKeeper 3.8 enforces none by default either. A
stats node whose data does not parse counts as no quota: its usage is no
longer kept, and writes below it go on.
"""

from __future__ import annotations

from itertools import repeat

from dispatcher.zk.codec.paths import is_within
from dispatcher.zk.server.tree import DataTree, Txn

QUOTA_ROOT = "/zookeeper/quota"
LIMITS = "zookeeper_limits"
STATS = "zookeeper_stats"


class QuotaUsage:
    """Keeps every quota's stats node up to date as transactions change the tree."""

    def __init__(self, tree: DataTree) -> None:
        self.tree = tree
        self._roots = self._find_roots()

    def _find_roots(self) -> list[str]:
        """Paths with a limits node, deepest first (a change counts for the nearest)."""
        prefix = QUOTA_ROOT + "/"
        roots = [
            path[len(QUOTA_ROOT) : -len(LIMITS) - 1]
            for path in self.tree.nodes
            if path.startswith(prefix) and path.endswith("/" + LIMITS)
        ]
        return sorted(roots, key=len, reverse=True)

    @property
    def active(self) -> bool:
        """True while some quota is kept: only then may a write outside
        ``/zookeeper`` change a stats node."""
        return bool(self._roots)

    def account(self, txn: Txn) -> None:
        touched = txn.touched_paths
        # The prefix test first, in C (no generator frame): this runs on every write.
        if any(map(str.startswith, touched, repeat(QUOTA_ROOT))) and any(
            path.startswith(QUOTA_ROOT) and is_within(path, QUOTA_ROOT) for path in touched
        ):
            self._roots = self._find_roots()
            for path in touched:
                if path.endswith("/" + STATS) and txn.before(path) is None:
                    # A new stats node starts from the subtree's current usage.
                    quota_path = path[len(QUOTA_ROOT) : -len(STATS) - 1]
                    if quota_path in self.tree.nodes and path in self.tree.nodes:
                        self._write(txn, quota_path, *self._measure(quota_path))
        if not self._roots:
            return
        for path in touched:
            if is_within(path, "/zookeeper"):
                continue
            root = next((r for r in self._roots if is_within(path, r)), None)
            if root is None:
                continue
            before, after = txn.before(path), self.tree.nodes.get(path)
            count = (after is not None) - (before is not None)
            size = len((after and after.data) or b"") - len((before and before.data) or b"")
            if count or size:
                self._add(txn, root, count, size)

    def _measure(self, path: str) -> tuple[int, int]:
        count = size = 0
        stack = [path]
        while stack:
            current = stack.pop()
            node = self.tree.nodes[current]
            count += 1
            size += len(node.data or b"")
            stack.extend(f"{current}/{name}" for name in node.children)
        return count, size

    def _add(self, txn: Txn, root: str, count: int, size: int) -> None:
        stats = self.tree.nodes.get(f"{QUOTA_ROOT}{root}/{STATS}")
        if stats is None:
            return
        usage = _parse_usage(stats.data)
        if usage is None:
            # Anyone who may write the stats node can make it unreadable;
            # ZooKeeper 3.8 then fails every write below the quota root, and
            # again after every restart. Here it counts as no quota.
            return
        self._write(txn, root, usage[0] + count, usage[1] + size)

    def _write(self, txn: Txn, root: str, count: int, size: int) -> None:
        usage = f"count={count},bytes={size}".encode()
        txn.set_bookkeeping_data(f"{QUOTA_ROOT}{root}/{STATS}", usage)


def _parse_usage(data: bytes | None) -> tuple[int, int] | None:
    """``(count, bytes)`` from a stats node's ``count=N,bytes=M``; None if malformed."""
    try:
        fields = dict(
            item.split("=", 1) for item in (data or b"").decode("ascii").split(",") if "=" in item
        )
        return int(fields.get("count", 0)), int(fields.get("bytes", 0))
    except ValueError:  # UnicodeDecodeError and unparsable numbers alike
        return None
