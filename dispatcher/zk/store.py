"""Durability of the embedded tree: SQLite in WAL mode with full sync.

A write is answered only after its transaction is committed here, so an
acknowledged write survives a crash. Each open bumps a boot counter: zxids and
session ids are drawn above every value an earlier run could have handed out.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from dispatcher.zk.jute import Reader, Writer
from dispatcher.zk.records import read_acls, write_acls
from dispatcher.zk.tree import DataTree, Znode

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


def _encode_acl(node: Znode) -> bytes:
    w = Writer()
    write_acls(w, node.acl)
    return bytes(w.out)


class StoreError(RuntimeError):
    """The data directory cannot be used."""


class TreeStore:
    """The on-disk copy of a :class:`DataTree` under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(data_dir / "tree.sqlite3", isolation_level=None)
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
        for path, data, acl, *numbers in rows:
            czxid, mzxid, ctime, mtime, version, cversion, aversion, owner, pzxid, creates = numbers
            node = Znode(data, read_acls(Reader(acl)) or (), czxid, mzxid, ctime, mtime,
                         version, cversion, aversion, owner, pzxid, creates)  # fmt: skip
            existing = tree.nodes.get(path)
            if existing is not None:
                node.children |= existing.children
            tree.load(path, node)
        return len(rows)

    def commit(self, tree: DataTree, paths: Iterable[str]) -> None:
        """Write the current state of ``paths`` (present or deleted) durably."""
        upserts = []
        deletes = []
        for path in paths:
            node = tree.nodes.get(path)
            if node is None:
                deletes.append((path,))
            else:
                upserts.append((
                    path, node.data, _encode_acl(node), node.czxid, node.mzxid, node.ctime,
                    node.mtime, node.version, node.cversion, node.aversion,
                    node.ephemeral_owner, node.pzxid, node.child_creates,
                ))  # fmt: skip
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if deletes:
                db.executemany("DELETE FROM znodes WHERE path = ?", deletes)
            if upserts:
                db.executemany(
                    "INSERT OR REPLACE INTO znodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", upserts
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()
