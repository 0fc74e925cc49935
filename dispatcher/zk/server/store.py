"""Durability of the embedded tree: SQLite in WAL mode with full sync.

A write is answered only after its transaction is committed here, so an
acknowledged write survives a crash. Each open bumps a boot counter: zxids and
session ids are drawn above every value an earlier run could have handed out.

One data directory serves one process: the store holds an exclusive lock on
``data_dir/zkgate.lock`` (which names the holder's pid) while it is open, so a
second zkgate on the same directory stops instead of serving a copy of the tree
that would diverge from the first one's.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from dispatcher.zk.codec.jute import Reader, Writer
from dispatcher.zk.codec.records import ACL, read_acls, write_acls
from dispatcher.zk.server.tree import DataTree, Znode

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS znodes (
    path TEXT PRIMARY KEY,
    data BLOB,
    acl BLOB NOT NULL,
    czxid INTEGER NOT NULL,
    mzxid INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    version INTEGER NOT NULL,
    cversion INTEGER NOT NULL,
    aversion INTEGER NOT NULL,
    ephemeral_owner INTEGER NOT NULL,
    pzxid INTEGER NOT NULL,
    child_creates INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _encode_acl(acl: tuple[ACL, ...]) -> bytes:
    w = Writer()
    write_acls(w, acl)
    return bytes(w.out)


#: Rows one statement writes at most. Statements hold a power of two of rows,
#: so that a few statements, each compiled once, write groups of every size.
_ROWS_PER_STATEMENT = 512
_COLUMNS = 13
_ROW = "(" + ",".join(["?"] * _COLUMNS) + ")"


#: Every column but the key, as an upsert's update sets them.
_UPDATE_ALL = ", ".join(
    f"{column}=excluded.{column}"
    for column in (
        "data", "acl", "czxid", "mzxid", "ctime", "mtime", "version", "cversion", "aversion",
        "ephemeral_owner", "pzxid", "child_creates",
    )
)  # fmt: skip


@functools.cache
def _upsert(rows: int) -> str:
    # An update of the existing row, not INSERT OR REPLACE: that deletes the
    # row and inserts it again, index entry included, where a setData (most
    # rows of a busy group) changes no key; half the SQLite time per row.
    return (
        "INSERT INTO znodes VALUES "
        + ",".join([_ROW] * rows)
        + f" ON CONFLICT(path) DO UPDATE SET {_UPDATE_ALL}"
    )


@functools.cache
def _delete(rows: int) -> str:
    return "DELETE FROM znodes WHERE path IN (" + ",".join(["?"] * rows) + ")"


def _chunks(count: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the statements that write ``count`` rows, ``most``
    (a power of two) at a time, then the rest by its binary digits."""
    start = 0
    size = most
    while start < count:
        while size > count - start:
            size >>= 1
        yield start, size
        start += size


class StoreError(RuntimeError):
    """The data directory cannot be used."""


LOCK_FILE = "zkgate.lock"
#: Distinct encoded ACLs kept for writes (more are encoded each time).
_ACL_CACHE = 1024


