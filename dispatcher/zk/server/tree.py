"""The znode tree: ZooKeeper's ``DataTree`` as plain synchronous state.

Mutations go through a :class:`Txn`, which remembers every node it touched so
that a failed ``multi`` can be rolled back and a committed one persisted and
announced. Nothing here allocates zxids, checks permissions or knows about
sockets: the engine does that around it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

import attrs

from dispatcher.zk.codec.jute import Writer
from dispatcher.zk.codec.paths import basename, parent_of
from dispatcher.zk.codec.protocol import EventType
from dispatcher.zk.codec.records import ACL, Id, Stat

#: ``ephemeralOwner`` of a container node (ZooKeeper's ``EphemeralType.CONTAINER``).
CONTAINER_OWNER = -(1 << 63)
#: TTL nodes carry their TTL in the low bits of ``ephemeralOwner`` behind a
#: 0xFF top byte (ZooKeeper's ``EphemeralType.TTL``), a negative long.
_TTL_TOP = 0xFF
_TTL_BITS = (1 << 56) - 1
#: The largest TTL ZooKeeper accepts (``EphemeralType.TTL``'s maximum), in ms.
MAX_TTL_MS = (1 << 40) - 1


def ttl_owner(ttl_ms: int) -> int:
    """The ``ephemeralOwner`` that marks a TTL node, as a signed 64-bit value."""
    return ((_TTL_TOP << 56) | ttl_ms) - (1 << 64)


#: Stat's jute encoding (czxid, mzxid, ctime, mtime, version, cversion,
#: aversion, ephemeralOwner, dataLength, numChildren, pzxid).
_STAT = struct.Struct(">qqqqiiiqiiq")

READ_ONLY_WORLD = (ACL(1, Id("world", "anyone")),)
OPEN_WORLD = (ACL(31, Id("world", "anyone")),)


def world_perms(acl: tuple[ACL, ...]) -> int:
    perms = 0
    for entry in acl:
        if entry.id.scheme == "world" and entry.id.id == "anyone":
            perms |= entry.perms
    return perms


def encode_data_body(data: bytes | None, stat_bytes: bytes) -> bytes:
    """A getData reply body: the data, then the encoded Stat."""
    w = Writer()
    w.buffer(data)
    return bytes(w.out) + stat_bytes


def encode_children(children: Iterable[str]) -> bytes:
    """A getChildren reply body: the child names, sorted."""
    w = Writer()
    w.vector(sorted(children), Writer.ustring)
    return bytes(w.out)


@attrs.define(slots=True, eq=False)
class Znode:
    data: bytes | None
    acl: tuple[ACL, ...]
    czxid: int
    mzxid: int
    ctime: int
    mtime: int
    version: int = 0
    cversion: int = 0
    aversion: int = 0
    ephemeral_owner: int = 0
    pzxid: int = 0
    #: Children ever created here. ZooKeeper 3.8 names sequential children from
    #: this count, not from cversion, which deletes bump too (observed: create
    #: and delete a child, and the next sequential child is ...0001 while
    #: cversion is 2).
    child_creates: int = 0
    children: set[str] = attrs.Factory(set)
    #: What world:anyone may do here: most reads pass the ACL check on this alone.
    world_perms: int = attrs.field(init=False, default=0)
    # What every read of an unchanged node answers with is encoded once per
    # change instead of once per read: reads are the registry's hot path.
    _stat_bytes: bytes | None = None
    _data_body: bytes | None = None
    _children_body: bytes | None = None

    def __attrs_post_init__(self) -> None:
        self.world_perms = world_perms(self.acl)

    def stat(self) -> Stat:
        return Stat(
            self.czxid, self.mzxid, self.ctime, self.mtime, self.version, self.cversion,
            self.aversion, self.client_owner, len(self.data or b""), len(self.children),
            self.pzxid,
        )  # fmt: skip

    def stat_bytes(self) -> bytes:
        """The encoded Stat, as :meth:`stat` would encode: packed in one call,
        as every write's reply carries one and the next read reuses it."""
        if self._stat_bytes is None:
            data = self.data
            owner = self.ephemeral_owner
            self._stat_bytes = _STAT.pack(
                self.czxid, self.mzxid, self.ctime, self.mtime, self.version, self.cversion,
                self.aversion, owner if owner > 0 else 0, 0 if data is None else len(data),
                len(self.children), self.pzxid,
            )  # fmt: skip
        return self._stat_bytes

    def data_body(self) -> bytes:
        """The encoded getData reply body: data then Stat."""
        if self._data_body is None:
            self._data_body = encode_data_body(self.data, self.stat_bytes())
        return self._data_body

    def children_body(self) -> bytes:
        """The encoded getChildren reply body: the sorted child names."""
        if self._children_body is None:
            self._children_body = encode_children(self.children)
        return self._children_body

    def touched(self) -> None:
        self._stat_bytes = self._data_body = self._children_body = None

    @property
    def is_ephemeral(self) -> bool:
        """Owned by a session (containers and TTL nodes have negative owners)."""
        return self.ephemeral_owner > 0

    @property
    def is_container(self) -> bool:
        return self.ephemeral_owner == CONTAINER_OWNER

    @property
    def ttl(self) -> int | None:
        owner = self.ephemeral_owner
        if owner < 0 and owner != CONTAINER_OWNER and ((owner >> 56) & 0xFF) == _TTL_TOP:
            return owner & _TTL_BITS
        return None

    @property
    def client_owner(self) -> int:
        """The ephemeralOwner clients see: ZooKeeper 3.8 shows 0 for containers and TTLs."""
        return self.ephemeral_owner if self.ephemeral_owner > 0 else 0


