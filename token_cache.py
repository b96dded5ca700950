"""Persistent, content-addressed cache of named numpy arrays: one record per prompt audio.

Why: preparing a prompt costs seconds (paraformer encoder + S3 tokenizer, prompt mel, speaker
embedding), and a server sees the same reference voice again and again. The cache makes a
repeated prompt one millisecond disk read, survives restarts and is shared by every server
process pointed at the same directory. The engine owns the record (what it holds and the
fingerprint); this module only stores named arrays under a key.

Layout under ``<directory>/wav2token/``::

    index.sqlite3        SQLite (WAL) index: one row per entry (key, fingerprint, bytes,
                         sha256 of the payload, array names/dtypes/shapes, compute seconds,
                         LRU sequence number), plus running totals kept by triggers.
    ab/<key>.npz         the payload: a zip of ``.npy`` members (``np.savez_compressed``),
                         read back with ``allow_pickle=False``; ``ab`` = the key's first two
                         hex digits, so no directory grows past 1/256 of the entries.
    tmp/                 payloads being written (``<owner>.<key>.<thread>.tmp``) and one
                         ``<owner>.lock`` per live cache object (``<owner>`` = pid + random).

Design decisions:

* **Key** = :func:`content_key` of the decoded, prepared samples and their sample rate, never a
  file name. The **fingerprint** (:func:`fingerprint_of`: model files, codebook, ONNX,
  preprocessing settings, :data:`FORMAT_VERSION`) is stored in the row; a row with another
  fingerprint is a miss and the next ``put`` overwrites it, so new weights never serve stale
  tokens.
* **Atomic writes**: the payload is written to a temp file in ``tmp/``, fsynced, then
  ``os.replace``-d into place *inside* the index's write transaction, so the file that sits
  under a key and the checksum in its row change together. ``put`` replaces the whole record
  (one writer per record: the engine computes every array of a prompt, then puts them at
  once); two processes putting the same key both write complete records, the last one wins.
* **Temp files are bounded**: each cache object holds an exclusive ``flock`` on its own
  ``tmp/<owner>.lock`` for its lifetime and names its temp files after it. A writer killed
  mid-write (``kill -9``, OOM) leaves a temp file whose lock the kernel has released; every
  ``put`` (and the start-up check) takes the locks it can, which only succeeds for dead owners,
  and removes their temp files at once, whatever their age. ``flock`` works across processes
  and containers on one host, where pids alone would not (pid namespaces). So the temp bytes
  on disk never exceed one payload per writing thread alive, plus what died since the last put.
* **LRU across restarts and processes**: every hit bumps the row's sequence number (a logical
  clock, ``MAX(seq) + 1`` inside a write transaction, so it is strictly ordered across
  processes and immune to wall-clock ties). Eviction walks the ``seq`` index from the oldest
  row until the byte total (kept by triggers) is within budget: cost is proportional to what
  is evicted, never a directory scan. The budget counts payload bytes (the files), not the
  small index.
* **Damage is a miss, never a crash or a wrong answer**: every read checks size and sha256
  against the row, then decodes with ``allow_pickle=False`` and checks names, dtypes and
  shapes. A damaged/missing file or a row without file is a miss whose row is dropped
  (logged as a repair); a file without row is simply overwritten by the next ``put``. A
  corrupt index is rebuilt empty (under a file lock, so only one process does it) and the
  then-orphaned payload files are removed. Operational failures (disk full, a lock held past
  the busy timeout) are logged and turn into a miss / a skipped write: the cache is an
  optimisation and must never fail a request.
* **Threads**: one SQLite connection per cache object, guarded by a lock; file reads and
  payload encoding happen outside it. A forked child reconnects.

* **Stats**: hits, misses and ``time_saved_s`` count this object's lookups (one server
  process); ``entries`` and ``bytes`` are the shared index's totals. ``time_saved_s`` adds, per
  hit, the ``compute_seconds`` measured by the put that wrote the record.

Known limits: the index relies on SQLite WAL, i.e. POSIX locks and shared memory on one host,
so do not share the directory between hosts over a network file system. Rebuilding a corrupt
index deletes and recreates the index file; other processes notice the new file (by inode) on
their next operation and reopen it, but a write racing that switch may be lost (a miss later).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from filelock import FileLock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the payload layout or the meaning of stored arrays changes (2: one record)
SCHEMA_VERSION = 1  # SQLite ``user_version`` of the index
NAMESPACE = "wav2token"  # sub-directory of the cache directory owned by this cache
INDEX_NAME = "index.sqlite3"
LOCK_NAME = "index.lock"  # file lock taken only to rebuild a corrupt index
PAYLOAD_SUFFIX = ".npz"
TEMP_DIR = "tmp"  # payloads being written, and the lock of each live writer
TEMP_SUFFIX = ".tmp"
OWNER_LOCK_SUFFIX = ".lock"
STALE_TEMP_SECONDS = 600.0  # a temp file of the old layout (in a shard) older than this is a crashed writer's
BUSY_TIMEOUT_MS = 30_000  # how long a process waits for another's write transaction
EVICT_BATCH = 64  # rows fetched per eviction query

# fingerprint_of: files up to FULL_HASH_LIMIT are hashed entirely (codebook, configs, small
# ONNX); bigger ones (multi-GB weights) by identity + their first and last EDGE_BYTES, so a
# server start does not read gigabytes. size + mtime_ns catch an in-place replacement whose
# edges happen to be equal.
FULL_HASH_LIMIT = 64 * 1024**2  # 64 MiB
EDGE_BYTES = 4 * 1024**2  # 4 MiB
_READ_CHUNK = 1024**2

# Connections inherited through os.fork are kept referenced (never closed nor collected) in the child.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []

_KEY_RE = re.compile(r"^[0-9A-Za-z_-]{8,128}$")
_NAME_RE = re.compile(r"^[A-Za-z_][0-9A-Za-z_]{0,63}$")


# --------------------------------------------------------------------------- keys + fingerprints


def content_key(wav: Any, sample_rate: int) -> str:
    """sha256 hex of the prepared samples (as little-endian float32) and their sample rate.

    ``wav`` is a numpy array or torch tensor; leading/trailing singleton axes are ignored, so a
    ``(1, n)`` prompt and its ``(n,)`` view share a key, while the shape after squeezing is
    hashed so that ``(2, n)`` and ``(1, 2n)`` do not collide.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if hasattr(wav, "detach"):  # torch.Tensor, without importing torch here
        wav = wav.detach().cpu().float().numpy()
    samples = np.ascontiguousarray(np.squeeze(np.asarray(wav)), dtype="<f4")
    h = hashlib.sha256()
    h.update(b"step-audio-content-key-v1\0")
    h.update(json.dumps([int(sample_rate), list(samples.shape)]).encode())
    h.update(samples.tobytes())
    return h.hexdigest()


