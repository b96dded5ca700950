"""The prompt cache: persistence, fingerprints, damage, concurrency, killed writers, LRU budget, stats.

Everything runs through the real TokenCache on a temp directory, with real subprocesses where
a "restart" or "another server process" is meant.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import cache_keys
import token_cache
from token_cache import TokenCache, content_key, fingerprint_of

REPO_ROOT = Path(__file__).resolve().parents[1]
FP = "fingerprint-a"
HAMMER_ROUNDS = 200  # get-or-put rounds per process in the concurrency test
RACE_KEYS = 150  # keys both processes put at the same time


def _arrays(seed: int) -> dict[str, np.ndarray]:
    """Deterministic tokens-like payload for ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        "vq02": rng.integers(0, 1024, size=50, dtype=np.int64),
        "vq06": rng.integers(0, 4096, size=75, dtype=np.int64),
    }


def _vocoder_arrays(seed: int) -> dict[str, np.ndarray]:
    """The rest of a prompt record: a 2-D float mel and a speaker embedding."""
    rng = np.random.default_rng(10_000 + seed)
    return {
        "prompt_mel": rng.standard_normal((1, 40, 80)).astype(np.float32),
        "spk_emb": rng.standard_normal((1, 192)).astype(np.float32),
    }


def _key(i: int) -> str:
    return content_key(np.full(160, i, dtype=np.float32), 16000)


def _assert_same(got: dict[str, np.ndarray] | None, want: dict[str, np.ndarray]) -> None:
    assert got is not None
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype, name
        assert got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a)


def _payload_files(cache_dir: Path) -> dict[str, int]:
    root = cache_dir / token_cache.NAMESPACE
    return {p.stem: p.stat().st_size for p in root.glob("*/*.npz")}


def _index_rows(cache_dir: Path) -> dict[str, int]:
    with sqlite3.connect(cache_dir / token_cache.NAMESPACE / token_cache.INDEX_NAME) as conn:
        rows = dict(conn.execute("SELECT key, bytes FROM entries").fetchall())
        totals = conn.execute("SELECT entries, bytes FROM totals").fetchone()
    assert totals == (len(rows), sum(rows.values())), "trigger-maintained totals drifted"
    return rows


def _assert_consistent(cache_dir: Path) -> None:
    """Index rows and payload files describe the same entries with the same sizes; no temp files."""
    assert _index_rows(cache_dir) == _payload_files(cache_dir)
    assert not list((cache_dir / token_cache.NAMESPACE).glob(f"*/*{token_cache.TEMP_SUFFIX}"))


# --------------------------------------------------------------------------- keys + fingerprints