class Trigger(NamedTuple):
    """A watch to fire once the transaction that caused it commits.

    A tuple rather than a frozen class: every write makes two of them.
    """

    path: str
    event: EventType
    #: The ACL of the znode the event is about: ZooKeeper 3.8 (as patched for
    #: CVE-2024-23944) tells only watchers that may READ it. None: unknown.
    acl: tuple[ACL, ...] | None = None


class DataTree:
    """Every znode by path, and the ephemerals each session owns."""

    def __init__(self) -> None:
        root = Znode(b"", OPEN_WORLD, 0, 0, 0, 0)
        self.nodes: dict[str, Znode] = {"/": root}
        self.ephemerals: dict[int, set[str]] = {}
        #: Containers and TTL nodes, which the reaper visits (ZooKeeper keeps
        #: the same two sets, so a check never walks the whole tree).
        self.containers: set[str] = set()
        self.ttls: set[str] = set()
        # ZooKeeper's own subtree exists on every server and clients list it.
        # Its odd counters (cversion -1 and -2, aversion -1) are what a fresh
        # ZooKeeper 3.8 reports, and differential tests compare them.
        self._insert_system("/zookeeper", OPEN_WORLD)
        self._insert_system("/zookeeper/quota", OPEN_WORLD)
        self._insert_system("/zookeeper/config", READ_ONLY_WORLD)
        root.cversion = -1
        self.nodes["/zookeeper"].cversion = -2
        self.nodes["/zookeeper/config"].aversion = -1

    def _insert_system(self, path: str, acl: tuple[ACL, ...]) -> None:
        self.nodes[path] = Znode(b"", acl, 0, 0, 0, 0)
        self.nodes[parent_of(path)].children.add(basename(path))

    def get(self, path: str) -> Znode | None:
        # ZooKeeper's DataTree also files the root under "", and answers it.
        return self.nodes.get(path or "/")

    @property
    def approximate_data_size(self) -> int:
        return sum(len(path) + len(node.data or b"") for path, node in self.nodes.items())

    def descendants(self, path: str) -> int:
        """How many nodes lie below ``path`` (getAllChildrenNumber)."""
        count = 0
        stack = [path or "/"]
        while stack:
            node_path = stack.pop()
            node = self.nodes[node_path]
            count += len(node.children)
            prefix = "" if node_path == "/" else node_path
            stack.extend(f"{prefix}/{name}" for name in node.children)
        return count

    def load(self, path: str, node: Znode) -> None:
        """Insert a node read back from disk; parents are loaded first."""
        self.nodes[path] = node
        if path != "/":
            self.nodes[parent_of(path)].children.add(basename(path))
        self.index(path, node)

    def index(self, path: str, node: Znode) -> None:
        """File ``node`` under its owner or kind."""
        if not node.ephemeral_owner:
            return  # a plain persistent znode, filed nowhere: most of them
        if node.is_ephemeral:
            self.ephemerals.setdefault(node.ephemeral_owner, set()).add(path)
        elif node.is_container:
            self.containers.add(path)
        elif node.ttl is not None:
            self.ttls.add(path)

    def unindex(self, path: str, node: Znode) -> None:
        if not node.ephemeral_owner:
            return  # filed nowhere (see index)
        if node.is_ephemeral:
            owned = self.ephemerals.get(node.ephemeral_owner)
            if owned is not None:
                owned.discard(path)
                if not owned:
                    del self.ephemerals[node.ephemeral_owner]
        self.containers.discard(path)
        self.ttls.discard(path)