_file_digest_memo: dict[tuple[str, int, int, int, int], str] = {}
_memo_lock = threading.Lock()


def _file_digest(path: Path) -> str:
    """Content digest of one file (see FULL_HASH_LIMIT / EDGE_BYTES), memoised per identity."""
    st = path.stat()
    ident = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if ident in _file_digest_memo:
            return _file_digest_memo[ident]
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            h.update(b"full\0")
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
        else:
            h.update(f"edges\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            h.update(f.read(EDGE_BYTES))
            f.seek(st.st_size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    digest = h.hexdigest()
    with _memo_lock:
        _file_digest_memo[ident] = digest
    return digest


def fingerprint_of(paths: Iterable[Path | str], **settings: Any) -> str:
    """Stable hash of the files (or directories, recursively) and settings that shape the tokens.

    Files are identified by their name relative to the given path (not the absolute location,
    so moving a bundle keeps its cache) and their content digest: full sha256 below 64 MiB,
    size + mtime_ns + first/last 4 MiB above. ``settings`` must be JSON-able (others are
    ``str()``-ed); :data:`FORMAT_VERSION` is always included.
    """
    h = hashlib.sha256()
    h.update(f"step-audio-cache-fingerprint\0format={FORMAT_VERSION}\0".encode())
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            h.update(f"dir\0{p.name}\0{len(files)}\0".encode())
            for q in files:
                h.update(f"{q.relative_to(p).as_posix()}\0{_file_digest(q)}\0".encode())
        elif p.is_file():
            h.update(f"file\0{p.name}\0{_file_digest(p)}\0".encode())
        else:
            raise FileNotFoundError(f"fingerprint_of: {p} does not exist")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- payload codec


def _encode(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, list[Any]]]:
    """Arrays -> (npz bytes, {name: [dtype, shape]}) without pickle."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **cast(dict[str, Any], arrays))
    layout = {name: [a.dtype.str, list(a.shape)] for name, a in sorted(arrays.items())}
    return buf.getvalue(), layout


def _decode(payload: bytes, layout: Mapping[str, list[Any]]) -> dict[str, np.ndarray]:
    """npz bytes -> arrays, checked against the row's layout; raises ValueError when they differ."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        if sorted(npz.files) != sorted(layout):
            raise ValueError(f"array names {sorted(npz.files)} != index {sorted(layout)}")
        out = {name: npz[name] for name in npz.files}
    for name, a in out.items():
        dtype, shape = layout[name]
        if a.dtype.str != dtype or list(a.shape) != list(shape):
            raise ValueError(f"{name}: {a.dtype.str}{list(a.shape)} != index {dtype}{shape}")
    return out


def _checked_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate names and dtypes of arrays handed to put (a caller bug raises ValueError)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"cache array name must be an identifier, got {name!r}")
        a = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if a.dtype.hasobject or a.dtype.kind not in "biufc":
            raise ValueError(f"cache array {name!r} has unsupported dtype {a.dtype}")
        out[name] = np.ascontiguousarray(a)
    return out


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache object (hits/misses/time saved: this process) and index totals."""

    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int
    time_saved_s: float

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """JSON-ready view (adds ``hit_ratio``)."""
        d: dict[str, int | float] = asdict(self)
        d["time_saved_s"] = round(self.time_saved_s, 6)
        d["hit_ratio"] = round(self.hit_ratio, 6)
        return d


@dataclass(frozen=True)
class _Row:
    """One index row as read."""

    key: str
    fingerprint: str
    bytes: int
    sha256: str
    layout: dict[str, list[Any]]
    compute: float  # seconds the put's arrays cost to compute


_SCHEMA = """
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
"""


def _is_corruption(exc: sqlite3.Error) -> bool:
    """True for 'file is not a database' / 'database disk image is malformed'."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError


