"""The SQLite index of the token cache: one row per record, the LRU order and the byte totals.

Why SQLite: rows, LRU clock and totals must stay consistent across server processes sharing one
directory, and a ``BEGIN IMMEDIATE`` transaction is the cross-process write lock under which the
cache renames its files. A corrupt index is rebuilt empty rather than trusted. See docs/cache.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from fsutil import unlink_quietly

logger = logging.getLogger("token_cache")  # the cache speaks under one name, whichever module it is

SCHEMA_VERSION = 1  # SQLite ``user_version`` of the index

# Connections inherited through os.fork are kept referenced (never closed nor collected) in the child.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []

# SQLite's primary result codes that mean the disk refused a write (not a busy lock, not corruption)
_STORAGE_CODES = frozenset(
    (sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM)
)

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    layout TEXT NOT NULL,
    compute TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_seq ON entries(seq);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0),
                                   entries INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.bytes WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.bytes WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF bytes ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes + NEW.bytes WHERE id = 0; END;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_NEXT_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM entries)"  # the LRU clock: strictly ordered across processes


@dataclass(frozen=True)
class Row:
    """One record's index row: where its payload must match (bytes, sha256) and what it holds."""

    key: str
    fingerprint: str
    bytes: int
    sha256: str
    layout: dict[str, list[Any]]  # array name -> [dtype, shape]
    compute: float  # seconds the put's arrays cost to compute


def is_corruption(exc: BaseException) -> bool:
    """True for 'file is not a database' / 'database disk image is malformed'."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError


def is_storage_failure(exc: BaseException) -> bool:
    """True when the disk refused: read-only, full, no permission, I/O error (not a busy lock)."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _STORAGE_CODES
    return isinstance(exc, OSError)


