"""The demo server (``--demo``: tiny bundle written under the cache dir) with an API key and
auto-transcription off: voices that survive a restart, auth, busy answers, missing transcripts.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from api.demo import DEMO_BUNDLE_DIR, DEMO_HEADER
from settings import Settings
from tests.api_live import LOOPBACK, LiveServer

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def demo_settings(cache_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "demo": True,
        "cache_dir": cache_dir,
        "api_host": LOOPBACK,
        "device": "cpu",
        "api_key": KEY,
        "enable_auto_transcribe": False,
        "queue_size": 1,
        "inference_workers": 1,  # one runs, one waits, the rest are refused
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """A fresh cache dir whose demo bundle is the session's tiny bundle (writing one takes ~10 s).

    ``--demo`` still goes through ``bundles.write_bundle``, which finds it complete and reuses it.
    """
    cache = tmp_path_factory.mktemp("demo-cache")
    (cache / DEMO_BUNDLE_DIR).symlink_to(tiny_bundle, target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(demo_settings(cache_dir), wait_ready=False) as live:
        with httpx.Client(base_url=live.url, timeout=5) as c:
            # bound at once, loading in the background
            assert c.get("/healthz").json() == {"status": "ok"}
            early = c.get("/readyz", headers=AUTH)
            assert early.status_code in (200, 503)
            if early.status_code == 503:
                assert early.json()["error"]["code"] == "not_ready"
        live.until_ready()
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
        yield c


def wav_bytes(samples: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV")
    return buf.getvalue()


def test_demo_mode_says_so(server: LiveServer, http: httpx.Client, cache_dir: Path) -> None:
    assert (cache_dir / DEMO_BUNDLE_DIR / "Step-Audio-EditX").is_dir()
    r = http.post("/v1/audio/speech", json={"input": "Demo.", "voice": "alloy", "step_audio": {"seed": 1}})
    assert r.status_code == 200, r.text
    assert "noise" in r.headers[DEMO_HEADER]
    assert "noise" in http.get("/healthz").headers[DEMO_HEADER]


def test_api_key_guards_everything_but_healthz(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert anon.get("/healthz").status_code == 200
        for method, path in [("GET", "/readyz"), ("GET", "/v1/models"), ("GET", "/v1/voices"), ("GET", "/metrics"),
                             ("POST", "/v1/audio/speech"), ("DELETE", "/v1/cache"), ("GET", "/openapi.json"),
                             ("POST", "/v1/voices"), ("GET", "/v1/voices/alloy")]:  # fmt: skip
            r = anon.request(method, path, json={"input": "x"})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
        assert anon.get("/docs").status_code == 401  # without the key nothing says which paths exist
        assert anon.get("/docs", headers=AUTH).status_code == 404  # the browser UIs are off with a key
        assert anon.get("/openapi.json", headers=AUTH).json()["paths"]["/v1/audio/speech"]
        wrong = anon.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"


def test_missing_transcript_with_auto_transcription_off(http: httpx.Client) -> None:
    b64 = base64.b64encode(VOICE_WAV.read_bytes()).decode()
    r = http.post("/v1/audio/speech", json={"input": "x", "step_audio": {"prompt_audio_base64": b64}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "step_audio.prompt_text"
    assert "--enable-auto-transcribe" in r.json()["error"]["message"]
    edit = {"mode": "emotion", "edit_info": "happy", "input_audio_base64": b64}
    r = http.post("/v1/audio/speech", json={"step_audio": edit})
    assert r.status_code == 400 and r.json()["error"]["param"] == "step_audio.audio_text"
    # denoise and vad name no text: no transcript needed
    r = http.post("/v1/audio/speech", json={"step_audio": {"mode": "vad", "input_audio_base64": b64}})
    assert r.status_code == 200, r.text


def test_urls_are_off_by_default(http: httpx.Client) -> None:
    r = http.post(
        "/v1/audio/speech",
        json={"input": "x", "step_audio": {"prompt_audio_url": "https://example.com/a.wav", "prompt_text": "a"}},
    )
    assert r.status_code == 400 and "disabled" in r.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after(http: httpx.Client, server: LiveServer) -> None:
    b64 = base64.b64encode(VOICE_WAV.read_bytes()).decode()
    body = {
        "step_audio": {
            "mode": "style",
            "edit_info": "whisper",
            "input_audio_base64": b64,
            "audio_text": VOICE_TEXT,
            "n_edit_iter": 4,
        }
    }

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=300, headers=AUTH) as c:
            return c.post("/v1/audio/speech", json=body)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses  # one runs, one waits (queue_size 1)
    busy = next(r for r in responses if r.status_code == 429)
    assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["type"] == "rate_limit_error"
    assert http.get("/healthz").status_code == 200


def test_voices_register_use_override_and_survive_a_restart(
    server: LiveServer, http: httpx.Client, cache_dir: Path
) -> None:
    clip = VOICE_WAV.read_bytes()
    r = http.post("/v1/voices", data={"name": "narrator", "transcript": VOICE_TEXT}, files={"file": ("v.wav", clip)})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "narrator" and r.json()["source"] == "registered"
    # the clip was tokenized at registration: using the voice is a cache hit
    before = http.get("/v1/cache/stats").json()["hits"]
    r = http.post("/v1/audio/speech", json={"input": "Registered.", "voice": "narrator", "step_audio": {"seed": 4}})
    assert r.status_code == 200, r.text
    assert http.get("/v1/cache/stats").json()["hits"] > before
    # an operator's voice named like an OpenAI voice wins over the built-in default
    quiet = (0.05 * np.sin(np.arange(24000) / 7)).astype(np.float32)
    r = http.post(
        "/v1/voices",
        data={"name": "alloy", "transcript": "a quiet hum"},
        files={"file": ("a.wav", wav_bytes(quiet, 24000))},
    )
    assert r.status_code == 201, r.text
    assert http.get("/v1/voices/alloy").json()["transcript"] == "a quiet hum"
    assert http.get("/v1/voices/nova").json()["source"] == "builtin"
    # bad registrations
    assert (
        http.post("/v1/voices", data={"name": "../x", "transcript": "t"}, files={"file": ("a", clip)}).status_code
        == 400
    )
    assert (
        http.post("/v1/voices", data={"name": "ok", "transcript": " "}, files={"file": ("a", clip)}).status_code == 400
    )
    assert (
        http.post("/v1/voices", data={"name": "ok", "transcript": "t"}, files={"file": ("a", b"no")}).status_code == 400
    )
    assert http.get("/v1/voices/ghost").status_code == 404

    with (
        LiveServer(demo_settings(cache_dir, queue_size=4)) as restarted,
        httpx.Client(base_url=restarted.url, timeout=120, headers=AUTH) as again,
    ):
        names = [v["id"] for v in again.get("/v1/voices").json()["data"]]
        assert "narrator" in names and "alloy" in names
        assert again.get("/v1/voices/narrator").json()["transcript"] == VOICE_TEXT
        r = again.post(
            "/v1/audio/speech", json={"input": "Back again.", "voice": "narrator", "step_audio": {"seed": 4}}
        )
        assert r.status_code == 200, r.text
        assert again.delete("/v1/voices/narrator").json()["deleted"] is True
        assert again.get("/v1/voices/narrator").status_code == 404
        assert again.delete("/v1/voices/narrator").status_code == 404


def test_a_client_that_disconnects_frees_its_place(server: LiveServer) -> None:
    b64 = base64.b64encode(VOICE_WAV.read_bytes()).decode()
    slow = {
        "step_audio": {"mode": "style", "edit_info": "whisper", "input_audio_base64": b64, "audio_text": VOICE_TEXT}
    }
    service = server.app.state.step_audio.service
    body = json.dumps(slow).encode()
    raw = (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: {LOOPBACK}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: httpx.post(f"{server.url}/v1/audio/speech", json=slow, headers=AUTH, timeout=300))
        deadline = time.monotonic() + 30
        while service.running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with socket.create_connection((LOOPBACK, server.port)) as sock:  # a client that will hang up
            sock.sendall(raw)
            while service.queued == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert service.queued == 1 and service.running == 1
        while service.queued and time.monotonic() < deadline:
            time.sleep(0.005)
        assert service.queued == 0  # its place is free while the first request still runs
        assert service.running == 1
        assert running.result().status_code == 200


def test_a_bundle_that_cannot_load_is_a_503_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(
        model_path=tmp_path / "no-such-bundle", model_source="local", cache_dir=tmp_path, api_host=LOOPBACK
    )
    with LiveServer(settings, wait_ready=False) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        deadline = time.monotonic() + 60
        while (r := c.get("/readyz")).json()["error"]["code"] != "model_load_failed":
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 503 and "no-such-bundle" in r.json()["error"]["message"]
        speech = c.post("/v1/audio/speech", json={"input": "x", "voice": "alloy"})
        assert speech.status_code == 503 and speech.json()["error"]["code"] == "model_load_failed"
        assert c.get("/healthz").json() == {"status": "ok"}


RACE_SECONDS = 4.0  # how long the register/get/list/delete loop runs


def test_reads_during_re_registration_and_deletes_never_fail(server: LiveServer, http: httpx.Client) -> None:
    """Readers see the old voice or the new one, never a 404 or a 5xx; a listing survives deletes.

    One thread re-registers ``steady`` over and over (two versions: each transcript belongs to
    one clip length), one registers and deletes ``flicker``, two read ``steady`` and list.
    Registrations may be refused with 429 (queue size 1); nothing else may go wrong.
    """
    clips = {
        f"version {i}": wav_bytes((0.3 * np.sin(np.arange(n) / (5 + i))).astype(np.float32), 16000)
        for i, n in enumerate((8000, 12000))
    }
    seconds = {"version 0": 0.5, "version 1": 0.75}
    problems: list[str] = []
    stop = time.monotonic() + RACE_SECONDS

    def call(c: httpx.Client, what: str, allowed: tuple[int, ...], method: str, path: str, **kw: Any) -> Any:
        try:
            r = c.request(method, path, **kw)
        except httpx.TransportError as exc:  # the server dropped the connection: an unhandled error
            problems.append(f"{what}: {exc!r}")
            return None
        if r.status_code not in allowed:
            problems.append(f"{what}: {r.status_code} {r.text[:200]}")
            return None
        return r

    def register(c: httpx.Client, name: str, text: str) -> Any:
        files = {"file": ("v.wav", clips[text])}
        return call(
            c,
            f"register {name}",
            (201, 429),
            "POST",
            "/v1/voices",
            data={"name": name, "transcript": text},
            files=files,
        )

    def re_register() -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
            while time.monotonic() < stop:
                r = register(c, "steady", f"version {done % 2}")
                done += r is not None and r.status_code == 201
        return done

    def flicker() -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
            while time.monotonic() < stop:
                register(c, "flicker", "version 0")
                r = call(c, "delete flicker", (200, 404), "DELETE", "/v1/voices/flicker")
                done += r is not None and r.status_code == 200
        return done

    def read() -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
            while time.monotonic() < stop:
                r = call(c, "get steady", (200,), "GET", "/v1/voices/steady")
                if r is not None and r.json()["seconds"] != seconds.get(r.json()["transcript"]):
                    problems.append(f"get steady: mixed versions {r.json()}")
                listing = call(c, "list", (200,), "GET", "/v1/voices")
                if listing is not None and "steady" not in [v["id"] for v in listing.json()["data"]]:
                    problems.append("list: steady missing")
                done += 1
        return done

    assert register(http, "steady", "version 0").status_code == 201
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(re_register), pool.submit(flicker), pool.submit(read), pool.submit(read)]
        counts = [j.result() for j in jobs]
    assert problems == [], sorted({p[:60] for p in problems})
    assert counts[0] >= 5 and counts[1] >= 2 and min(counts[2:]) >= 5, counts  # the loop really raced
    assert http.get("/v1/voices/steady").status_code == 200
    assert http.delete("/v1/voices/steady").status_code == 200
