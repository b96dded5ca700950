"""Size bounds, text that is not UTF-8, and the per-request cache header, through the real server
at the default limits (uvicorn on loopback, real engine on the tiny bundle, no API key).

The requests are the ones an outside probe of the server sent (issue 19): each must be a 4xx in
OpenAI's envelope naming the field, decided before any work, while the server stays responsive.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from api.limits import derived_body_limit
from tests.api_live import LiveServer, live_server
from tests.test_api_boundary import CHUNK, chunked, exchange, request_head

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
MB = 1 << 20
LIMIT = 4096  # --max-input-chars, default


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    for live in live_server(tiny_bundle, tmp_path_factory, "limits-cache", enable_auto_transcribe=False):
        settings = live.app.state.step_audio.settings
        assert settings.max_input_chars == LIMIT and settings.max_body_bytes is None  # the defaults under test
        yield live


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def unique_clip(seed: int) -> str:
    """The default voice with a little seeded noise: speech whose cache key no earlier request used."""
    samples, sr = sf.read(VOICE_WAV, dtype="float32")
    noise = np.random.default_rng(seed + time.time_ns()).normal(0, 1e-3, samples.shape).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples + noise, sr, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


# --- every text field has a bound --------------------------------------------------------------

TEXT = "A short sentence."
_EDIT = {"mode": "emotion", "edit_info": "happy"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x" * (LIMIT + 1), "voice": "alloy"}, "input"),
        ({"input": TEXT, "voice": "alloy", "instructions": "Speak cheerfully. " * 60_000}, "instructions"),
        (
            {
                "input": TEXT,
                "voice": "alloy",
                "step_audio": {"edits": [{"mode": "paralinguistic", "text": "y" * 20_000}]},
            },
            "step_audio.edits[0].text",
        ),
        ({"input": TEXT, "voice": "alloy", "step_audio": {"prompt_text": "p" * (LIMIT + 1)}}, "step_audio.prompt_text"),
        (
            {"input": TEXT, "step_audio": {"mode": "emotion", "edit_info": "happy", "audio_text": "a" * (LIMIT + 1)}},
            "step_audio.audio_text",
        ),
        ({"input": TEXT, "voice": "v" * 65}, "voice"),
        ({"input": TEXT, "voice": {"id": "v" * 65}}, "voice.id"),
        ({"input": TEXT, "voice": "alloy", "model": "m" * 65}, "model"),
        ({"input": TEXT, "step_audio": {"mode": "emotion", "edit_info": "e" * 65}}, "step_audio.edit_info"),
        (
            {"input": TEXT, "voice": "alloy", "step_audio": {"edits": [{"mode": "emotion", "edit_info": "e" * 65}]}},
            "step_audio.edits[0].edit_info",
        ),
        (
            {"input": TEXT, "step_audio": {"prompt_audio_url": "https://example.com/" + "u" * 2100}},
            "step_audio.prompt_audio_url",
        ),
        ({"input": TEXT, "voice": "alloy", "step_audio": {"edits": [_EDIT] * 9}}, "step_audio.edits"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_text_field_over_its_bound_is_413_naming_it(http: httpx.Client, body: dict, param: str) -> None:
    error = error_of(http.post("/v1/audio/speech", json=body), 413)
    assert error["param"] == param and error["code"] == "too_large", error


@pytest.mark.parametrize("stream_format", [None, "audio", "sse"])
def test_a_1mb_edit_text_is_the_same_413_whole_or_streamed(http: httpx.Client, stream_format: str | None) -> None:
    body = {
        "input": TEXT,
        "voice": "alloy",
        "stream_format": stream_format,
        "step_audio": {"edits": [{"mode": "paralinguistic", "text": "Hello [Laughter] there. " * (MB // 24)}]},
    }
    error = error_of(http.post("/v1/audio/speech", json=body), 413)
    assert error["param"] == "step_audio.edits[0].text", error


def test_inline_tags_count_one_chain_step_each(http: httpx.Client) -> None:
    nine = "One [Laughter] two [Sigh] three [Breathing] four [Uhm] five [Laughter] six [Sigh] seven "
    nine += "[Breathing] eight [Uhm] nine [Laughter] done."
    error = error_of(http.post("/v1/audio/speech", json={"input": nine, "voice": "alloy"}), 413)
    assert error["param"] == "input" and "9 edit steps" in error["message"], error
    # eight tags are the limit (8): served, as one paralinguistic generation after the clone
    eight = nine.replace(" nine [Laughter]", " nine")
    r = http.post("/v1/audio/speech", json={"input": eight, "voice": "alloy", "step_audio": {"seed": 3}})
    assert r.status_code == 200, r.text
    assert r.headers["x-step-audio-edits"] == "paralinguistic" and r.headers["x-step-audio-iterations"] == "2"
    # tags and listed edits add up
    five = "a [Laughter] b [Sigh] c [Uhm] d [Breathing] e [Laughter] f"
    body = {"input": five, "voice": "alloy", "step_audio": {"edits": [_EDIT] * 4}}
    assert error_of(http.post("/v1/audio/speech", json=body), 413)["param"] == "step_audio.edits"


# --- the body is bounded before it is read, and parsed off the event loop ----------------------


def test_the_body_limit_is_derived_from_the_upload_and_text_limits(server: LiveServer) -> None:
    settings = server.settings
    limit = derived_body_limit(settings)
    one_clip = 4 * -(-settings.max_upload_bytes // 3)
    assert one_clip < limit < one_clip * 1.1  # one base64 clip, wrapped, and the text fields: ~36 MB
    assert limit < 60 * MB < 2 * one_clip  # two clips never fit: a request uses one audio input
    assert derived_body_limit(settings.model_copy(update={"max_upload_bytes": 2 * settings.max_upload_bytes})) > limit


def test_a_60mb_body_is_413_unread_and_healthz_answers_meanwhile(server: LiveServer) -> None:
    """The bulk is an unknown field (ignored when parsed): the body's size alone refuses it."""
    total = 60 * MB
    start, end = b'{"input": "hi", "voice": "alloy", "junk": "', b'"}'
    filler = b"x" * CHUNK

    latencies: list[float] = []

    def body() -> Iterator[bytes]:
        yield start
        for _ in range((total - len(start) - len(end)) // CHUNK):
            yield filler
            if len(latencies) < 5:  # on a fast machine the refusal can beat the first probes: let a few in
                time.sleep(0.001)
        yield end

    sending = threading.Event()
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            c.get("/healthz")  # connected before the upload starts
            sending.wait(30)
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t)
                stop.wait(0.002)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        # chunked: no Content-Length, so the server counts the bytes as they come
        head = request_head(
            "POST", "/v1/audio/speech", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )

        def announced() -> Iterator[bytes]:
            sending.set()
            yield from chunked(body())

        answer = exchange(server.port, head, announced())
    finally:
        stop.set()
        prober.join(30)
    assert answer.status == 413 and answer.json["error"]["code"] == "too_large", answer.json
    assert answer.sent < total, "the whole body was read before the refusal"
    # the refusal comes within ~0.1 s on loopback: a few probes, judged by their median
    assert len(latencies) >= 3, latencies
    assert statistics.median(latencies) < 0.1, sorted(latencies)
    # announced by Content-Length: refused before a byte of it is read
    head = request_head("POST", "/v1/audio/speech", {"Content-Type": "application/json", "Content-Length": str(total)})
    answer = exchange(server.port, head, body())
    assert answer.status == 413 and answer.sent < total // 4, answer.sent


