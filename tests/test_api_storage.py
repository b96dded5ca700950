"""The whole server on storage that cannot be written (issue 19, item 8), over loopback HTTP.

Every write path answers OpenAI's envelope (503, ``storage_unavailable``) instead of a 500,
speech keeps working uncached, the start-up names the directory and its setting in one line,
what was stored reads back byte for byte, and everything works again once the disk does.
Three ways to refuse writes: injected ``EROFS`` / ``ENOSPC`` at the OS calls (the server in this
process), real permission bits (``api_server.py`` as its own process, without root's file
capabilities when the tests run as root), and a real full 20 MB tmpfs (its own user and mount
namespace, skipped where the machine forbids them).
"""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from api.demo import DEMO_BUNDLE_DIR
from settings import Settings
from tests.api_live import LOOPBACK, LiveServer
from tests.unwritable import in_small_filesystem, make_read_only, make_writable, refuse_writes, without_root_powers

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
START_TIMEOUT_S = 240


def _clip(scale: float) -> bytes:
    """The default voice at another level: other samples, so another cache key."""
    samples, sr = sf.read(VOICE_WAV, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples * scale, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _register(http: httpx.Client, name: str, scale: float) -> httpx.Response:
    return http.post(
        "/v1/voices", data={"name": name, "transcript": VOICE_TEXT}, files={"file": ("v.wav", _clip(scale))}
    )


def _speak(http: httpx.Client, *, voice: str | None = None, prompt_scale: float | None = None) -> httpx.Response:
    body: dict[str, object] = {"input": "Still speaking.", "step_audio": {"seed": 3}}
    if voice is not None:
        body["voice"] = voice
    else:
        body["step_audio"] = {
            "seed": 3,
            "prompt_text": VOICE_TEXT,
            "prompt_audio_base64": base64.b64encode(_clip(prompt_scale or 0.5)).decode(),
        }
    return http.post("/v1/audio/speech", json=body)


def _assert_refused(r: httpx.Response, *reasons: str) -> None:
    """A 503 in OpenAI's envelope that says what cannot be written and why (one of ``reasons``)."""
    assert r.status_code == 503, r.text
    assert r.headers["x-should-retry"] == "false"  # OpenAI's clients would retry a 5xx at once
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "storage_unavailable"), error
    assert "cannot be written" in error["message"] and any(x in error["message"] for x in reasons), error


