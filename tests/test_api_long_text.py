"""Long text through the real server: 20 sentences cut into segments, generated side by side, streamed in order.

The server is real (uvicorn on loopback, the real engine on the tiny bundle). The one-by-one
requests are plain requests of each segment's text with seed + k, joined by ``engine.seams``.
Responses are 16-bit PCM, so the join of the one-by-one answers is computed on their 16-bit
samples: equal to the long answer sample for sample away from the seams' 10 ms fades, and within
one step of 16-bit rounding inside them (the server fades before rounding, once).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from audio import PCM16_SCALE
from engine.seams import FADE_SECONDS, join_segments
from tests.api_live import LiveServer, live_server

SR = 24000
SENTENCES = [
    f"Sentence {k} of the long text says something about the number {k}, and then it stops." for k in range(1, 21)
]
TEXT = " ".join(SENTENCES)
SEED = 77


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_bundle,
        tmp_path_factory,
        "long-text-cache",
        max_new_tokens=20,
        enable_auto_transcribe=False,
        segment_max_tokens=40,
        inference_workers=2,
        ui=False,
    )


def body(text: str, seed: int, **extra: object) -> dict:
    return {"input": text, "voice": "alloy", "response_format": "pcm", "step_audio": {"seed": seed}} | extra


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE


def sse_events(http: httpx.Client, payload: dict) -> list[dict]:
    with http.stream("POST", "/v1/audio/speech", json={**payload, "stream_format": "sse"}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def audio_of(events: list[dict]) -> np.ndarray:
    import base64

    return pcm(b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"))


def assert_joined(long: np.ndarray, parts: list[np.ndarray], pause_s: float) -> list[tuple[int, int]]:
    joined, spans = join_segments(parts, sample_rate=SR, pause_s=pause_s)
    assert long.shape == joined.shape
    fade = round(FADE_SECONDS * SR)
    near_seam = np.zeros(long.size, dtype=bool)
    for start, end in spans:
        near_seam[start : start + fade] = near_seam[max(end - fade, 0) : end] = True
    np.testing.assert_array_equal(long[~near_seam], joined[~near_seam])
    assert np.abs(long[near_seam] - joined[near_seam]).max() <= 1.5 / PCM16_SCALE
    return spans


def test_a_long_text_streams_in_order_as_its_segments_one_by_one(http: httpx.Client, server: LiveServer) -> None:
    engine = server.app.state.step_audio.engine
    segments = engine.segments(TEXT)
    assert len(segments) >= 5
    events = sse_events(http, body(TEXT, SEED))
    captions = [e for e in events if e["type"] == "speech.audio.segment"]
    assert [c["index"] for c in captions] == list(range(len(segments)))  # in order
    assert [c["text"] for c in captions] == [s.text for s in segments]
    assert [c["seed"] for c in captions] == [SEED + k for k in range(len(segments))]
    assert [(c["input_start"], c["input_end"]) for c in captions] == [(s.start, s.end) for s in segments]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["segments"] == len(segments)

    parts = [audio_of(sse_events(http, body(s.text, SEED + k))) for k, s in enumerate(segments)]
    spans = assert_joined(audio_of(events), parts, engine.pause_s)
    assert [(c["start"], c["end"]) for c in captions] == spans


def test_a_long_text_whole_is_its_whole_segments_one_by_one(http: httpx.Client, server: LiveServer) -> None:
    engine = server.app.state.step_audio.engine
    segments = engine.segments(TEXT)
    r = http.post("/v1/audio/speech", json=body(TEXT, SEED + 1))
    assert r.status_code == 200 and r.headers["x-step-audio-segments"] == str(len(segments))
    assert r.headers["x-step-audio-truncated"] == "true"  # the tiny LLM never stops: its cap cuts every segment
    parts = [
        pcm(http.post("/v1/audio/speech", json=body(s.text, SEED + 1 + k)).content) for k, s in enumerate(segments)
    ]
    assert_joined(pcm(r.content), parts, engine.pause_s)
    listed = http.post(
        "/v1/audio/speech", json=body(TEXT, SEED + 1, step_audio={"seed": SEED + 1, "return_iterations": True})
    )
    data = listed.json()
    assert [c["text"] for c in data["segments"]] == [s.text for s in segments]
    assert [it["segment"] for it in data["iterations"]] == list(range(len(segments)))
    assert data["truncated"] is True


def _steps(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    found = re.search(r'^step_audio_llm_batch_size_count\{variant="base"\} (\S+)$', text, flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_a_cancelled_long_text_stops_every_segment(http: httpx.Client, server: LiveServer) -> None:
    service = server.app.state.step_audio.service
    with (
        httpx.Client(base_url=server.url, timeout=300) as c,
        c.stream("POST", "/v1/audio/speech", json=body(TEXT + " " + TEXT, SEED, stream_format="audio")) as r,
    ):
        assert r.status_code == 200
        next(r.iter_bytes())  # the first audio; then the client goes away
    deadline = time.monotonic() + 60
    while service.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.running == 0
    before = _steps(http)
    time.sleep(0.5)
    assert _steps(http) == before  # no segment generates any more


def test_the_openai_sdk_speaks_a_long_input_whole_and_streamed(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    whole = client.audio.speech.create(model="step-audio-editx", voice="alloy", input=TEXT, response_format="pcm")
    segments = int(whole.response.headers["x-step-audio-segments"])
    assert segments >= 5 and len(whole.content) > 0
    with client.audio.speech.with_streaming_response.create(
        model="step-audio-editx",
        voice="alloy",
        input=TEXT,
        response_format="pcm",
        extra_body={"stream_format": "audio"},
    ) as streamed:
        chunks = list(streamed.iter_bytes())
    assert len(chunks) > 1 and sum(len(c) for c in chunks) > SR  # more than a second of audio, in pieces