# --------------------------------------------------------------------------- the cache


class TokenCache:
    """Disk cache: content key -> named numpy arrays, fingerprinted, LRU-bounded, multi-process safe."""

    def __init__(self, directory: Path, max_bytes: int, fingerprint: str) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        self.directory = Path(directory)
        self.root = self.directory / NAMESPACE
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self._index_path = self.root / INDEX_NAME
        self._temp_dir = self.root / TEMP_DIR
        self._owner: tuple[int, str, int] | None = None  # (pid, owner name, fd of the held lock)
        self._file_lock = FileLock(str(self.root / LOCK_NAME))
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn_ident: tuple[int, int, int] | None = None  # (pid, st_dev, st_ino)
        self._hits = 0
        self._misses = 0
        self._time_saved = 0.0
        self._last_totals = (0, 0)
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._connection()
        try:
            self.reconcile()
        except (sqlite3.Error, OSError) as exc:
            logger.warning("token cache: start-up check of %s skipped (%s)", self.root, exc)

    # ------------------------------------------------------------------ public API

    def get(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (absent, other fingerprint, damaged, or
        lacking one of ``names``). A hit reads one file and refreshes the entry's LRU position."""
        _check_key(key)
        wanted = None if names is None else set(names)
        result: dict[str, np.ndarray] | None = None
        saved = 0.0
        try:
            result, saved = self._lookup(key, wanted)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("token cache: lookup of %s… failed (%s); treating as a miss", key[:8], exc)
        with self._lock:
            if result is None:
                self._misses += 1
            else:
                self._hits += 1
                self._time_saved += saved
        _tally(hit=result is not None)
        return result

    def put(self, key: str, arrays: Mapping[str, Any], compute_seconds: float | None = None) -> None:
        """Store ``arrays`` as the whole record under ``key`` (whatever was there is replaced).

        ``compute_seconds`` is what producing these arrays cost (the measured miss); later hits
        add it to ``time_saved_s``. Failures (disk full, lock timeout) are logged, not raised.
        Temp files of writers that died are removed first, so they never pile up.
        """
        _check_key(key)
        new = _checked_arrays(arrays)
        if not new:
            return
        seconds = float(compute_seconds) if compute_seconds is not None else 0.0
        if not np.isfinite(seconds) or seconds < 0:
            raise ValueError(f"compute_seconds must be a finite non-negative number, got {compute_seconds!r}")
        try:
            self._reap_dead_writers()
            self._store(key, new, seconds)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("token cache: could not store %s… (%s); continuing uncached", key[:8], exc)

    def delete(self, key: str) -> None:
        """Drop one entry (row and file), if present."""
        _check_key(key)
        with self._write() as conn:
            conn.execute("DELETE FROM entries WHERE key = ?", (key,))
            _unlink(self._path(key))

    def stats(self) -> CacheStats:
        """Counters of this object plus the shared index's entry and byte totals."""
        try:
            with self._lock:
                row = self._connection().execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
                self._last_totals = (int(row[0]), int(row[1])) if row else (0, 0)
        except sqlite3.Error as exc:
            if _is_corruption(exc):
                self._repair_index(exc)
            else:
                logger.warning("token cache: stats unavailable (%s); reporting last known totals", exc)
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._last_totals[0], self._last_totals[1], self.max_bytes, self._time_saved
            )

    def clear(self) -> None:
        """Remove every entry (rows and files, also orphans) and reset this object's counters."""
        with self._write() as conn:
            conn.execute("DELETE FROM entries")
            removed = self._remove_payload_files(keep=set())
        removed += self._reap_dead_writers()
        with self._lock:
            self._hits = self._misses = 0
            self._time_saved = 0.0
            self._last_totals = (0, 0)
        logger.info("token cache: cleared %d files under %s", removed, self.root)

    def reconcile(self) -> int:
        """Make files and index agree after crashes; returns how many files/rows it removed.

        Removes payload files without a row (a write that died between rename and commit, a
        rebuilt index) and temp files of dead writers, drops rows whose file is gone, and evicts
        down to this object's budget. This scans the directory once, so it runs at construction
        (server start), never per request.
        """
        removed = self._reap_dead_writers()
        with self._write() as conn:
            keys = [r[0] for r in conn.execute("SELECT key FROM entries")]
            removed += self._remove_payload_files(set(keys))
            for key in keys:
                if not self._path(key).is_file():
                    conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                    removed += 1
            self._evict(conn, keep="")  # the budget may have shrunk since the last run
        if removed:
            logger.warning("token cache: reconciled %s: removed %d orphaned files or rows", self.root, removed)
        return removed

    def close(self) -> None:
        """Close the index connection and give up this writer's lock (a later call reopens both)."""
        with self._lock:
            self._release_owner()
            self._close_connection()

    def _close_connection(self) -> None:
        """Close the index connection only (it is reopened on the next use); temp files stay."""
        with self._lock:
            if self._conn is not None:
                if self._conn_ident is not None and self._conn_ident[0] == os.getpid():
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.close()
                else:  # inherited through fork: closing it here could disturb the parent's locks
                    _INHERITED_CONNECTIONS.append(self._conn)
            self._conn = None
            self._conn_ident = None

    def __repr__(self) -> str:
        return f"TokenCache({str(self.root)!r}, max_bytes={self.max_bytes}, fingerprint={self.fingerprint[:12]}…)"

    # ------------------------------------------------------------------ lookups

    def _lookup(self, key: str, names: set[str] | None) -> tuple[dict[str, np.ndarray] | None, float]:
        """(arrays, seconds saved) or (None, 0.0); repairs what it finds damaged."""
        for _attempt in range(3):
            row = self._read_row(key)
            if row is None or row.fingerprint != self.fingerprint:
                return None, 0.0
            if names is not None and not set(names) <= set(row.layout):
                return None, 0.0
            arrays, problem = self._load(key, row)
            if arrays is not None:
                try:
                    self._touch(key)
                except sqlite3.OperationalError as exc:  # busy past the timeout: keep the hit
                    logger.debug("token cache: LRU refresh of %s… skipped (%s)", key[:8], exc)
                return arrays, row.compute
            # The file may have been replaced by another writer between our two reads: only a
            # row that is unchanged after a re-read really points at a damaged file.
            again = self._read_row(key)
            if again is not None and again.sha256 == row.sha256:
                self._drop_damaged(key, row.sha256, problem)
                return None, 0.0
        return None, 0.0

    def _load(self, key: str, row: _Row) -> tuple[dict[str, np.ndarray] | None, str]:
        """Read and verify the payload of ``row``; (None, reason) if it is missing or damaged."""
        path = self._path(key)
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            return None, "file missing"
        if len(payload) != row.bytes:
            return None, f"size {len(payload)} != {row.bytes}"
        if hashlib.sha256(payload).hexdigest() != row.sha256:
            return None, "checksum mismatch"
        try:
            return _decode(payload, row.layout), ""
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            return None, f"undecodable ({exc})"

    def _read_row(self, key: str) -> _Row | None:
        with self._lock:
            try:
                r = (
                    self._connection()
                    .execute("SELECT fingerprint, bytes, sha256, layout, compute FROM entries WHERE key = ?", (key,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                if not _is_corruption(exc):
                    raise
                self._repair_index(exc)
                return None
        if r is None:
            return None
        try:
            layout = json.loads(r[3])
        except (ValueError, TypeError):
            layout = {}  # undecodable metadata: _load fails it
        return _Row(key, r[0], int(r[1]), r[2], layout, _compute_seconds(r[4]))

    def _touch(self, key: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE entries SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM entries), last_used = ? WHERE key = ?",
                (time.time(), key),
            )

    def _drop_damaged(self, key: str, sha: str, problem: str) -> None:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM entries WHERE key = ? AND sha256 = ?", (key, sha))
            if cur.rowcount:
                _unlink(self._path(key))
                logger.warning("token cache: dropped damaged entry %s… (%s); it will be recomputed", key[:8], problem)

    # ------------------------------------------------------------------ writes

    def _store(self, key: str, arrays: dict[str, np.ndarray], seconds: float) -> None:
        """Encode the record, write it to a temp file, and commit file and row together."""
        payload, layout = _encode(arrays)
        if len(payload) > self.max_bytes:
            logger.info(
                "token cache: entry %s… (%d bytes) exceeds the budget of %d bytes; not stored",
                key[:8],
                len(payload),
                self.max_bytes,
            )
            return
        sha = hashlib.sha256(payload).hexdigest()
        path = self._path(key)
        tmp = self._write_temp(key, payload)
        renamed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._write() as conn:
                os.replace(tmp, path)
                renamed = True
                now = time.time()
                conn.execute(
                    "INSERT INTO entries (key, fingerprint, bytes, sha256, layout, compute, seq, created,"
                    " last_used) VALUES (?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM entries),"
                    " ?, ?) ON CONFLICT(key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                    " bytes = excluded.bytes, sha256 = excluded.sha256, layout = excluded.layout,"
                    " compute = excluded.compute, seq = excluded.seq, last_used = excluded.last_used",
                    (key, self.fingerprint, len(payload), sha, json.dumps(layout), json.dumps(seconds), now, now),
                )
                self._evict(conn, keep=key)
        finally:
            if not renamed:
                _unlink(tmp)
        # Make the rename durable, outside the write lock: losing it in a crash only loses the
        # entry (the row's checksum no longer matches the file, which is a miss).
        fsync_dir(path.parent)

    def _write_temp(self, key: str, payload: bytes) -> Path:
        """Write ``payload`` durably to a temp file named after this writer's lock."""
        owner = self._owner_name()
        tmp = self._temp_dir / f"{owner}.{key}.{threading.get_ident()}{TEMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    # ------------------------------------------------------------------ temp-file owners

    def _owner_name(self) -> str:
        """This object's writer name in this process, taking its lock on first use (and after a fork)."""
        with self._lock:
            pid = os.getpid()
            if self._owner is not None and self._owner[0] == pid:
                return self._owner[1]
            if self._owner is not None:  # inherited through fork: the parent keeps its own lock
                with contextlib.suppress(OSError):
                    os.close(self._owner[2])
                self._owner = None
            self._temp_dir.mkdir(parents=True, exist_ok=True)
            while True:
                name = f"{pid}-{secrets.token_hex(4)}"
                path = self._temp_dir / f"{name}{OWNER_LOCK_SUFFIX}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:  # a reaper may take (and remove) the new file before our flock: then start again
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except (BlockingIOError, FileNotFoundError):
                    same = False
                if same:
                    self._owner = (pid, name, fd)
                    return name
                os.close(fd)

    def _release_owner(self) -> None:
        """Remove this writer's lock file and release the lock (its temp files go with it)."""
        if self._owner is None:
            return
        pid, name, fd = self._owner
        self._owner = None
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        for tmp in self._temp_dir.glob(f"{name}.*{TEMP_SUFFIX}"):
            _unlink(tmp)
        _unlink(self._temp_dir / f"{name}{OWNER_LOCK_SUFFIX}")
        with contextlib.suppress(OSError):
            os.close(fd)

    def _reap_dead_writers(self) -> int:
        """Remove the temp files of writers that died; returns how many files went.

        One small directory listing plus one non-blocking ``flock`` per live writer: cheap
        enough for every put. A lock we can take belongs to a dead writer (the kernel released
        it); a temp file whose writer has no lock file left is a dead writer's too.
        """
        try:
            entries = list(os.scandir(self._temp_dir))
        except FileNotFoundError:
            return 0
        mine = self._owner[1] if self._owner is not None and self._owner[0] == os.getpid() else None
        live: set[str] = set()
        removed = 0
        for entry in entries:
            if not entry.name.endswith(OWNER_LOCK_SUFFIX):
                continue
            owner = entry.name.removesuffix(OWNER_LOCK_SUFFIX)
            if owner == mine:
                live.add(owner)
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except FileNotFoundError:  # another process reaped it just now
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live.add(owner)  # its writer is alive
                    continue
                for tmp in self._temp_dir.glob(f"{owner}.*{TEMP_SUFFIX}"):
                    _unlink(tmp)
                    removed += 1
                _unlink(Path(entry.path))
            finally:
                os.close(fd)
        for entry in entries:
            owner = entry.name.split(".", 1)[0]
            if entry.name.endswith(TEMP_SUFFIX) and owner not in live and owner != mine:
                # written by an owner whose lock was already gone when we listed: dead as well
                with contextlib.suppress(FileNotFoundError):
                    if not (self._temp_dir / f"{owner}{OWNER_LOCK_SUFFIX}").exists():
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            logger.info("token cache: removed %d temp files of writers that died", removed)
        return removed

    def _evict(self, conn: sqlite3.Connection, keep: str) -> None:
        """Drop least-recently-used rows (and files) until the byte total fits the budget."""
        total = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0]
        while total > self.max_bytes:
            victims = conn.execute(
                "SELECT key, bytes FROM entries WHERE key != ? ORDER BY seq LIMIT ?", (keep, EVICT_BATCH)
            ).fetchall()
            if not victims:
                break
            for victim, size in victims:
                conn.execute("DELETE FROM entries WHERE key = ?", (victim,))
                _unlink(self._path(victim))
                total -= size
                logger.debug(
                    "token cache: evicted %s… (%d bytes); total now %d of %d", victim[:8], size, total, self.max_bytes
                )
                if total <= self.max_bytes:
                    break

    # ------------------------------------------------------------------ index plumbing

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{PAYLOAD_SUFFIX}"

    def _connection(self) -> sqlite3.Connection:
        """The open index connection; (re)opened after a fork or when the index file was replaced."""
        try:
            st = os.stat(self._index_path)
            ident = (os.getpid(), st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if self._conn is not None and ident == self._conn_ident:
            return self._conn
        self._close_connection()
        try:
            self._conn = self._open()
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise
            return self._repair_index(exc)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._index_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"index schema {version} is not {SCHEMA_VERSION}")
            if version == 0 or not _has_schema(conn):
                conn.execute("BEGIN IMMEDIATE")
                for statement in _split_sql(_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        st = os.stat(self._index_path)
        self._conn_ident = (os.getpid(), st.st_dev, st.st_ino)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction (the cross-process write lock), committed on success."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if not _is_corruption(exc):
                    raise
                conn = self._repair_index(exc)
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and _is_corruption(exc):
                    self._repair_index(exc)
                raise

    def _repair_index(self, exc: BaseException) -> sqlite3.Connection:
        """Rebuild a corrupt index empty (one process at a time) and drop the orphaned files."""
        with self._lock:
            self._close_connection()
            with self._file_lock:
                try:  # another process may have rebuilt it while we waited for the lock
                    self._conn = self._open()
                    if self._conn.execute("PRAGMA quick_check").fetchone()[0] == "ok":
                        return self._conn
                    raise sqlite3.DatabaseError("quick_check failed")
                except sqlite3.Error as again:
                    if not _is_corruption(again):
                        raise
                    self._close_connection()
                logger.warning("token cache: index %s is damaged (%s); rebuilding it empty", self._index_path, exc)
                for suffix in ("", "-wal", "-shm"):
                    _unlink(Path(f"{self._index_path}{suffix}"))
                self._conn = self._open()
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    keep = {r[0] for r in conn.execute("SELECT key FROM entries")}
                    removed = self._remove_payload_files(keep)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                logger.warning("token cache: removed %d payload files orphaned by the damaged index", removed)
                return conn

    def _remove_payload_files(self, keep: set[str]) -> int:
        """Delete payload files whose key is not in ``keep`` and stale temp files; returns the count.

        Called inside a write transaction, so no other process can commit a file meanwhile.
        """
        removed = 0
        now = time.time()
        for shard in self.root.iterdir():
            if not shard.is_dir() or shard.name == TEMP_DIR:
                continue
            for f in shard.iterdir():
                if f.suffix == PAYLOAD_SUFFIX and f.stem not in keep:
                    _unlink(f)
                    removed += 1
                elif f.name.endswith(TEMP_SUFFIX):  # written by an earlier version, beside the payloads
                    with contextlib.suppress(FileNotFoundError):
                        if now - f.stat().st_mtime > STALE_TEMP_SECONDS:
                            _unlink(f)
                            removed += 1
        return removed


# --------------------------------------------------------------------------- helpers


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"cache key must be 8-128 characters of [0-9A-Za-z_-], got {key!r}")


def _compute_seconds(text: str) -> float:
    """The ``compute`` column: a JSON number (rows of the merging format, a list, count as 0)."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return 0.0
    return float(value) if isinstance(value, int | float) else 0.0


def _has_schema(conn: sqlite3.Connection) -> bool:
    r = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('entries', 'totals')")
    return r.fetchone()[0] == 2


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the index to WAL mode (persistent once set).

    The switch needs an exclusive lock and SQLite answers SQLITE_BUSY at once, without the busy
    handler, when another process opens a fresh index at the same moment: retry until the
    other one has switched it (the mode is per file) or the busy timeout is spent.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _split_sql(script: str) -> list[str]:
    """Split the schema script into statements (triggers contain ';' inside BEGIN … END)."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        in_trigger = joined.upper().startswith("CREATE TRIGGER")
        if joined.endswith(";") and (not in_trigger or joined.upper().endswith("END;")):
            statements.append(joined)
            current = []
    return statements


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- per-request lookup counts ----------------------------------------------------------------
# The object's hits/misses are process totals; a request's own figures cannot be a difference of
# them while other workers look up at the same time. A request counts its lookups in its context.


@dataclass
class LookupTally:
    """Lookups made inside one ``count_lookups`` block."""

    hits: int = 0
    misses: int = 0


_LOOKUPS: contextvars.ContextVar[LookupTally | None] = contextvars.ContextVar("token_cache_lookups", default=None)


@contextlib.contextmanager
def count_lookups() -> Iterator[LookupTally]:
    """Count the ``TokenCache.get`` calls of this thread (one request) until the block ends."""
    tally = LookupTally()
    token = _LOOKUPS.set(tally)
    try:
        yield tally
    finally:
        _LOOKUPS.reset(token)


def _tally(*, hit: bool) -> None:
    tally = _LOOKUPS.get()
    if tally is not None:
        if hit:
            tally.hits += 1
        else:
            tally.misses += 1
