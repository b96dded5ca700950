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

import httpx
import numpy as np
import pytest
import soundfile as sf

from api.app import DEMO_BUNDLE_DIR, DEMO_HEADER
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