class Transaction:
    """The statements the cache runs inside one write transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def upsert(self, row: Row) -> None:
        """Insert or replace ``row`` as the most recently used."""
        now = time.time()
        layout, compute = json.dumps(row.layout), json.dumps(row.compute)
        self.conn.execute(
            "INSERT INTO entries (key, fingerprint, bytes, sha256, layout, compute, seq, created, last_used)"
            f" VALUES (?, ?, ?, ?, ?, ?, {_NEXT_SEQ}, ?, ?) ON CONFLICT(key) DO UPDATE SET"
            " fingerprint = excluded.fingerprint, bytes = excluded.bytes, sha256 = excluded.sha256,"
            " layout = excluded.layout, compute = excluded.compute, seq = excluded.seq, last_used = excluded.last_used",
            (row.key, row.fingerprint, row.bytes, row.sha256, layout, compute, now, now),
        )

    def touch(self, key: str) -> None:
        """Make ``key`` the most recently used."""
        self.conn.execute(f"UPDATE entries SET seq = {_NEXT_SEQ}, last_used = ? WHERE key = ?", (time.time(), key))

    def delete(self, key: str, sha256: str | None = None) -> bool:
        """Drop ``key``'s row (only if it still has ``sha256``, when given); whether one went."""
        if sha256 is None:
            return self.conn.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount > 0
        return self.conn.execute("DELETE FROM entries WHERE key = ? AND sha256 = ?", (key, sha256)).rowcount > 0

    def delete_all(self) -> None:
        self.conn.execute("DELETE FROM entries")

    def keys(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT key FROM entries")]

    def total_bytes(self) -> int:
        return int(self.conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])

    def oldest(self, keep: str, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` (key, bytes) of the least recently used rows, ``keep`` left out."""
        rows = self.conn.execute("SELECT key, bytes FROM entries WHERE key != ? ORDER BY seq LIMIT ?", (keep, limit))
        return [(str(k), int(b)) for k, b in rows]


class CacheIndex:
    """One connection per object (and per process after a fork), guarded by a lock.

    ``on_rebuilt`` runs inside the transaction that follows rebuilding a corrupt index empty: the
    cache removes the payload files the lost rows described, and returns how many went.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int, on_rebuilt: Callable[[Transaction], int]) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._on_rebuilt = on_rebuilt
        self._rebuild_lock = FileLock(str(self.path.with_name("index.lock")))
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn_ident: tuple[int, int, int] | None = None  # (pid, st_dev, st_ino)

    def row(self, key: str) -> Row | None:
        """``key``'s row; None when absent (or the index was found corrupt, and rebuilt empty)."""
        with self._lock:
            try:
                r = (
                    self._connection()
                    .execute("SELECT fingerprint, bytes, sha256, layout, compute FROM entries WHERE key = ?", (key,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                if not is_corruption(exc):
                    raise
                self._rebuild(exc)
                return None
        if r is None:
            return None
        try:
            layout = json.loads(r[3])
        except (ValueError, TypeError):
            layout = {}  # undecodable metadata: the payload check fails it
        return Row(key, r[0], int(r[1]), r[2], layout, _compute_seconds(r[4]))

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) of the whole index, across processes."""
        with self._lock:
            try:
                row = self._connection().execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
            except sqlite3.Error as exc:
                if not is_corruption(exc):
                    raise
                self._rebuild(exc)
                return (0, 0)
        return (int(row[0]), int(row[1])) if row else (0, 0)

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        """A ``BEGIN IMMEDIATE`` transaction (the cross-process write lock), committed on success."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if not is_corruption(exc):
                    raise
                conn = self._rebuild(exc)
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if is_corruption(exc):
                    self._rebuild(exc)
                raise

    def close(self) -> None:
        """Close the connection (the next use reopens it)."""
        with self._lock:
            if self._conn is not None:
                if self._conn_ident is not None and self._conn_ident[0] == os.getpid():
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.close()
                else:  # inherited through fork: closing it here could disturb the parent's locks
                    _INHERITED_CONNECTIONS.append(self._conn)
            self._conn = None
            self._conn_ident = None

    def _connection(self) -> sqlite3.Connection:
        """The open connection; (re)opened after a fork or when the index file was replaced."""
        try:
            st = os.stat(self.path)
            ident = (os.getpid(), st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if self._conn is not None and ident == self._conn_ident:
            return self._conn
        self.close()
        try:
            self._conn = self._open()
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise
            return self._rebuild(exc)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        timeout_s = self.busy_timeout_ms / 1000
        conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            _enable_wal(conn, timeout_s)
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"index schema {version} is not {SCHEMA_VERSION}")
            if version == 0:
                conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        st = os.stat(self.path)
        self._conn_ident = (os.getpid(), st.st_dev, st.st_ino)
        return conn

    def _rebuild(self, exc: BaseException) -> sqlite3.Connection:
        """Rebuild a corrupt index empty (one process at a time) and let the cache drop its files.

        Other processes notice the new file (by inode) on their next operation and reopen it.
        """
        with self._lock:
            self.close()
            with self._rebuild_lock:
                try:  # another process may have rebuilt it while we waited for the lock
                    self._conn = self._open()
                    if self._conn.execute("PRAGMA quick_check").fetchone()[0] == "ok":
                        return self._conn
                    raise sqlite3.DatabaseError("quick_check failed")
                except sqlite3.Error as again:
                    if not is_corruption(again):
                        raise
                    self.close()
                logger.warning("token cache: index %s is damaged (%s); rebuilding it empty", self.path, exc)
                for suffix in ("", "-wal", "-shm"):
                    unlink_quietly(f"{self.path}{suffix}")
                self._conn = conn = self._open()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    removed = self._on_rebuilt(Transaction(conn))
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                logger.warning("token cache: removed %d payload files orphaned by the damaged index", removed)
                return conn


def _compute_seconds(text: str) -> float:
    """The ``compute`` column: a JSON number. An index of an older format holds a list there under
    the same schema version, so anything else counts as 0 s saved rather than failing the lookup."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return 0.0
    return float(value) if isinstance(value, int | float) else 0.0


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the index to WAL mode (persistent once set).

    The switch needs an exclusive lock and SQLite answers SQLITE_BUSY at once, without the busy
    handler, when another process opens a fresh index at the same moment: retry until the
    other one has switched it (the mode is per file) or the busy timeout is spent.
    """
    deadline = time.monotonic() + timeout_s
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