class Saved(NamedTuple):
    """A node's fields that a transaction may overwrite, as they were before it."""

    node: Znode
    data: bytes | None
    acl: tuple[ACL, ...]
    world_perms: int
    version: int
    cversion: int
    aversion: int
    mzxid: int
    mtime: int
    pzxid: int
    child_creates: int

    @classmethod
    def of(cls, node: Znode) -> Saved:
        return cls(
            node, node.data, node.acl, node.world_perms, node.version, node.cversion,
            node.aversion, node.mzxid, node.mtime, node.pzxid, node.child_creates,
        )  # fmt: skip

    def restore(self) -> Znode:
        node = self.node
        (_, node.data, node.acl, node.world_perms, node.version, node.cversion, node.aversion,
         node.mzxid, node.mtime, node.pzxid, node.child_creates) = self  # fmt: skip
        node.touched()
        return node


class Txn:
    """One atomic change of a :class:`DataTree`, undoable until committed."""

    def __init__(self, tree: DataTree, zxid: int, time_ms: int) -> None:
        self.tree = tree
        self.zxid = zxid
        self.time = time_ms
        self.triggers: list[Trigger] = []
        # path -> the node and its fields as they were before this txn first
        # touched it (None: absent). Its children set is not copied (that would
        # make a write under a parent with n children cost O(n)): its changes
        # are undone from _child_changes.
        self._before: dict[str, Saved | None] = {}
        # (a children set, a name, True if added), in the order they happened.
        self._child_changes: list[tuple[set[str], str, bool]] = []

    @property
    def touched_paths(self) -> list[str]:
        return list(self._before)

    def _remember(self, path: str) -> None:
        if path not in self._before:
            node = self.tree.nodes.get(path)
            self._before[path] = None if node is None else Saved.of(node)

    def create(
        self, path: str, data: bytes | None, acl: tuple[ACL, ...], ephemeral_owner: int
    ) -> Znode:
        tree = self.tree
        parent_path = parent_of(path)
        self._remember(path)
        self._remember(parent_path)
        node = Znode(data, acl, self.zxid, self.zxid, self.time, self.time,
                     ephemeral_owner=ephemeral_owner, pzxid=self.zxid)  # fmt: skip
        tree.nodes[path] = node
        parent = tree.nodes[parent_path]
        name = basename(path)
        parent.children.add(name)
        self._child_changes.append((parent.children, name, True))
        parent.cversion += 1
        parent.child_creates += 1
        parent.pzxid = self.zxid
        parent.touched()
        tree.index(path, node)
        self.triggers.append(Trigger(path, EventType.NODE_CREATED, acl))
        self.triggers.append(Trigger(parent_path, EventType.NODE_CHILDREN_CHANGED, parent.acl))
        return node

    def delete(self, path: str) -> None:
        tree = self.tree
        parent_path = parent_of(path)
        self._remember(path)
        self._remember(parent_path)
        node = tree.nodes.pop(path)
        parent = tree.nodes[parent_path]
        name = basename(path)
        parent.children.discard(name)
        self._child_changes.append((parent.children, name, False))
        parent.cversion += 1
        parent.pzxid = self.zxid
        parent.touched()
        tree.unindex(path, node)
        self.triggers.append(Trigger(path, EventType.NODE_DELETED, node.acl))
        self.triggers.append(Trigger(parent_path, EventType.NODE_CHILDREN_CHANGED, parent.acl))

    def set_data(self, path: str, data: bytes | None, version: int) -> Znode:
        self._remember(path)
        node = self.tree.nodes[path]
        node.data = data
        node.version = version
        node.mzxid = self.zxid
        node.mtime = self.time
        node.touched()
        self.triggers.append(Trigger(path, EventType.NODE_DATA_CHANGED, node.acl))
        return node

    def set_bookkeeping_data(self, path: str, data: bytes) -> None:
        """Replace a node's data as ZooKeeper does for its own bookkeeping (quota
        usage): no version, no mzxid, no watch; stored with the transaction."""
        self._remember(path)
        node = self.tree.nodes[path]
        node.data = data
        node.touched()

    def before(self, path: str) -> Saved | None:
        """The node as it was before this txn touched it (None: it did not exist)."""
        return self._before[path]

    def set_acl(self, path: str, acl: tuple[ACL, ...], aversion: int) -> Znode:
        self._remember(path)
        node = self.tree.nodes[path]
        node.acl = acl
        node.world_perms = world_perms(acl)
        node.aversion = aversion
        node.touched()
        return node

    def rollback(self) -> None:
        """Put every touched node back as it was before this txn."""
        tree = self.tree
        for children, name, added in reversed(self._child_changes):
            if added:
                children.discard(name)
            else:
                children.add(name)
        self._child_changes.clear()
        for path, saved in reversed(list(self._before.items())):
            current = tree.nodes.get(path)
            if current is not None:
                tree.unindex(path, current)
            if saved is None:
                tree.nodes.pop(path, None)
            else:
                node = tree.nodes[path] = saved.restore()
                tree.index(path, node)
        self._before.clear()
        self.triggers.clear()