# --- text must be UTF-8 ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\x80"], ids=["invalid-byte", "overlong-nul"])
def test_text_that_is_not_utf8_is_400_naming_the_field(http: httpx.Client, bad: bytes) -> None:
    payload = b'{"input": "Hello ' + bad + b' there.", "voice": "alloy"}'
    # multipart: the payload part is checked as it streams in
    r = http.post("/v1/audio/speech/upload", files={"payload": (None, payload)})
    error = error_of(r, 400)
    assert error["param"] == "payload" and "UTF-8" in error["message"], error
    # a voice's transcript too
    r = http.post(
        "/v1/voices",
        files={
            "name": (None, b"bad-text"),
            "transcript": (None, b"Hi " + bad),
            "file": ("v.wav", VOICE_WAV.read_bytes()),
        },
    )
    assert error_of(r, 400)["param"] == "transcript"
    # JSON: the field that holds the bytes is named
    r = http.post("/v1/audio/speech", content=payload, headers={"Content-Type": "application/json"})
    error = error_of(r, 400)
    assert error["param"] == "input" and "UTF-8" in error["message"], error


def test_a_utf16_json_body_is_400(http: httpx.Client) -> None:
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        data = json.dumps({"input": "Hello there.", "voice": "alloy"}).encode(encoding)
        r = http.post("/v1/audio/speech", content=data, headers={"Content-Type": "application/json"})
        error = error_of(r, 400)
        assert error["code"] == "invalid_json" and "UTF-8" in error["message"], (encoding, error)


def test_a_body_not_declared_as_json_is_415(http: httpx.Client) -> None:
    data = json.dumps({"input": "Hello there.", "voice": "alloy"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = http.post("/v1/audio/speech", content=data, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text


# --- X-Step-Audio-Cache ------------------------------------------------------------------------


def test_the_cache_header_says_miss_then_hit_whole_and_streamed(http: httpx.Client) -> None:
    clip = unique_clip(1)
    body = {"input": TEXT, "step_audio": {"prompt_audio_base64": clip, "prompt_text": VOICE_TEXT, "seed": 5}}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "miss", r.headers
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "hit", r.headers
    for stream_format in ("sse", "audio"):
        with http.stream("POST", "/v1/audio/speech", json=body | {"stream_format": stream_format}) as r:
            assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "hit", (stream_format, r.headers)
            r.read()
    # a chain prepares one prompt per generation: the clip (cached now), then the clone's new output
    for seed, stream_format in ((6, None), (7, "sse")):  # new seeds: outputs no request made before
        chained = body | {
            "stream_format": stream_format,
            "step_audio": body["step_audio"] | {"seed": seed, "edits": [_EDIT]},
        }
        with http.stream("POST", "/v1/audio/speech", json=chained) as r:
            assert r.status_code == 200 and r.headers["x-step-audio-cache"] == "hit,miss", r.headers
            r.read()
