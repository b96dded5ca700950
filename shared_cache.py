"""The prompt cache in two levels: this host's ``TokenCache``, backed by a level every replica shares.

A scaled-out deployment runs one server per GPU, each with its own local cache (docs/cache.md).
Alone, each would tokenize a popular voice once per replica. With ``--store-url`` a miss in the
local level asks the shared level (an ``ObjectStore``, S3-compatible) under the same content key
before computing, and a computed record goes to both levels: a prompt tokenized on one replica is
a hit on every other. The local level stays in front because it answers in a millisecond from a
local disk and keeps working when the store does not.

Layout in the store: ``wav2token/<fingerprint>/<key>.npz``, the record's arrays plus a ``record``
member (JSON: names, dtypes and shapes, the seconds the record cost). The fingerprint is a path
segment rather than a field: replicas on old and new weights during a rolling upgrade each read
and write their own records instead of overwriting each other's, and old records never match.
(They are not removed: an S3 lifecycle rule on ``wav2token/`` expires them; docs/scale-out.md.)

Damage and outages are misses, never errors: the store checks every object's sha256 on read
(``object_store``), a record that fails it or does not decode is deleted and recomputed, and a
store that is down is skipped for a few seconds (``object_store.Backoff``) so requests do not
each wait for it; its failures are logged at most once a minute.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from errors import StorageError
from fsutil import Throttle
from object_store import Backoff, CorruptObjectError, ObjectStore, StoreError
from token_cache import TokenCache, count_lookups, layout_of, plain_array, read_checked, tally_lookup

logger = logging.getLogger(__name__)

NAMESPACE = "wav2token"
SUFFIX = ".npz"
RECORD_MEMBER = "record"  # the JSON member beside the arrays (an array name the engine never uses)


class StatsView(Protocol):
    def as_dict(self) -> Mapping[str, object]: ...


class RecordCache(Protocol):
    """What the engine's ``PromptPreparer`` needs of a prompt cache (``TokenCache`` or ``TwoLevelCache``)."""

    def get(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray] | None: ...
    def put(self, key: str, arrays: Mapping[str, Any], compute_seconds: float | None = None) -> None: ...
    def stats(self) -> StatsView: ...
    def clear(self) -> None: ...


@dataclass(frozen=True)
class TwoLevelStats:
    """Both levels' counters: ``hits`` counts every lookup that computed nothing, in either level."""

    local: Mapping[str, object] | None
    shared_hits: int
    shared_misses: int
    shared_stored: int
    shared_errors: int
    shared_time_saved_s: float
    store: str

    def as_dict(self) -> dict[str, object]:
        local = dict(self.local or {})
        local_hits = int(cast(int, local.get("hits", 0)))
        hits = local_hits + self.shared_hits
        lookups = local_hits + int(cast(int, local.get("misses", 0))) if self.local else hits + self.shared_misses
        return {
            **local,
            "hits": hits,
            "misses": lookups - hits,
            "time_saved_s": round(float(cast(float, local.get("time_saved_s", 0.0))) + self.shared_time_saved_s, 6),
            "hit_ratio": round(hits / lookups, 6) if lookups else 0.0,
            "shared": {
                "store": self.store,
                "hits": self.shared_hits,
                "misses": self.shared_misses,
                "stored": self.shared_stored,
                "errors": self.shared_errors,
            },
        }


