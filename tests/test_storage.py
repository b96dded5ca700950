"""Stores on a disk that refuses writes: durable writes, the voice store, the token cache, the
start-up check, and the message of a PATH search that was refused (issue 19, item 8).

A read-only or full file system is injected at the OS calls (``tests.unwritable.refuse_writes``);
the real ones (permission bits, a 20 MB tmpfs) drive the whole server in test_api_storage.py.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from api.app import create_app
from engine.types import AudioInput
from engine.voices import VoiceStore
from errors import StorageError
from fsutil import WriterTemps, probe_writable
from settings import Settings
from tests.unwritable import refuse_writes, without_root_powers
from token_cache import TokenCache, content_key

REPO = Path(__file__).resolve().parents[1]
FP = "fingerprint"
REFUSALS = pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])


def _clip(seconds: float = 0.3, scale: float = 0.1) -> AudioInput:
    t = np.arange(int(16000 * seconds)) / 16000
    return AudioInput((scale * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None], 16000)


def _key(i: int) -> str:
    return content_key(np.full(160, i, dtype=np.float32), 16000)


def _arrays(i: int) -> dict[str, np.ndarray]:
    return {"vq02": np.arange(i, i + 50, dtype=np.int64), "mel": np.full((4, 8), i, dtype=np.float32)}


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp") if p.is_file()]


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern)) if p.is_file()}


# --------------------------------------------------------------------------- fsutil


@REFUSALS
def test_a_refused_replace_leaves_the_old_file_and_no_temp_file(tmp_path: Path, code: int) -> None:
    target = tmp_path / "voice.npz"
    target.write_bytes(b"old voice")
    temps = WriterTemps(tmp_path / ".tmp")
    temps.replace("voice", b"first", target)  # the temp area and the writer's lock exist from here on
    with refuse_writes(tmp_path, code), pytest.raises(OSError) as refused:
        temps.replace("voice", b"new voice", target)
    assert refused.value.errno == code
    assert target.read_bytes() == b"first"
    assert list((tmp_path / ".tmp").glob("*.tmp")) == []
    temps.replace("voice", b"new voice", target)  # writable again: works at once
    assert target.read_bytes() == b"new voice"


@REFUSALS
def test_the_probe_says_why_a_directory_cannot_be_written(tmp_path: Path, code: int) -> None:
    assert probe_writable(tmp_path / "new" / "dir") is None
    with refuse_writes(tmp_path, code):
        assert (
            probe_writable(tmp_path)
            == {errno.EROFS: "Read-only file system", errno.ENOSPC: "No space left on device"}[code]
        )
        assert probe_writable(tmp_path / "missing") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # the probes left nothing behind


# --------------------------------------------------------------------------- voices


@REFUSALS
def test_voice_writes_refused_raise_storage_error_and_change_nothing(tmp_path: Path, code: int, caplog) -> None:
    store = VoiceStore(tmp_path)
    store.register("keep", _clip(), "kept words")
    store.register("spare", _clip(0.2), "spare words")
    before = _files(tmp_path, "*.npz")
    with refuse_writes(tmp_path, code), caplog.at_level(logging.WARNING, logger="engine.voices"):
        for name in ("keep", "new"):  # a replacement and a new voice
            with pytest.raises(StorageError, match="voices directory cannot be written") as refused:
                store.register(name, _clip(0.4), "other words")
            assert refused.value.code == "storage_unavailable"
        if code == errno.EROFS:
            with pytest.raises(StorageError, match="cannot be deleted"):
                store.delete("spare")
        else:  # a full disk still lets a voice go: that frees space
            store.delete("spare")
            before.pop("spare.npz")
        assert store.get("keep").transcript == "kept words"
    assert str(tmp_path) in caplog.text  # the log names the directory; the client message does not
    assert _files(tmp_path, "*.npz") == before  # byte for byte
    assert _temp_files(tmp_path) == []
    store.register("new", _clip(0.4), "other words")  # writable again
    assert store.names() == ["keep", "new"] if code == errno.ENOSPC else ["keep", "new", "spare"]


def test_a_voice_store_opens_where_its_directory_cannot_be_made(tmp_path: Path) -> None:
    """An empty read-only cache directory: the store serves no voices and refuses new ones."""
    with refuse_writes(tmp_path, errno.EROFS):
        store = VoiceStore(tmp_path / "voices")
        assert store.names() == [] and store.voices() == []
        with pytest.raises(StorageError, match="Read-only file system"):
            store.register("v", _clip(), "words")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- token cache


@REFUSALS
def test_cache_writes_refused_keep_hits_and_stored_entries(tmp_path: Path, code: int, caplog) -> None:
    cache = TokenCache(tmp_path, 10**7, FP)
    for i in range(3):
        cache.put(_key(i), _arrays(i), compute_seconds=1.0)
    before = _files(tmp_path, "*.npz")
    with refuse_writes(tmp_path, code), caplog.at_level(logging.WARNING, logger="token_cache"):
        cache.put(_key(10), _arrays(10))  # neither raises nor half-writes anything
        cache.put(_key(11), _arrays(11))
        for i in range(3):
            got = cache.get(_key(i))
            assert got is not None and np.array_equal(got["vq02"], _arrays(i)["vq02"])
        assert cache.get(_key(10)) is None
        if code == errno.EROFS:
            with pytest.raises(StorageError, match="cannot be cleared"):
                cache.clear()
    stores = [r for r in caplog.records if r.levelno == logging.WARNING and "could not store" in r.getMessage()]
    assert len(stores) == 1  # a disk that stays full is logged once a minute, not per request
    assert _files(tmp_path, "*.npz") == before
    assert _temp_files(tmp_path) == []
    assert cache.stats().entries == 3
    cache.put(_key(10), _arrays(10))  # the disk takes writes again: so does the cache, at once
    assert cache.get(_key(10)) is not None


def test_a_cache_whose_directory_cannot_be_made_misses_and_recovers(tmp_path: Path, caplog) -> None:
    with refuse_writes(tmp_path, errno.EROFS), caplog.at_level(logging.INFO, logger="token_cache"):
        cache = TokenCache(tmp_path / "cache", 10**7, FP)
        cache.put(_key(1), _arrays(1))
        assert cache.get(_key(1)) is None
        assert cache.stats().entries == 0
        with pytest.raises(StorageError):
            cache.clear()
    assert "cannot be written" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "start-up" in r.getMessage()]
    cache.put(_key(1), _arrays(1))  # no restart needed once the directory can be made
    assert cache.get(_key(1)) is not None


# --------------------------------------------------------------------------- start-up


def test_startup_names_each_directory_that_cannot_be_written_once(tmp_path: Path, caplog) -> None:
    cache_dir, voices_dir = tmp_path / "cache", tmp_path / "voices"
    settings = Settings(cache_dir=cache_dir, voices_dir=voices_dir, ui=False)
    with refuse_writes(voices_dir, errno.EROFS), caplog.at_level(logging.WARNING):
        create_app(settings)  # no exception: the server starts and serves what it can
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert str(voices_dir) in lines[0] and "--voices-dir" in lines[0] and "Read-only file system" in lines[0]
    caplog.clear()
    with refuse_writes(tmp_path, errno.ENOSPC), caplog.at_level(logging.WARNING):
        create_app(settings.model_copy(update={"voices_dir": None}))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines  # one per directory: the cache and its voices
    assert str(cache_dir) in lines[0] and "--cache-dir" in lines[0] and "No space left on device" in lines[0]
    assert str(cache_dir / "voices") in lines[1] and "default <cache-dir>/voices" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_app(settings)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------- PATH search


def test_a_refused_path_search_at_model_load_names_the_directory(tmp_path: Path, tiny_bundle: Path) -> None:
    """funasr runs ``ffmpeg -version`` on import; a PATH entry the user may not search made that
    "[Errno 13] Permission denied: 'ffmpeg'" (no ffmpeg on PATH here: only the blocked entry)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    blocked.chmod(0)
    code = textwrap.dedent(f"""
        import torch
        import model_loader
        from errors import ModelLoadError
        from model_files import FUNASR_MODEL_ID, TOKENIZER_DIR
        try:
            tokenizer_dir = {str(tiny_bundle)!r} + "/" + TOKENIZER_DIR
            model_loader.load_tokenizer(tokenizer_dir, FUNASR_MODEL_ID, torch.device("cpu"))
        except ModelLoadError as exc:
            print(exc)
    """)
    try:
        out = subprocess.run(
            without_root_powers([sys.executable, "-c", code]),
            cwd=REPO,
            env={"PATH": str(blocked), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        blocked.chmod(0o755)
    message = out.stdout.strip()
    assert "ffmpeg" in message and str(blocked) in message and "PATH" in message, out.stdout + out.stderr
    assert "Remove it from PATH" in message


def test_a_demo_bundle_that_cannot_be_written_names_the_setting(tmp_path: Path) -> None:
    from api.demo import demo_settings
    from errors import ModelLoadError

    settings = Settings(demo=True, cache_dir=tmp_path / "cache", ui=False)
    with refuse_writes(tmp_path, errno.EROFS), pytest.raises(ModelLoadError) as refused:
        demo_settings(settings)
    assert str(tmp_path / "cache") in str(refused.value) and "--cache-dir" in str(refused.value)
    assert "Read-only file system" in str(refused.value)