def test_content_key_depends_on_samples_and_rate_only() -> None:
    wav = np.random.default_rng(0).standard_normal((1, 1600)).astype(np.float32)
    k = content_key(wav, 16000)
    assert len(k) == 64 and int(k, 16) >= 0
    assert content_key(wav.copy(), 16000) == k
    assert content_key(wav[0], 16000) == k  # (1, n) and (n,) are the same audio
    assert content_key(wav.astype(np.float64), 16000) == k  # hashed as float32
    assert content_key(wav, 22050) != k
    changed = wav.copy()
    changed[0, 100] += 1e-3
    assert content_key(changed, 16000) != k
    assert content_key(wav.reshape(2, 800), 16000) != content_key(wav.reshape(1, 1600), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        content_key(wav, 0)


def test_content_key_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    wav = np.linspace(-1, 1, 800, dtype=np.float32)[None]
    assert content_key(torch.from_numpy(wav), 16000) == content_key(wav, 16000)


def test_fingerprint_tracks_contents_settings_not_location(tmp_path: Path) -> None:
    a = tmp_path / "a" / "bundle"
    a.mkdir(parents=True)
    (a / "model.pt").write_bytes(b"weights-1")
    (a / "codebook.npy").write_bytes(b"codebook")
    fp = fingerprint_of([a / "model.pt", a / "codebook.npy"], dither=0.0)
    assert fp == fingerprint_of([a / "model.pt", a / "codebook.npy"], dither=0.0)
    assert fp != fingerprint_of([a / "model.pt", a / "codebook.npy"], dither=1.0)
    b = tmp_path / "b" / "bundle"
    b.mkdir(parents=True)
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    assert fingerprint_of([b / "model.pt", b / "codebook.npy"], dither=0.0) == fp  # moved bundle keeps cache
    assert fingerprint_of([a], dither=0.0) == fingerprint_of([b], dither=0.0)  # directories recurse
    (a / "model.pt").write_bytes(b"weights-2")
    assert fingerprint_of([a / "model.pt", a / "codebook.npy"], dither=0.0) != fp
    with pytest.raises(FileNotFoundError):
        fingerprint_of([a / "missing.onnx"])


def test_fingerprint_of_large_file_hashes_edges_and_identity(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_keys, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(cache_keys, "EDGE_BYTES", 256)
    big = tmp_path / "big.bin"
    data = bytearray(os.urandom(4096))
    big.write_bytes(data)
    fp = fingerprint_of([big])
    data[-1] ^= 0xFF  # the tail is hashed
    big.write_bytes(data)
    os.utime(big, ns=(1, 1))  # same mtime for both versions below: only content may differ
    fp_tail = fingerprint_of([big])
    assert fp_tail != fp
    data[2000] ^= 0xFF  # the middle of a big file is covered by size + mtime only
    big.write_bytes(data)
    os.utime(big, ns=(1, 1))
    cache_keys._file_digest_memo.clear()
    assert fingerprint_of([big]) == fp_tail
    os.utime(big, ns=(2, 2))  # ... so an in-place replacement (new mtime) changes it
    assert fingerprint_of([big]) != fp_tail


# --------------------------------------------------------------------------- round trip


def test_round_trip_one_record_replaced_whole(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    key = _key(1)
    assert cache.get(key) is None
    record = _arrays(1) | _vocoder_arrays(1)
    cache.put(key, record, compute_seconds=2.0)
    _assert_same(cache.get(key), record)
    _assert_same(cache.get(key, names=("vq02", "prompt_mel")), record)
    replaced = {"vq02": np.arange(7, dtype=np.int64)}
    cache.put(key, replaced, compute_seconds=1.0)  # a put replaces the record: nothing is merged
    _assert_same(cache.get(key), replaced)
    assert cache.stats().entries == 1
    # stored compactly as a binary npz, not JSON
    payload = next((tmp_path / "wav2token").glob("*/*.npz")).read_bytes()
    assert payload[:2] == b"PK"
    _assert_consistent(tmp_path)


def test_get_with_names_misses_when_a_name_is_absent(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    key = _key(2)
    cache.put(key, _arrays(2), compute_seconds=1.0)
    assert cache.get(key, names=("prompt_mel", "spk_emb")) is None
    s = cache.stats()
    assert (s.hits, s.misses) == (0, 1)


def test_put_rejects_bad_names_keys_and_object_arrays(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    with pytest.raises(ValueError, match="key"):
        cache.put("../../etc", _arrays(0))
    with pytest.raises(ValueError, match="name"):
        cache.put(_key(0), {"a/b": np.zeros(3)})
    with pytest.raises(ValueError, match="dtype"):
        cache.put(_key(0), {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="max_bytes"):
        TokenCache(tmp_path, -1, FP)


# --------------------------------------------------------------------------- restarts + fingerprints


def test_hit_after_restart_with_new_object(tmp_path: Path) -> None:
    first = TokenCache(tmp_path, 10**7, FP)
    first.put(_key(3), _arrays(3), compute_seconds=1.25)
    first.close()
    second = TokenCache(tmp_path, 10**7, FP)
    _assert_same(second.get(_key(3)), _arrays(3))
    assert second.stats().time_saved_s == pytest.approx(1.25)  # the first process's measured miss


def test_hit_after_real_process_restart(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from tests.test_token_cache import _arrays, _key
        from token_cache import TokenCache
        TokenCache(Path({str(tmp_path)!r}), 10**7, {FP!r}).put(_key(4), _arrays(4), compute_seconds=3.0)
    """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
    cache = TokenCache(tmp_path, 10**7, FP)
    _assert_same(cache.get(_key(4)), _arrays(4))
    assert cache.stats().time_saved_s == pytest.approx(3.0)


def test_changed_fingerprint_misses_and_is_overwritten(tmp_path: Path) -> None:
    old = TokenCache(tmp_path, 10**7, "old-weights")
    old.put(_key(5), _arrays(5) | _vocoder_arrays(5), compute_seconds=1.0)
    new = TokenCache(tmp_path, 10**7, "new-weights")
    assert new.get(_key(5)) is None
    new.put(_key(5), _arrays(50), compute_seconds=1.0)
    _assert_same(new.get(_key(5)), _arrays(50))  # not merged with the stale arrays
    assert old.get(_key(5)) is None
    _assert_consistent(tmp_path)


@pytest.mark.parametrize("compute", ["[1.0]", "not json", "null", '"2.5"'])
def test_row_whose_compute_is_not_a_number_is_served_as_costing_nothing(tmp_path: Path, compute: str) -> None:
    """An index written by an older format (compute stored as a JSON list) is reused by the same schema
    version: such a row is a hit that saved 0 s, never an error that fails the request."""
    cache = TokenCache(tmp_path, 10**7, FP)
    cache.put(_key(7), _arrays(7), compute_seconds=2.0)
    with sqlite3.connect(tmp_path / token_cache.NAMESPACE / token_cache.INDEX_NAME) as conn:
        conn.execute("UPDATE entries SET compute = ?", (compute,))
    _assert_same(cache.get(_key(7)), _arrays(7))
    assert cache.get(_key(8)) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.time_saved_s) == (1, 1, 0.0)


# --------------------------------------------------------------------------- damage


def _entry_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / "wav2token" / key[:2] / f"{key}.npz"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted", "bitflip", "valid-other-npz"])
def test_damaged_entry_is_a_miss_and_gets_repaired(tmp_path: Path, damage: str, caplog) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    key = _key(6)
    cache.put(key, _arrays(6), compute_seconds=1.0)
    path = _entry_file(tmp_path, key)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "deleted":
        path.unlink()
    elif damage == "bitflip":
        path.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    else:  # a well-formed npz with wrong contents must not be served either
        other = tmp_path / "other.npz"
        np.savez(other, vq02=np.zeros(50, dtype=np.int64), vq06=np.zeros(75, dtype=np.int64))
        path.write_bytes(other.read_bytes())
    with caplog.at_level(logging.WARNING, logger="token_cache"):
        assert cache.get(key) is None
    assert "damaged entry" in caplog.text
    assert cache.stats().entries == 0
    cache.put(key, _arrays(6), compute_seconds=1.0)
    _assert_same(cache.get(key), _arrays(6))
    _assert_consistent(tmp_path)


def test_file_without_index_row_is_a_miss_and_overwritten(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    key = _key(7)
    path = _entry_file(tmp_path, key)
    path.parent.mkdir(parents=True)
    np.savez(path, vq02=np.zeros(3, dtype=np.int64))  # stray file, e.g. from a lost index
    assert cache.get(key) is None
    cache.put(key, _arrays(7))
    _assert_same(cache.get(key), _arrays(7))
    _assert_consistent(tmp_path)


@pytest.mark.parametrize("live", [False, True], ids=["after-restart", "while-open"])
def test_damaged_index_is_rebuilt(tmp_path: Path, live: bool, caplog) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    for i in range(3):
        cache.put(_key(i), _arrays(i))
    if not live:
        cache.close()
    root = tmp_path / "wav2token"
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite3'}{suffix}").unlink(missing_ok=True)
    (root / "index.sqlite3").write_bytes(b"this is not a database" * 300)
    if live:  # the open object may still see its cached pages: never an error or a wrong answer
        got = cache.get(_key(0))
        if got is not None:
            _assert_same(got, _arrays(0))
        cache.put(_key(5), _arrays(5))
    with caplog.at_level(logging.WARNING, logger="token_cache"):
        reopened = TokenCache(tmp_path, 10**7, FP)  # a restart (or another process) finds the damage
        assert reopened.get(_key(0)) is None
    assert "rebuilding" in caplog.text
    assert reopened.stats().entries == 0
    assert _payload_files(tmp_path) == {}  # files orphaned by the lost index are gone
    reopened.put(_key(0), _arrays(0))
    _assert_same(reopened.get(_key(0)), _arrays(0))
    if live:  # the old object follows the rebuilt index file
        _assert_same(cache.get(_key(0)), _arrays(0))
        cache.put(_key(7), _arrays(7))
        _assert_same(reopened.get(_key(7)), _arrays(7))
    _assert_consistent(tmp_path)


def test_startup_reconciles_orphans_and_rows_without_files(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    for i in range(3):
        cache.put(_key(i), _arrays(i))
    cache.close()
    orphan = _entry_file(tmp_path, _key(9))  # a file whose commit never happened
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"PK-partial")
    temps = tmp_path / token_cache.NAMESPACE / token_cache.TEMP_DIR
    dead = temps / f"123-dead.{_key(9)}.1{token_cache.TEMP_SUFFIX}"  # a writer that died: no lock file left
    dead.write_bytes(b"half")
    live_writer = TokenCache(tmp_path, 10**7, FP)  # another process, in the middle of a put
    in_flight = live_writer._temps.write(_key(8), b"in flight")
    _entry_file(tmp_path, _key(1)).unlink()  # a row whose file is gone
    restarted = TokenCache(tmp_path, 10**7, FP)
    assert not orphan.exists() and not dead.exists() and in_flight.exists()
    assert set(_index_rows(tmp_path)) == {_key(0), _key(2)}
    assert restarted.stats().entries == 2
    live_writer.close()
    _assert_consistent(tmp_path)


# --------------------------------------------------------------------------- LRU budget


def test_budget_holds_and_least_recently_used_goes_first(tmp_path: Path) -> None:
    probe = TokenCache(tmp_path / "probe", 10**7, FP)
    probe.put(_key(0), _arrays(0))
    entry = probe.stats().bytes
    budget = 10 * entry + entry // 2  # room for ten entries
    cache = TokenCache(tmp_path / "c", budget, FP)
    for i in range(10):
        cache.put(_key(i), _arrays(i))
    assert cache.stats().entries == 10
    assert cache.get(_key(0)) is not None  # key 0 written first but used last
    cache.put(_key(10), _arrays(10))
    assert cache.get(_key(1)) is None  # oldest USED went, not oldest written
    _assert_same(cache.get(_key(0)), _arrays(0))
    for i in range(11, 60):
        cache.put(_key(i), _arrays(i))
        s = cache.stats()
        assert s.bytes <= budget
        assert s.entries == 10
    survivors = {i for i in range(60) if cache.get(_key(i)) is not None}
    assert survivors == set(range(50, 60))
    _assert_consistent(tmp_path / "c")


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    probe = TokenCache(tmp_path / "probe", 10**7, FP)
    probe.put(_key(0), _arrays(0))
    entry = probe.stats().bytes
    cache = TokenCache(tmp_path / "c", 3 * entry + entry // 2, FP)
    for i in range(3):
        cache.put(_key(i), _arrays(i))
    cache.get(_key(0))
    cache.close()
    restarted = TokenCache(tmp_path / "c", 3 * entry + entry // 2, FP)
    restarted.put(_key(3), _arrays(3))
    assert restarted.get(_key(1)) is None
    assert restarted.get(_key(0)) is not None


def test_smaller_budget_after_restart_evicts_at_start(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    for i in range(6):
        cache.put(_key(i), _arrays(i))
    entry = cache.stats().bytes // 6
    cache.close()
    smaller = TokenCache(tmp_path, 2 * entry + entry // 2, FP)
    assert smaller.stats().entries == 2
    assert {i for i in range(6) if smaller.get(_key(i)) is not None} == {4, 5}
    _assert_consistent(tmp_path)


def test_entry_larger_than_budget_is_not_stored(tmp_path: Path, caplog) -> None:
    cache = TokenCache(tmp_path, 200, FP)
    with caplog.at_level(logging.INFO, logger="token_cache"):
        cache.put(_key(8), {"big": np.random.default_rng(0).standard_normal(1000)})
    assert "exceeds the budget" in caplog.text
    assert cache.get(_key(8)) is None
    assert cache.stats().entries == 0
    disabled = TokenCache(tmp_path / "off", 0, FP)  # a zero budget disables the cache
    disabled.put(_key(8), _arrays(8))
    assert disabled.get(_key(8)) is None


def test_failed_write_is_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)

    def disk_full(fd: int) -> None:  # the OS boundary: a full disk fails the temp file's fsync
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache.os, "fsync", disk_full)
    with caplog.at_level(logging.WARNING, logger="token_cache"):
        cache.put(_key(1), _arrays(1), compute_seconds=1.0)
    assert "could not store" in caplog.text
    monkeypatch.undo()
    assert cache.get(_key(1)) is None
    _assert_consistent(tmp_path)  # no temp file left behind
    cache.put(_key(1), _arrays(1))
    _assert_same(cache.get(_key(1)), _arrays(1))


def test_index_held_by_another_process_degrades_gracefully(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(token_cache, "BUSY_TIMEOUT_MS", 50)
    cache = TokenCache(tmp_path, 10**7, FP)
    cache.put(_key(1), _arrays(1))
    blocker = sqlite3.connect(tmp_path / "wav2token" / "index.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another server holds the write lock past our timeout
    try:
        with caplog.at_level(logging.WARNING, logger="token_cache"):
            _assert_same(cache.get(_key(1)), _arrays(1))  # reads still work; only the LRU bump waits
            cache.put(_key(2), _arrays(2))  # skipped with a warning, not an exception
        assert "could not store" in caplog.text
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert cache.get(_key(2)) is None
    cache.put(_key(2), _arrays(2))
    _assert_same(cache.get(_key(2)), _arrays(2))
    _assert_consistent(tmp_path)


# --------------------------------------------------------------------------- clear + stats


def test_clear_removes_files_and_index(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    for i in range(5):
        cache.put(_key(i), _arrays(i))
    other = TokenCache(tmp_path, 10**7, FP)  # another process's view of the same directory
    cache.clear()
    assert _payload_files(tmp_path) == {}
    assert _index_rows(tmp_path) == {}
    assert other.get(_key(0)) is None
    assert other.stats().entries == 0
    cache.put(_key(0), _arrays(0))
    _assert_same(other.get(_key(0)), _arrays(0))


def test_stats_count_and_time_saved_adds_up(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    assert cache.stats().hit_ratio == 0.0
    assert cache.get(_key(1)) is None
    cache.put(_key(1), _arrays(1), compute_seconds=1.5)
    assert cache.get(_key(2)) is None
    cache.put(_key(2), _arrays(2), compute_seconds=0.25)
    for _ in range(3):
        cache.get(_key(1))
    cache.get(_key(2))
    cache.put(_key(2), _arrays(2) | _vocoder_arrays(2), compute_seconds=0.75)  # recomputed: its cost now
    cache.get(_key(2), names=("vq02", "prompt_mel"))
    cache.get(_key(2), names=("missing",))  # a record without a wanted array is a miss
    cache.get(_key(2))
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (6, 3, 2)
    assert s.bytes == sum(_payload_files(tmp_path).values())
    assert s.time_saved_s == pytest.approx(3 * 1.5 + 0.25 + 2 * 0.75)
    d = s.as_dict()
    assert d["hit_ratio"] == pytest.approx(6 / 9, abs=1e-6)
    assert d["max_bytes"] == 10**7
    assert set(d) == {"hits", "misses", "entries", "bytes", "max_bytes", "time_saved_s", "hit_ratio"}


# --------------------------------------------------------------------------- concurrency


def _record(i: int, writer: int) -> dict[str, np.ndarray]:
    """Key ``i``'s record as process ``writer`` computes it (the writer is marked in it)."""
    return _arrays(i) | {"writer": np.full(3, writer)}


def _check_record(i: int, got: dict[str, np.ndarray]) -> str | None:
    """None when ``got`` is one writer's whole record of key ``i``, else what is wrong."""
    if sorted(got) != ["vq02", "vq06", "writer"]:
        return f"key {i}: arrays {sorted(got)}"
    writer = int(got["writer"][0])
    want = _record(i, writer)
    if writer not in (0, 1) or any(not np.array_equal(got[n], want[n]) or got[n].dtype != want[n].dtype for n in want):
        return f"key {i}: a torn or wrong record"
    return None


def _hammer(cache_dir: str, max_bytes: int, worker: int, errors, start) -> None:
    """One server process: get-or-put on shared and own keys."""
    cache = TokenCache(Path(cache_dir), max_bytes, FP)
    start.wait(timeout=60)  # both processes hammer at the same time
    rng = np.random.default_rng(worker)
    try:
        for _ in range(HAMMER_ROUNDS):
            shared = int(rng.integers(0, 6))
            own = 100 + worker * 100 + int(rng.integers(0, 6))
            for i in (shared, own):
                got = cache.get(_key(i))
                if got is not None and (problem := _check_record(i, got)):
                    errors.put(problem)
                if got is None or rng.random() < 0.3:  # also overwrite records the other process wrote
                    cache.put(_key(i), _record(i, worker), compute_seconds=0.01)
    except Exception as exc:  # report to the parent rather than dying silently
        errors.put(f"worker {worker}: {exc!r}")


@pytest.mark.parametrize("max_bytes", [10**8, 3_000], ids=["roomy", "tight-budget"])
def test_two_processes_hammering_leave_a_consistent_cache(tmp_path: Path, max_bytes: int) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), max_bytes, w, errors, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    _assert_consistent(tmp_path)
    cache = TokenCache(tmp_path, max_bytes, FP)
    assert cache.stats().bytes <= max_bytes
    if max_bytes == 10**8:  # nothing evicted: every shared key holds one writer's whole record
        for i in range(6):
            got = cache.get(_key(i))
            assert got is not None and _check_record(i, got) is None


def _put_race(cache_dir: str, worker: int, start) -> None:
    """Put this worker's record of each shared key, in step with the other worker."""
    cache = TokenCache(Path(cache_dir), 10**8, FP)
    start.wait(timeout=60)
    for i in range(RACE_KEYS):
        cache.put(_key(i), _record(i, worker), compute_seconds=0.01)


def test_concurrent_puts_from_two_processes_leave_one_whole_record(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_put_race, args=(str(tmp_path), w, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = TokenCache(tmp_path, 10**8, FP)
    for i in range(RACE_KEYS):
        got = cache.get(_key(i))
        assert got is not None and _check_record(i, got) is None
    _assert_consistent(tmp_path)


def test_threads_share_one_cache_object(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache = TokenCache(tmp_path, 10**7, FP)

    def work(i: int) -> bool:
        key = _key(i % 8)
        got = cache.get(key)
        if got is None:
            cache.put(key, _arrays(i % 8), compute_seconds=0.01)
            return True
        _assert_same(got, _arrays(i % 8))
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(200)))
    s = cache.stats()
    assert s.hits + s.misses == 200 and s.entries == 8
    _assert_consistent(tmp_path)


def _open_at_once(cache_dir: str, start, errors) -> None:
    start.wait(timeout=60)
    try:
        TokenCache(Path(cache_dir), 10**6, FP).put(_key(0), _arrays(0))
    except Exception as exc:
        errors.put(repr(exc))


def test_processes_opening_a_fresh_cache_at_once_all_succeed(tmp_path: Path) -> None:
    """Switching a new index to WAL needs an exclusive lock that SQLite does not wait for."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    for round_ in range(6):
        start = ctx.Barrier(4)
        cache_dir = tmp_path / f"fresh{round_}"
        procs = [ctx.Process(target=_open_at_once, args=(str(cache_dir), start, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        _assert_same(TokenCache(cache_dir, 10**6, FP).get(_key(0)), _arrays(0))
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []


# --------------------------------------------------------------------------- killed writers

KILLED_WRITERS = 4  # writers killed with SIGKILL in the middle of a payload write


def _write_big_entries(cache_dir: str, seed: int, started) -> None:
    """A server process writing large payloads without pause (until it is killed)."""
    cache = TokenCache(Path(cache_dir), 10**9, FP)
    noise = np.random.default_rng(seed).integers(0, 255, 4 * 1024**2, dtype=np.uint8)  # incompressible
    started.set()
    i = 0
    while True:
        cache.put(_key(10_000 + 100 * seed + i % 20), {"noise": np.roll(noise, i)}, compute_seconds=0.01)
        i += 1


def _temp_files(cache_dir: Path) -> list[Path]:
    """Temp files anywhere under the cache (whatever directory a writer puts them in)."""
    return list((cache_dir / token_cache.NAMESPACE).rglob(f"*{token_cache.TEMP_SUFFIX}"))


def test_temp_files_of_killed_writers_are_removed_by_the_next_put(tmp_path: Path) -> None:
    """kill -9 during a write leaves a temp file; the next put anywhere removes it, whatever its age."""
    ctx = mp.get_context("spawn")
    survivor = TokenCache(tmp_path, 10**9, FP)
    left_behind = []
    for round_ in range(KILLED_WRITERS):
        for _attempt in range(5):  # a kill can land just after the rename: then that writer left nothing
            started = ctx.Event()
            writer = ctx.Process(target=_write_big_entries, args=(str(tmp_path), round_, started))
            writer.start()
            assert started.wait(timeout=120)
            deadline = time.monotonic() + 60
            while not _temp_files(tmp_path):  # wait until it is inside a write, then kill it there
                assert time.monotonic() < deadline and writer.is_alive()
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(timeout=30)
            if _temp_files(tmp_path):
                break
        left_behind.append(len(_temp_files(tmp_path)))  # a kill right after the open leaves an empty one
        if round_ < KILLED_WRITERS - 1:
            survivor.put(_key(round_), _arrays(round_))  # any put cleans up after the dead
        else:
            survivor.close()
            TokenCache(tmp_path, 10**9, FP)  # ... and so does a start-up, at once
        assert _temp_files(tmp_path) == [], f"round {round_}"
    assert min(left_behind) > 0  # every kill really left a temp file behind
    _assert_consistent(tmp_path)


def test_a_live_writers_temp_file_is_never_taken(tmp_path: Path) -> None:
    """Another cache object (here in the same process, as in another one) leaves a live writer's temp alone."""
    writer = TokenCache(tmp_path, 10**7, FP)
    in_flight = writer._temps.write(_key(1), b"half written")  # a put of ``writer`` in progress
    other = TokenCache(tmp_path, 10**7, FP)
    other.put(_key(2), _arrays(2))
    assert in_flight.exists()
    writer.close()  # its lock is released, so its leftovers go
    other.put(_key(3), _arrays(3))
    assert not in_flight.exists()
    _assert_consistent(tmp_path)