class TwoLevelCache:
    """``local`` (None: no local level) in front of ``store`` (already scoped to this fingerprint)."""

    def __init__(self, local: TokenCache | None, store: ObjectStore) -> None:
        self.local = local
        self.store = store
        self._lock = threading.Lock()
        self._hits = self._misses = self._stored = self._errors = 0
        self._saved = 0.0
        self._outage = Backoff(10.0)
        self._warnings = Throttle()

    def get(self, key: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray] | None:
        """Local level, then the shared one (a shared hit is copied into the local level)."""
        wanted = None if names is None else set(names)
        if self.local is not None:
            with count_lookups():  # this request's tally counts the lookup once, below
                found = self.local.get(key, wanted)
            if found is not None:
                tally_lookup(hit=True)
                return found
        shared = self._shared_get(key, wanted)
        tally_lookup(hit=shared is not None)
        if shared is None:
            return None
        arrays, seconds = shared
        if self.local is not None:
            self.local.put(key, arrays, compute_seconds=seconds)
        logger.info("prompt cache: shared hit %s… from %s", key[:8], self.store.location)
        return arrays

    def put(self, key: str, arrays: Mapping[str, Any], compute_seconds: float | None = None) -> None:
        """Both levels; the shared one's failure is logged, never raised (a cache never fails a request)."""
        if self.local is not None:
            self.local.put(key, arrays, compute_seconds)
        if self._outage.skipping():
            return
        try:
            payload = _encode(arrays, compute_seconds or 0.0)
            self.store.put(f"{key}{SUFFIX}", payload)
        except StoreError as exc:
            self._failed(f"could not store {key[:8]}… ({exc.reason})", exc)
            return
        self._outage.succeeded()
        with self._lock:
            self._stored += 1

    def stats(self) -> TwoLevelStats:
        local = self.local.stats().as_dict() if self.local is not None else None
        with self._lock:
            return TwoLevelStats(
                local, self._hits, self._misses, self._stored, self._errors, self._saved, self.store.location
            )

    def clear(self) -> None:
        """This replica's local level and every record of this fingerprint in the shared level.

        Other replicas' local levels keep their copies: they hold the same correct records and go
        with their own LRU budget. Raises ``StorageError`` when either level cannot be cleared.
        """
        if self.local is not None:
            self.local.clear()
        try:
            removed = sum(self.store.delete(k) for k in self.store.list_keys())
        except StoreError as exc:
            logger.warning("prompt cache: the shared level %s cannot be cleared (%s)", exc.location, exc.reason)
            raise StorageError(f"the shared prompt cache cannot be cleared: the store is {exc.reason}") from exc
        with self._lock:
            self._hits = self._misses = self._stored = self._errors = 0
            self._saved = 0.0
        logger.info("prompt cache: removed %d records from %s", removed, self.store.location)

    # ------------------------------------------------------------------ the shared level

    def _shared_get(self, key: str, wanted: set[str] | None) -> tuple[dict[str, np.ndarray], float] | None:
        if self._outage.skipping():
            with self._lock:
                self._misses += 1
            return None
        name = f"{key}{SUFFIX}"
        found: tuple[dict[str, np.ndarray], float] | None = None
        try:
            data = self.store.get(name)
            self._outage.succeeded()
            found = _decode(data) if data is not None else None
        except StoreError as exc:
            self._failed(f"lookup of {key[:8]}… failed ({exc.reason}); treating it as a miss", exc)
        except (CorruptObjectError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            self._drop(name, exc)
        if found is not None and wanted is not None and not wanted <= set(found[0]):
            found = None
        with self._lock:
            if found is None:
                self._misses += 1
            else:
                self._hits += 1
                self._saved += found[1]
        return found

    def _drop(self, name: str, problem: Exception) -> None:
        """A damaged record is deleted (best effort) so the next put replaces it; never served."""
        logger.warning("prompt cache: dropped damaged shared record %s (%s); it will be recomputed", name, problem)
        try:
            self.store.delete(name)
        except StoreError as exc:
            logger.debug("prompt cache: could not delete %s (%s)", name, exc.reason)

    def _failed(self, message: str, exc: StoreError) -> None:
        self._outage.failed()
        with self._lock:
            self._errors += 1
        log = logger.warning if self._warnings.ready() else logger.debug  # a store that stays down: once a minute
        log("prompt cache: shared level %s: %s", exc.location, message)


def _encode(arrays: Mapping[str, Any], compute_seconds: float) -> bytes:
    """Arrays plus a ``record`` member describing them, as one compressed npz (no pickle)."""
    plain = {name: plain_array(v) for name, v in arrays.items()}
    if RECORD_MEMBER in plain:
        raise ValueError(f"{RECORD_MEMBER!r} is reserved in a shared record")
    record = {"layout": layout_of(plain), "compute_seconds": float(compute_seconds)}
    meta = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **cast(dict[str, Any], {**plain, RECORD_MEMBER: meta}))
    return buf.getvalue()


def _decode(data: bytes) -> tuple[dict[str, np.ndarray], float]:
    """The arrays and their cost, checked against the record's own layout (ValueError when they differ)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        record = json.loads(bytes(npz[RECORD_MEMBER]).decode())
        arrays = {name: npz[name] for name in npz.files if name != RECORD_MEMBER}
    return read_checked(arrays, record["layout"], "record", numeric=True), float(record["compute_seconds"])


def with_shared_level(local: TokenCache | None, store: ObjectStore | None, fingerprint: str) -> RecordCache | None:
    """``local`` alone on one host; both levels when the deployment has a shared store."""
    if store is None or not store.shared:
        return local
    return TwoLevelCache(local, store.child(NAMESPACE).child(fingerprint))
