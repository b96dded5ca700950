"""Persistent, content-addressed cache of named numpy arrays: one record per prompt audio.

Preparing a prompt costs seconds and a server sees the same reference voice again and again; a
record read back costs a millisecond, survives restarts and is shared by every server process
pointed at the same directory. The engine owns what a record holds and its fingerprint; this
module stores named arrays under a key (files in ``<directory>/wav2token/``, indexed by
``cache_index``), keeps them within a byte budget, and turns damage into a miss, never a wrong
answer. The design (layout, atomic writes, killed writers, eviction, a disk that refuses
writes, why not diskcache) is in docs/cache.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import os
import re
import sqlite3
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from cache_index import CacheIndex, Row, Transaction, is_storage_failure
from cache_keys import content_key, fingerprint_of
from errors import StorageError
from fsutil import TEMP_SUFFIX, Throttle, WriterTemps, fsync_dir, unlink_quietly

logger = logging.getLogger(__name__)

__all__ = [
    "TEMP_SUFFIX",
    "CacheStats",
    "LookupTally",
    "TokenCache",
    "content_key",
    "count_lookups",
    "fingerprint_of",
    "tally_lookup",
]

NAMESPACE = "wav2token"  # sub-directory of the cache directory owned by this cache
INDEX_NAME = "index.sqlite3"
PAYLOAD_SUFFIX = ".npz"
TEMP_DIR = "tmp"  # payloads being written, and the lock of each live writer (fsutil.WriterTemps)
BUSY_TIMEOUT_MS = 30_000  # how long a process waits for another's write transaction
EVICT_BATCH = 64  # rows fetched per eviction query

_FAILURES = (sqlite3.Error, OSError)  # what the disk and the index raise when they refuse

_KEY_RE = re.compile(r"^[0-9A-Za-z_-]{8,128}$")
_NAME_RE = re.compile(r"^[A-Za-z_][0-9A-Za-z_]{0,63}$")
NUMERIC_KINDS = "biufc"  # the dtype kinds a record may hold: bool, integers, floats, complex


# --------------------------------------------------------------------------- payload codec


def _encode(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, list[Any]]]:
    """Arrays -> (npz bytes, {name: [dtype, shape]}) without pickle."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **cast(dict[str, Any], arrays))
    return buf.getvalue(), layout_of(arrays)


