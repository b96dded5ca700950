"""Real streaming through the real server (uvicorn on loopback, tiny bundle): audio leaves while the LLM runs.

The evidence that audio left during generation is server-side and does not depend on how fast
this machine is: on a bundle whose LLM never stops before its cap (``eos=False``), a client that
leaves right after its first audio bytes stops a generation that would otherwise have run to
``NEVER_ENDING`` ids; the generation's own log line says how many it sampled.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from api.audio_io import to_s16le
from bundles import write_bundle
from engine.types import CloneRequest, EditStep, StreamInfo
from tests.api_live import LiveServer, live_server, test_settings
from tests.test_api_units import FORMATS, decode

LONG = 150  # ids per generation: 3.6 s of audio, several streaming chunks
NEVER_ENDING = 5000  # 2 min of audio: no generation here reaches it before its client leaves
SAMPLES_PER_GROUP = 2880


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(tiny_bundle, tmp_path_factory, "stream-cache", max_new_tokens=LONG, inference_workers=2)


def _body(seed: int, fmt: str = "pcm", **extra: object) -> dict:
    return {
        "input": "A long streamed sentence.",
        "voice": "alloy",
        "response_format": fmt,
        "step_audio": {"seed": seed},
    } | extra


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M)]
    return sum(values)


def decode_stream(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """A streamed FLAC has no total length, which libsndfile needs: FFmpeg reads it, as players do."""
    if fmt != "flac":
        return decode(data, fmt)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)]), stream.rate


class _Collect:
    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []

    def start(self, info: StreamInfo) -> None:
        pass

    def put(self, piece: np.ndarray) -> None:
        self.pieces.append(piece)


def test_sse_pieces_are_the_engines_stream(http: httpx.Client, server: LiveServer) -> None:
    before_sum = _metric(http, "step_audio_stream_first_audio_generation_fraction_sum")
    before_n = _metric(http, "step_audio_stream_first_audio_generation_fraction_count")
    with http.stream("POST", "/v1/audio/speech", json=_body(31, stream_format="sse")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-step-audio-seed"] == "31"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    assert len(events) > 3, "a long generation arrives in several pieces"
    assert events[-1]["usage"]["output_tokens"] > 50
    streamed = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert _metric(http, "step_audio_stream_first_audio_generation_fraction_count") == before_n + 1
    fraction = _metric(http, "step_audio_stream_first_audio_generation_fraction_sum") - before_sum
    assert 0 < fraction <= 1, fraction

    # the pieces are the engine's streamed output for this request, byte for byte
    engine = server.app.state.step_audio.engine
    audio, transcript = engine.default_voice()
    sink = _Collect()
    engine.clone(CloneRequest(audio, transcript, "A long streamed sentence.", seed=31), sink=sink)
    assert streamed == to_s16le(np.concatenate(sink.pieces))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_streams_and_decodes(http: httpx.Client, fmt: str) -> None:
    with http.stream("POST", "/v1/audio/speech", json=_body(7, fmt, stream_format="audio")) as r:
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        chunks = [c for c in r.iter_bytes() if c]
    assert len(chunks) > 1
    y, sr = decode_stream(b"".join(chunks), fmt)
    pcm = http.post("/v1/audio/speech", json=_body(7, "pcm", stream_format="audio")).content
    n = len(pcm) // 2
    assert sr == 24000 and n % SAMPLES_PER_GROUP == 0
    tolerance = 0 if fmt in ("wav", "flac", "pcm") else 2048  # codec frame padding
    assert abs(len(y) - n) <= tolerance, (len(y), n)


def test_a_bad_streamed_request_is_still_a_proper_error(http: httpx.Client) -> None:
    r = http.post("/v1/audio/speech", json=_body(1, stream_format="audio") | {"voice": "nobody"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"


@pytest.fixture(scope="module")
def no_eos_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with an LLM that never samples a stop id: generations run to their cap."""
    return write_bundle(tmp_path_factory.mktemp("no-eos-bundle"), "tiny", eos=False)