def _lock(data_dir: Path) -> int:
    """Take the data directory's lock and write our pid in it; the lock's descriptor.

    ``flock`` is released by the kernel when the process ends however it ends,
    so a crashed zkgate never leaves a stale lock behind; the pid in the file is
    only there to tell the second process whom it met.
    """
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise StoreError(
            f"data directory {data_dir} is in use by another zkgate "
            f"(pid {holder or 'unknown'}, holding {path}); stop it, or give this one "
            "another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class TreeStore:
    """The on-disk copy of a :class:`DataTree` under ``data_dir``, locked to this process."""

    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {data_dir}: {exc.strerror or exc}") from None
        self._lock: int | None = _lock(data_dir)
        self._acls: dict[tuple[ACL, ...], bytes] = {}
        # The same ACL tuples, by identity: a znode keeps its tuple, so the
        # parents and setData targets of most writes find theirs here without
        # hashing the ACL's records. Each entry holds its tuple, so an id
        # cannot be reused while it is in here.
        self._acls_by_id: dict[int, tuple[tuple[ACL, ...], bytes]] = {}
        try:
            self._open(data_dir)
        except BaseException:
            os.close(self._lock)
            self._lock = None
            raise

    def _open(self, data_dir: Path) -> None:
        # Commits of a group run in a worker thread (one at a time, see
        # dispatcher.zk.server.durability), everything else in the event loop's.
        self._db = sqlite3.connect(
            data_dir / "tree.sqlite3", isolation_level=None, check_same_thread=False
        )
        # As many rows per statement as the library's variable limit allows
        # (32,766 since SQLite 3.32, 999 before), a power of two, at most 512.
        variables = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._rows_per_statement = min(
            _ROWS_PER_STATEMENT, 1 << (max(variables // _COLUMNS, 1).bit_length() - 1)
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(znodes)")}
        if "child_creates" not in columns:
            raise StoreError(
                f"{data_dir} holds a tree written by an older, incompatible zkgate; "
                "move it away to start afresh"
            )
        self._db.execute("BEGIN IMMEDIATE")
        self.boot = self._meta("boots", 0) + 1
        self._db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('boots', ?)", (self.boot,)
        )
        self._db.execute("COMMIT")

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def load(self, tree: DataTree) -> int:
        """Fill ``tree`` from disk and return the number of znodes read."""
        rows = self._db.execute("SELECT * FROM znodes").fetchall()
        # Parents before children, so every child finds its parent's children set.
        rows.sort(key=lambda row: (row[0].count("/"), row[0] != "/"))
        # Znodes with the same ACL share one tuple (decoded once), as the
        # engine's new znodes do.
        decoded: dict[bytes, tuple[ACL, ...]] = {}
        for path, data, acl, *numbers in rows:
            czxid, mzxid, ctime, mtime, version, cversion, aversion, owner, pzxid, creates = numbers
            entries = decoded.get(acl)
            if entries is None:
                entries = decoded[acl] = read_acls(Reader(acl)) or ()
            node = Znode(data, entries, czxid, mzxid, ctime, mtime,
                         version, cversion, aversion, owner, pzxid, creates)  # fmt: skip
            existing = tree.nodes.get(path)
            if existing is not None:
                node.children |= existing.children
            tree.load(path, node)
        return len(rows)

    def commit(self, tree: DataTree, paths: Iterable[str]) -> None:
        """Write the current state of ``paths`` (present or deleted) durably."""
        self.prepare_commit(tree, paths)()

    def prepare_commit(self, tree: DataTree, paths: Iterable[str]) -> Callable[[], None]:
        """Read the current state of ``paths`` now; the function returned
        writes it durably (in one transaction, one fsync), from any thread."""
        upserts = []
        deletes = []
        for path in paths:
            node = tree.nodes.get(path)
            if node is None:
                deletes.append((path,))
            else:
                upserts.append((
                    path, node.data, self._acl_bytes(node.acl), node.czxid, node.mzxid, node.ctime,
                    node.mtime, node.version, node.cversion, node.aversion,
                    node.ephemeral_owner, node.pzxid, node.child_creates,
                ))  # fmt: skip
        return functools.partial(self._write, upserts, deletes)

    def _acl_bytes(self, acl: tuple[ACL, ...]) -> bytes:
        # Most znodes share a handful of ACLs, and every write stores its node's.
        known = self._acls_by_id.get(id(acl))
        if known is not None and known[0] is acl:
            return known[1]
        encoded = self._acls.get(acl)
        if encoded is None:
            encoded = _encode_acl(acl)
            if len(self._acls) < _ACL_CACHE:
                self._acls[acl] = encoded
        if len(self._acls_by_id) < _ACL_CACHE:
            self._acls_by_id[id(acl)] = (acl, encoded)
        return encoded

    def _write(self, upserts: Sequence[tuple[object, ...]], deletes: Sequence[tuple[str]]) -> None:
        # Many rows per statement: sqlite3 lets the GIL go for each step and
        # must take it back after, so a statement per row would have this
        # thread (in the group commit's worker) wait for the event loop's
        # thread twice per row, and interrupt it as often.
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            most = self._rows_per_statement
            for start, size in _chunks(len(deletes), most):
                db.execute(_delete(size), [path for (path,) in deletes[start : start + size]])
            for start, size in _chunks(len(upserts), most):
                db.execute(_upsert(size), list(chain.from_iterable(upserts[start : start + size])))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database, then let the data directory go."""
        try:
            self._db.close()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