def _decode(payload: bytes, layout: Mapping[str, list[Any]]) -> dict[str, np.ndarray]:
    """npz bytes -> arrays, checked against the row's layout; raises ValueError when they differ."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        return read_checked(npz, layout, "index")


def _checked_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate names and dtypes of arrays handed to put (a caller bug raises ValueError)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"cache array name must be an identifier, got {name!r}")
        a = plain_array(value)
        if a.dtype.hasobject or a.dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"cache array {name!r} has unsupported dtype {a.dtype}")
        out[name] = a
    return out


def plain_array(value: Any) -> np.ndarray:
    """``value`` as a contiguous numpy array (a torch tensor is copied to the CPU first)."""
    return np.ascontiguousarray(np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value))


def layout_of(arrays: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
    """{name: [dtype, shape]} of a record, sorted by name: what a read is checked against."""
    return {name: [a.dtype.str, list(a.shape)] for name, a in sorted(arrays.items())}


def read_checked(
    source: Mapping[str, np.ndarray], layout: Mapping[str, list[Any]], against: str, *, numeric: bool = False
) -> dict[str, np.ndarray]:
    """The arrays of ``source`` (a dict, or an open npz) when their names, dtypes and shapes are the
    ones ``layout`` records (and, with ``numeric``, their dtypes plain numbers); otherwise a
    ValueError saying what differs from ``against`` (the index row, the shared record).

    The names are compared before any array is read, so an npz is not decompressed in vain.
    """
    if sorted(source) != sorted(layout):
        raise ValueError(f"array names {sorted(source)} != {against} {sorted(layout)}")
    out = {name: source[name] for name in source}
    for name, a in out.items():
        dtype, shape = layout[name]
        if a.dtype.str != dtype or list(a.shape) != list(shape) or (numeric and a.dtype.kind not in NUMERIC_KINDS):
            raise ValueError(f"{name}: {a.dtype.str}{list(a.shape)} != {against} {dtype}{shape}")
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
        self._index = CacheIndex(
            self.root / INDEX_NAME,
            busy_timeout_ms=BUSY_TIMEOUT_MS,
            on_rebuilt=lambda _: self._remove_payload_files(keep=set()),
        )
        self._temps = WriterTemps(self.root / TEMP_DIR)
        self._lock = threading.Lock()  # the counters below
        self._hits = 0
        self._misses = 0
        self._time_saved = 0.0
        self._last_totals = (0, 0)
        self._warnings = Throttle()  # a disk that stays full or read-only is logged once a minute
        try:
            self.reconcile()
        except _FAILURES as exc:
            self._startup_failed(exc)

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
        except _FAILURES as exc:
            self._warn(f"lookup of {key[:8]}… failed ({exc}); treating as a miss", exc)
        with self._lock:
            if result is None:
                self._misses += 1
            else:
                self._hits += 1
                self._time_saved += saved
        tally_lookup(hit=result is not None)
        return result

    def put(self, key: str, arrays: Mapping[str, Any], compute_seconds: float | None = None) -> None:
        """Store ``arrays`` as the whole record under ``key`` (whatever was there is replaced).

        ``compute_seconds`` is what producing these arrays cost (the measured miss); later hits
        add it to ``time_saved_s``. Failures (disk full or read-only, lock timeout) are logged,
        not raised: the cache is an optimisation and must never fail a request. Temp files of
        writers that died are removed first, so they never pile up.
        """
        _check_key(key)
        new = _checked_arrays(arrays)
        if not new:
            return
        seconds = float(compute_seconds) if compute_seconds is not None else 0.0
        if not np.isfinite(seconds) or seconds < 0:
            raise ValueError(f"compute_seconds must be a finite non-negative number, got {compute_seconds!r}")
        try:
            self._reap()
            self._store(key, new, seconds)
        except _FAILURES as exc:
            self._warn(f"could not store {key[:8]}… ({exc}); continuing uncached", exc)

    def stats(self) -> CacheStats:
        """Counters of this object plus the shared index's entry and byte totals."""
        try:
            totals = self._index.totals()
            with self._lock:
                self._last_totals = totals
        except _FAILURES as exc:
            self._warn(f"stats unavailable ({exc}); reporting last known totals", exc)
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._last_totals[0], self._last_totals[1], self.max_bytes, self._time_saved
            )

    def clear(self) -> None:
        """Remove every entry (rows and files, also orphans) and reset this object's counters.

        Raises StorageError when the directory cannot be written (the entries are then left).
        """
        try:
            with self._index.write() as txn:
                txn.delete_all()
                removed = self._remove_payload_files(keep=set())
            removed += self._reap()
        except _FAILURES as exc:
            if not is_storage_failure(exc):
                raise
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            logger.warning("token cache: cannot clear %s: it cannot be written (%s)", self.root, reason)
            raise StorageError(
                f"the prompt cache cannot be cleared: its directory cannot be written ({reason})", self.root
            ) from exc
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
        removed = self._reap()
        with self._index.write() as txn:
            keys = txn.keys()
            removed += self._remove_payload_files(set(keys))
            for key in keys:
                if not self._path(key).is_file():
                    txn.delete(key)
                    removed += 1
            self._evict(txn, keep="")  # the budget may have shrunk since the last run
        if removed:
            logger.warning("token cache: reconciled %s: removed %d orphaned files or rows", self.root, removed)
        return removed

    def close(self) -> None:
        """Close the index connection and give up this writer's lock (a later call reopens both)."""
        self._temps.release()
        self._index.close()

    def __repr__(self) -> str:
        return f"TokenCache({str(self.root)!r}, max_bytes={self.max_bytes}, fingerprint={self.fingerprint[:12]}…)"

    # ------------------------------------------------------------------ failures

    def _startup_failed(self, exc: Exception) -> None:
        if not is_storage_failure(exc):
            logger.warning("token cache: start-up check of %s skipped (%s)", self.root, exc)
            return
        # the server's own start-up check has named the directory and its setting: no second warning
        self._warnings.mark()
        logger.info(
            "token cache: %s cannot be written (%s); prompts are computed uncached until it can", self.root, exc
        )

    def _warn(self, message: str, exc: BaseException) -> None:
        """Log a failed operation; a disk that stays full or read-only is logged once a minute."""
        if is_storage_failure(exc) and not self._warnings.ready():
            logger.debug("token cache: %s", message)
            return
        logger.warning("token cache: %s", message)

    # ------------------------------------------------------------------ lookups

    def _lookup(self, key: str, names: set[str] | None) -> tuple[dict[str, np.ndarray] | None, float]:
        """(arrays, seconds saved) or (None, 0.0); repairs what it finds damaged."""
        for _attempt in range(3):
            row = self._index.row(key)
            if row is None or row.fingerprint != self.fingerprint:
                return None, 0.0
            if names is not None and not set(names) <= set(row.layout):
                return None, 0.0
            arrays, problem = self._load(row)
            if arrays is not None:
                try:
                    with self._index.write() as txn:
                        txn.touch(key)
                except _FAILURES as exc:  # busy past the timeout, a full disk: keep the hit
                    logger.debug("token cache: LRU refresh of %s… skipped (%s)", key[:8], exc)
                return arrays, row.compute
            # The file may have been replaced by another writer between our two reads: only a
            # row that is unchanged after a re-read really points at a damaged file.
            again = self._index.row(key)
            if again is not None and again.sha256 == row.sha256:
                with self._index.write() as txn:
                    if txn.delete(key, row.sha256):
                        unlink_quietly(self._path(key))
                        logger.warning(
                            "token cache: dropped damaged entry %s… (%s); it will be recomputed", key[:8], problem
                        )
                return None, 0.0
        return None, 0.0

    def _load(self, row: Row) -> tuple[dict[str, np.ndarray] | None, str]:
        """Read and verify the payload of ``row``; (None, reason) if it is missing or damaged."""
        try:
            payload = self._path(row.key).read_bytes()
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

    # ------------------------------------------------------------------ writes

    def _store(self, key: str, arrays: dict[str, np.ndarray], seconds: float) -> None:
        """Encode the record, write it to a temp file, and commit file and row together.

        The rename happens inside the index's write transaction, after the row is written, so
        a refused row leaves the old file in place; only a failed commit after the rename
        leaves a file whose row disagrees, which the checksum turns into a miss.
        """
        payload, layout = _encode(arrays)
        if len(payload) > self.max_bytes:
            logger.info(
                "token cache: entry %s… (%d bytes) exceeds the budget of %d bytes; not stored",
                key[:8],
                len(payload),
                self.max_bytes,
            )
            return
        row = Row(key, self.fingerprint, len(payload), hashlib.sha256(payload).hexdigest(), layout, seconds)
        path = self._path(key)
        tmp = self._temps.write(key, payload)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._index.write() as txn:
                txn.upsert(row)
                os.replace(tmp, path)
                self._evict(txn, keep=key)
        finally:
            unlink_quietly(tmp)  # still there only when the rename did not happen
        # Make the rename durable, outside the write lock: losing it in a crash only loses the
        # entry (the row's checksum no longer matches the file, which is a miss).
        fsync_dir(path.parent)

    def _reap(self) -> int:
        removed = self._temps.reap()
        if removed:
            logger.info("token cache: removed %d temp files of writers that died", removed)
        return removed

    def _evict(self, txn: Transaction, keep: str) -> None:
        """Drop least-recently-used rows (and files) until the byte total fits the budget.

        Walks the LRU order from the oldest row: the cost is what is evicted, never a scan.
        """
        total = txn.total_bytes()
        while total > self.max_bytes:
            victims = txn.oldest(keep, EVICT_BATCH)
            if not victims:
                break
            for victim, size in victims:
                txn.delete(victim)
                unlink_quietly(self._path(victim))
                total -= size
                logger.debug("token cache: evicted %s… (%d bytes); total now %d", victim[:8], size, total)
                if total <= self.max_bytes:
                    break

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{PAYLOAD_SUFFIX}"

    def _remove_payload_files(self, keep: set[str]) -> int:
        """Delete payload files whose key is not in ``keep``; returns the count.

        Called inside a write transaction, so no other process can commit a file meanwhile.
        """
        removed = 0
        for shard in self.root.iterdir():
            if shard.is_dir() and shard.name != TEMP_DIR:
                for f in shard.glob(f"*{PAYLOAD_SUFFIX}"):
                    if f.stem not in keep:
                        unlink_quietly(f)
                        removed += 1
        return removed


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"cache key must be 8-128 characters of [0-9A-Za-z_-], got {key!r}")


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


def tally_lookup(*, hit: bool) -> None:
    """Count one lookup in the enclosing ``count_lookups`` block (a cache in front of this one counts its own)."""
    tally = _LOOKUPS.get()
    if tally is not None:
        if hit:
            tally.hits += 1
        else:
            tally.misses += 1