@pytest.fixture(scope="module")
def endless(no_eos_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Every generation would run to NEVER_ENDING ids."""
    settings = test_settings(no_eos_bundle, tmp_path_factory.mktemp("no-eos-cache"), enable_auto_transcribe=False)
    with LiveServer(settings, max_new_tokens=NEVER_ENDING) as live:
        yield live


def test_first_audio_arrives_while_generating_and_leaving_stops_it(
    endless: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm.decode")
    service = endless.app.state.step_audio.service
    with (
        httpx.Client(base_url=endless.url, timeout=300) as c,
        c.stream("POST", "/v1/audio/speech", json=_body(13, stream_format="audio")) as r,
    ):
        assert r.status_code == 200
        first = next(r.iter_bytes())  # the first audio arrived; now the client goes away
    assert len(first) > 0
    deadline = time.monotonic() + 120
    while service.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.running == 0
    lines = [m for rec in caplog.records if (m := rec.getMessage()).startswith("generated ")]
    assert len(lines) == 1, lines
    generated = int(re.match(r"generated (\d+) ids", lines[0]).group(1))
    # the generation was still running when the audio arrived, and it stopped when the client left
    assert generated < NEVER_ENDING, lines[0]


def _steps_by_batch_size(http: httpx.Client) -> tuple[float, float]:
    """(decode steps in all, steps that served one request alone) from the batch-size histogram."""
    text = http.get("/metrics").text
    count = re.search(r'^step_audio_llm_batch_size_count\{variant="base"\} (\S+)$', text, flags=re.M)
    alone = re.search(r'^step_audio_llm_batch_size_bucket\{le="1.0",variant="base"\} (\S+)$', text, flags=re.M)
    return (float(count.group(1)), float(alone.group(1))) if count and alone else (0.0, 0.0)


def test_concurrent_requests_share_decode_steps_and_equal_their_solo_runs(
    no_eos_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = test_settings(
        no_eos_bundle, tmp_path_factory.mktemp("batch-cache"), enable_auto_transcribe=False, inference_workers=4
    )
    bodies = [_body(200 + i, "pcm") for i in range(4)]
    with LiveServer(settings, max_new_tokens=200) as live, httpx.Client(base_url=live.url, timeout=300) as http:
        alone = []
        for body in bodies:
            alone.append(http.post("/v1/audio/speech", json=body).content)
        steps, solo = _steps_by_batch_size(http)
        assert steps > 0 and steps == solo  # one at a time: every step served one request

        def post(body: dict) -> bytes:
            with httpx.Client(base_url=live.url, timeout=300) as c:
                r = c.post("/v1/audio/speech", json=body)
                assert r.status_code == 200, r.text
                return r.content

        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(post, bodies))
        steps_after, solo_after = _steps_by_batch_size(http)
    shared = (steps_after - steps) - (solo_after - solo)
    assert shared > 0, "concurrent requests shared decode steps"
    assert together == alone  # joining a running batch does not change a request's audio


def test_the_last_step_of_a_chain_streams(http: httpx.Client, server: LiveServer) -> None:
    """A clone + emotion chain: the clone runs whole, the edit's audio is streamed as it is made."""
    body = _body(61, stream_format="sse") | {
        "step_audio": {"seed": 61, "edits": [{"mode": "emotion", "edit_info": "happy"}]}
    }
    with http.stream("POST", "/v1/audio/speech", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-step-audio-iterations"] == "2"
        assert r.headers["x-step-audio-edits"] == "emotion=happy"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    streamed = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])

    engine = server.app.state.step_audio.engine
    audio, transcript = engine.default_voice()
    request = CloneRequest(
        audio, transcript, "A long streamed sentence.", seed=61, edits=(EditStep("emotion", "happy"),)
    )
    sink = _Collect()
    result = engine.clone(request, sink=sink)
    assert streamed == to_s16le(np.concatenate(sink.pieces))  # only the last step's audio, as it was made
    whole = engine.clone(request)
    np.testing.assert_array_equal(result.iterations[0], whole.iterations[0])  # the clone step ran whole