def _stored(root: Path) -> dict[str, bytes]:
    """Every stored voice and cache payload, by path, byte for byte (the demo bundle link not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != DEMO_BUNDLE_DIR]
        for name in files:
            if name.endswith(".npz"):
                path = Path(folder) / name
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def _temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.tmp") if p.is_file()]


def _entries(http: httpx.Client) -> int:
    return int(http.get("/v1/cache/stats").json()["entries"])


# --------------------------------------------------------------------------- injected, in this process


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def test_write_paths_answer_the_envelope_and_speech_goes_on(
    tmp_path: Path, tiny_bundle: Path, code: int, caplog
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / DEMO_BUNDLE_DIR).symlink_to(tiny_bundle, target_is_directory=True)
    settings = Settings(demo=True, cache_dir=cache, api_host=LOOPBACK, device="cpu", ui=False)  # type: ignore[call-arg]
    reason = os.strerror(code)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=300) as http:
        assert _register(http, "keep", 0.9).status_code == 201
        assert _register(http, "spare", 0.8).status_code == 201
        assert _speak(http, voice="keep").status_code == 200
        entries = _entries(http)
        before = _stored(cache)
        with refuse_writes(cache, code), caplog.at_level(logging.WARNING):
            _assert_refused(_register(http, "new", 0.7), reason)
            _assert_refused(_register(http, "keep", 0.6), reason)  # a replacement leaves the old voice
            if code == errno.EROFS:
                _assert_refused(http.delete("/v1/voices/spare"), reason)
                _assert_refused(http.delete("/v1/cache"), reason)
            r = _speak(http, prompt_scale=0.4)  # a new prompt: computed, and its record not stored
            assert r.status_code == 200, r.text
            assert _speak(http, voice="keep").status_code == 200
            assert _entries(http) == entries
            assert [v["id"] for v in http.get("/v1/voices").json()["data"] if v["source"] == "registered"] == [
                "keep",
                "spare",
            ]
        assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
        assert _stored(cache) == before
        assert _temp_files(cache) == []
        # the disk takes writes again: so does the server, without a restart
        assert _register(http, "new", 0.7).status_code == 201
        assert _speak(http, prompt_scale=0.4).status_code == 200
        assert _entries(http) > entries
        assert http.delete("/v1/voices/spare").status_code == 200
        assert http.delete("/v1/cache").status_code == 200


# --------------------------------------------------------------------------- api_server.py as its own process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextmanager
def _server_process(cache: Path, wrap=lambda argv: argv) -> Iterator[tuple[httpx.Client, subprocess.Popen, Path]]:
    """``api_server.py --demo`` serving ``cache`` (its command line passed through ``wrap``)."""
    port = _free_port()
    log = cache.parent / f"server-{port}.log"
    argv = [sys.executable, "api_server.py", "--demo", "--no-ui", "--api-host", LOOPBACK, "--api-port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            wrap(argv),
            cwd=REPO,
            env={**os.environ, "STEP_AUDIO_CACHE_DIR": str(cache)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=300) as http:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield http, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_read_only_directories_for_real(tmp_path: Path, tiny_bundle: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / DEMO_BUNDLE_DIR).symlink_to(tiny_bundle, target_is_directory=True)
    with _server_process(cache) as (http, _, _):
        assert _register(http, "keep", 0.9).status_code == 201
    make_read_only(cache)
    before = {str(p): p.read_bytes() for p in cache.rglob("*") if p.is_file() and not p.is_symlink()}
    try:
        with _server_process(cache, without_root_powers) as (http, _, log):
            assert _speak(http, voice="keep").status_code == 200
            assert _speak(http, prompt_scale=0.4).status_code == 200
            _assert_refused(_register(http, "new", 0.7), "Permission denied")
            _assert_refused(http.delete("/v1/voices/keep"), "Permission denied")
            _assert_refused(http.delete("/v1/cache"), "readonly database")  # SQLite's words
            assert http.get("/v1/voices/keep").json()["source"] == "registered"
            text = log.read_text()
        storage_lines = [line for line in text.splitlines() if "cannot be written" in line and "api.app" in line]
        assert len(storage_lines) == 2, text  # one line per directory, at start
        assert f"cache directory {cache} (--cache-dir" in storage_lines[0]
        assert f"voices directory {cache / 'voices'} (--voices-dir" in storage_lines[1]
        assert "Traceback" not in text, text
        after = {str(p): p.read_bytes() for p in cache.rglob("*") if p.is_file() and not p.is_symlink()}
        assert after == before  # every stored file, the index included, byte for byte
    finally:
        make_writable(cache)
    with _server_process(cache) as (http, _, _):
        hits = http.get("/v1/cache/stats").json()["hits"]
        assert _speak(http, voice="keep").status_code == 200
        assert http.get("/v1/cache/stats").json()["hits"] == hits + 1  # the stored record is intact
        assert _register(http, "new", 0.7).status_code == 201
        assert http.delete("/v1/voices/keep").status_code == 200
        assert http.delete("/v1/cache").status_code == 200


@pytest.mark.slow
def test_a_full_file_system_for_real(tmp_path: Path, tiny_bundle: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    links = {DEMO_BUNDLE_DIR: tiny_bundle}
    if in_small_filesystem(cache, ["true"], links=links) is None:
        pytest.skip("no unprivileged user and mount namespaces here (unshare -rm): no small file system to fill")
    with _server_process(cache, lambda argv: in_small_filesystem(cache, argv, links=links) or argv) as (http, proc, _):
        inside = Path(f"/proc/{proc.pid}/root{cache}")  # the tmpfs, as the server sees it
        assert _register(http, "keep", 0.9).status_code == 201
        assert _register(http, "spare", 0.8).status_code == 201
        entries = _entries(http)
        with (inside / "filler").open("wb") as filler, pytest.raises(OSError) as full:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        assert full.value.errno == errno.ENOSPC
        before = _stored(inside)
        _assert_refused(_register(http, "new", 0.7), "No space left on device")
        _assert_refused(_register(http, "keep", 0.6), "No space left on device")
        assert _speak(http, prompt_scale=0.4).status_code == 200
        assert _speak(http, voice="keep").status_code == 200
        assert _entries(http) == entries
        assert _stored(inside) == before
        assert _temp_files(inside) == []
        assert http.delete("/v1/voices/spare").status_code == 200  # removing frees space, as on any full disk
        (inside / "filler").unlink()
        assert _register(http, "new", 0.7).status_code == 201
        assert _speak(http, prompt_scale=0.4).status_code == 200
        assert _entries(http) == entries + 2  # the new voice's clip and the new prompt, both stored now
        assert http.delete("/v1/cache").status_code == 200
