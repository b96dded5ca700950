"""Streams that fail, and a server without a cache, through the real server (uvicorn on loopback,
real engine on tiny bundles).

* A request the engine refuses before its audio starts (a prompt longer than the LLM's length limit,
  found only once the prompt is tokenized) gets the same 4xx streamed as whole: the stream's headers
  leave only once the decode loop has accepted the generation.
* A stream that fails after its first bytes (here: the engine shuts down under it, a real failure
  of the decode loop) ends with an SSE ``error`` event in OpenAI's envelope, or, as chunked audio,
  without HTTP's terminating chunk, so the client sees a broken transfer, not a short file.
* A client that hangs up while its whole-audio (or ``return_iterations``) job runs stops the job and
  is counted as 499.
* With the cache off, ``X-Step-Audio-Cache`` says ``none``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bundles import write_bundle
from tests.api_live import LOOPBACK, LiveServer, test_settings

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
MB = 1 << 20
NEVER_ENDING = 5000  # ids per generation: no stream here reaches it before the engine is shut


@pytest.fixture(scope="module")
def cache_off(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """No prompt cache; text limits high enough that a 1 MB text reaches the engine."""
    settings = test_settings(
        tiny_bundle,
        tmp_path_factory.mktemp("no-cache"),
        cache_max_bytes=0,
        max_input_chars=2 * MB,
        enable_auto_transcribe=False,
    )
    with LiveServer(settings) as live:
        yield live


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_with_the_cache_off_the_cache_header_says_none(cache_off: LiveServer) -> None:
    assert cache_off.app.state.step_audio.engine.cache_stats() == {"enabled": False}
    body = {"input": "Hello there.", "voice": "alloy", "step_audio": {"seed": 1}}
    with httpx.Client(base_url=cache_off.url, timeout=120) as http:
        r = http.post("/v1/audio/speech", json=body)
        assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "none", r.headers
        with http.stream("POST", "/v1/audio/speech", json=body | {"stream_format": "sse"}) as s:
            assert s.status_code == 200 and s.headers["x-step-audio-cache"] == "none", s.headers
            assert _sse_events(s)[-1]["type"] == "speech.audio.done"
        chained = body | {"step_audio": {"seed": 2, "edits": [{"mode": "emotion", "edit_info": "happy"}]}}
        r = http.post("/v1/audio/speech", json=chained)
        assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "none,none", r.headers


def test_a_prompt_the_engine_refuses_is_the_same_4xx_whole_or_streamed(cache_off: LiveServer) -> None:
    body = {
        "input": "Hello there, friend. " * (MB // 21),  # within --max-input-chars, too long a prompt (no tag: one step)
        "step_audio": {
            "mode": "paralinguistic",
            "input_audio_base64": base64.b64encode(VOICE_WAV.read_bytes()).decode(),
            "audio_text": VOICE_TEXT,
        },
    }
    answers = []
    with httpx.Client(base_url=cache_off.url, timeout=300) as http:
        for stream_format in (None, "audio", "sse"):
            r = http.post("/v1/audio/speech", json=body | {"stream_format": stream_format})
            answers.append((r.status_code, r.headers.get("content-type"), r.json()["error"]))
    whole = answers[0]
    assert whole[0] == 400 and whole[2]["param"] == "input" and "tokens" in whole[2]["message"], whole
    assert answers[1:] == [whole, whole], answers


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """An LLM that never samples a stop id: every stream runs until its engine is shut down."""
    bundle = write_bundle(tmp_path_factory.mktemp("no-eos-bundle"), "tiny", eos=False)
    settings = test_settings(bundle, tmp_path_factory.mktemp("no-eos-cache"), enable_auto_transcribe=False)
    with LiveServer(settings, max_new_tokens=NEVER_ENDING) as live:
        yield live


@pytest.mark.parametrize("step_audio", [{}, {"return_iterations": True}], ids=["whole", "iterations"])
def test_a_client_that_hangs_up_on_a_whole_answer_stops_its_job_and_is_a_499(
    endless: LiveServer, step_audio: dict[str, object]
) -> None:
    """Runs before the test that shuts ``endless``'s engine down (the module's last)."""
    service = endless.app.state.step_audio.service
    gone_before = _metric(endless.url, "step_audio_requests_total", mode="clone", status="499")
    body = json.dumps({"input": "A sentence that never ends.", "voice": "alloy", "step_audio": step_audio}).encode()
    raw = (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    deadline = time.monotonic() + 120
    with socket.create_connection((LOOPBACK, endless.port)) as sock:  # a client that will hang up
        sock.sendall(raw)
        while service.running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert service.running == 1
    while service.running and time.monotonic() < deadline:  # a generation that would never end stops
        time.sleep(0.01)
    assert service.running == 0
    gone = gone_before
    counted_by = time.monotonic() + 10  # counted as the request task ends, a moment after the job may
    while gone == gone_before and time.monotonic() < counted_by:
        gone = _metric(endless.url, "step_audio_requests_total", mode="clone", status="499")
    assert gone == gone_before + 1


def test_a_stream_that_fails_after_its_first_bytes_ends_with_an_error(endless: LiveServer) -> None:
    body = {"input": "A sentence that never ends.", "voice": "alloy", "response_format": "pcm"}
    started = threading.Barrier(3, timeout=120)  # both streams have sent audio, and the engine may go
    outcome: dict[str, object] = {}

    def sse() -> None:
        with (
            httpx.Client(base_url=endless.url, timeout=120) as c,
            c.stream("POST", "/v1/audio/speech", json=body | {"stream_format": "sse"}) as r,
        ):
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:
                        started.wait()
            outcome["sse"] = events

    def audio() -> None:
        with (
            httpx.Client(base_url=endless.url, timeout=120) as c,
            c.stream("POST", "/v1/audio/speech", json=body | {"stream_format": "audio"}) as r,
        ):
            assert r.status_code == 200
            received = 0
            try:
                for chunk in r.iter_bytes():
                    if received == 0 and chunk:
                        started.wait()
                    received += len(chunk)
            except httpx.RemoteProtocolError as exc:
                outcome["audio"] = (received, exc)
            else:
                outcome["audio"] = (received, None)

    threads = [threading.Thread(target=f, daemon=True) for f in (sse, audio)]
    for t in threads:
        t.start()
    started.wait()
    endless.app.state.step_audio.engine.close()  # the decode loop stops: running generations fail
    for t in threads:
        t.join(120)

    events = outcome["sse"]
    assert isinstance(events, list) and len(events) >= 2
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
    last = events[-1]
    assert last["type"] == "error", last  # no speech.audio.done: the audio is not complete
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["type"] == "service_unavailable" and last["error"]["code"] == "not_ready", last
    received, error = outcome["audio"]  # type: ignore[misc]
    assert received > 0 and isinstance(error, httpx.RemoteProtocolError), outcome["audio"]
