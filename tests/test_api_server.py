"""End to end: the real server (uvicorn on loopback, real engine, tiny bundle) and the real OpenAI client.

One server for the module. The tiny bundle's weights are random, so the audio is noise; what is
checked is everything around it: formats and their decoders, durations that match the generated
tokens, seeds, intensity, every edit mode, iterations, uploads, streaming, errors, metrics.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.api_live import LiveServer, live_server
from tests.conftest import word_error_rate
from tests.test_api_units import FORMATS, decode

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
SAMPLES_PER_GROUP = 2880  # 5 mixed audio tokens = 3 token frames = 6 mel frames = 120 ms at 24 kHz
TOKENS_PER_GROUP = 5
MAX_UPLOAD = 400_000
MAX_CHARS = 300
EDITS = [
    ("emotion", "happy", ""),
    ("style", "whisper", ""),
    ("speed", "faster", ""),
    ("paralinguistic", None, "Hello, I am [Laughter] the default voice of this speech server."),
    ("denoise", None, ""),
    ("vad", None, ""),
]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_bundle,
        tmp_path_factory,
        "api-cache",
        max_upload_bytes=MAX_UPLOAD,
        max_input_chars=MAX_CHARS,
        allow_audio_urls=True,
        inference_workers=2,  # requests overlap in the engine (tokenizing, vocoding, the batched LLM)
    )


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected_samples(headers: httpx.Headers) -> int:
    n = int(headers["x-step-audio-audio-tokens"])
    return -(-n // TOKENS_PER_GROUP) * SAMPLES_PER_GROUP


def assert_audio(data: bytes, fmt: str, headers: httpx.Headers) -> np.ndarray:
    """Decode with a real decoder: 24 kHz, and as long as the generated tokens make it."""
    y, sr = decode(data, fmt)
    assert sr == 24000
    expected = expected_samples(headers)
    assert expected > 0, "the tiny model generated no audio tokens"
    tolerance = 0 if fmt in ("wav", "flac", "pcm") else 2048  # codec frame padding
    assert abs(len(y) - expected) <= tolerance, (len(y), expected)
    return y


def speech(http: httpx.Client, body: dict, **kw: object) -> httpx.Response:
    return http.post("/v1/audio/speech", json=body, **kw)


# --- OpenAI client --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_openai_client_every_format(client: openai.OpenAI, fmt: str) -> None:
    response = client.audio.speech.create(
        model="step-audio-editx",
        voice="alloy",
        input="Hello from the speech server.",
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={"step_audio": {"seed": 11}},
    )
    headers = response.response.headers
    assert headers["x-step-audio-seed"] == "11"
    assert headers["x-step-audio-iterations"] == "1"
    assert_audio(response.content, fmt, headers)


def test_openai_streaming_response(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="nova",
        input="Streaming works.",
        response_format="wav",
        extra_body={"step_audio": {"seed": 5}},
    ) as response:
        chunks = list(response.iter_bytes(4096))
        headers = response.headers
    assert len(chunks) > 1 and headers["x-step-audio-seed"] == "5"
    y, sr = decode(b"".join(chunks), "wav")
    assert sr == 24000 and len(y) > 0 and len(y) % SAMPLES_PER_GROUP == 0


def test_concurrent_requests_match_sequential_ones(http: httpx.Client, server: LiveServer) -> None:
    bodies = [{"input": f"Sentence number {i}.", "voice": "coral", "step_audio": {"seed": 100 + i}} for i in range(4)]
    alone = [speech(http, b).content for b in bodies]

    def post(body: dict) -> bytes:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = speech(c, body)
            assert r.status_code == 200, r.text
            return r.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(post, bodies))
    assert together == alone  # two workers share the engine without mixing requests up


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3"])
def test_chunked_audio_and_sse(http: httpx.Client, fmt: str) -> None:
    body = {"input": "Chunks please.", "voice": "echo", "response_format": fmt, "step_audio": {"seed": 9}}
    whole = speech(http, body)
    chunked = speech(http, {**body, "stream_format": "audio"})
    assert chunked.status_code == 200 and chunked.headers.get("transfer-encoding") == "chunked"
    # the streaming vocoder: the same length as the whole answer (a different function of the codes)
    assert_audio(chunked.content, fmt, whole.headers)
    with http.stream("POST", "/v1/audio/speech", json={**body, "stream_format": "sse"}) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in sse.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == int(whole.headers["x-step-audio-audio-tokens"])
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert_audio(audio, fmt, whole.headers)
    if fmt != "mp3":  # the same stream, chunked or in events (an MP3 stream has no Xing frame either way)
        assert audio == chunked.content


# --- the seed's requests: clone, intensity, seeds ------------------------------------------


def test_clone_intensity_changes_audio_for_the_same_seed(http: httpx.Client, voice_b64: str) -> None:
    def clone(intensity: float) -> httpx.Response:
        r = speech(
            http,
            {
                "model": "step-audio-editx",
                "input": "The quick brown fox jumps over the lazy dog.",
                "response_format": "wav",
                "step_audio": {
                    "mode": "clone",
                    "model_variant": "base",
                    "intensity": intensity,
                    "seed": 1234,
                    "prompt_text": VOICE_TEXT,
                    "prompt_audio_base64": voice_b64,
                },
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-step-audio-seed"] == "1234"
        assert r.headers["x-step-audio-variant"] == "base"
        return r

    low, high, low_again = clone(0.1), clone(3.0), clone(0.1)
    assert low.headers["x-step-audio-intensity"] == "0.1" and high.headers["x-step-audio-intensity"] == "3"
    a, b = assert_audio(low.content, "wav", low.headers), assert_audio(high.content, "wav", high.headers)
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert low_again.content == low.content  # same seed, same intensity: the same audio


# --- editing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "edit_info", "text"), EDITS)
def test_every_edit_mode_with_transcript(
    http: httpx.Client, voice_b64: str, mode: str, edit_info: str | None, text: str
) -> None:
    step = {"mode": mode, "input_audio_base64": voice_b64, "audio_text": VOICE_TEXT, "seed": 3}
    if edit_info:
        step["edit_info"] = edit_info
    r = speech(http, {"input": text, "step_audio": step})
    assert r.status_code == 200, r.text
    assert r.headers["x-step-audio-mode"] == mode and r.headers["x-step-audio-iterations"] == "1"
    assert_audio(r.content, "wav", r.headers)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "edit_info", "text"), EDITS)
def test_every_edit_mode_auto_transcribed(
    http: httpx.Client, voice_b64: str, mode: str, edit_info: str | None, text: str
) -> None:
    step = {"mode": mode, "input_audio_base64": voice_b64, "seed": 3}
    if edit_info:
        step["edit_info"] = edit_info
    r = speech(http, {"input": text, "step_audio": step})
    assert r.status_code == 200, r.text
    assert_audio(r.content, "wav", r.headers)
    if mode not in ("denoise", "vad"):  # those instructions name no text, so nothing is transcribed
        heard = httpx.URL("?t=" + r.headers["x-step-audio-transcript"]).params["t"]
        assert word_error_rate(VOICE_TEXT, heard) <= 0.2, heard  # Whisper heard the real (Piper) speech


def test_three_edit_iterations(http: httpx.Client, voice_b64: str) -> None:
    step = {
        "mode": "emotion",
        "edit_info": "sad",
        "input_audio_base64": voice_b64,
        "audio_text": VOICE_TEXT,
        "n_edit_iter": 3,
        "seed": 8,
    }
    final = speech(http, {"step_audio": step})
    assert final.status_code == 200 and final.headers["x-step-audio-iterations"] == "3"
    every = speech(http, {"response_format": "flac", "step_audio": {**step, "return_iterations": True}})
    assert every.status_code == 200, every.text
    body = every.json()
    assert [it["index"] for it in body["iterations"]] == [1, 2, 3] and body["seed"] == 8
    decoded = [decode(base64.b64decode(it["audio_base64"]), "flac")[0] for it in body["iterations"]]
    assert all(len(d) > 0 for d in decoded)
    final_wav, _ = decode(final.content, "wav")
    np.testing.assert_allclose(decoded[-1], final_wav, atol=1e-4)  # the final audio is iteration 3


def test_upload_endpoint(http: httpx.Client) -> None:
    payload = {"input": "", "step_audio": {"mode": "emotion", "edit_info": "happy", "audio_text": VOICE_TEXT}}
    r = http.post(
        "/v1/audio/speech/upload",
        data={"payload": json.dumps(payload)},
        files={"input_audio_file": ("voice.wav", VOICE_WAV.read_bytes(), "audio/wav")},
    )
    assert r.status_code == 200, r.text
    assert_audio(r.content, "wav", r.headers)
    clone = {"input": "Uploaded voice.", "response_format": "mp3", "step_audio": {"prompt_text": VOICE_TEXT}}
    r = http.post(
        "/v1/audio/speech/upload",
        data={"payload": json.dumps(clone)},
        files={"prompt_audio_file": ("voice.wav", VOICE_WAV.read_bytes(), "audio/wav")},
    )
    assert r.status_code == 200, r.text
    assert_audio(r.content, "mp3", r.headers)


def test_voice_registered_without_transcript_is_transcribed(http: httpx.Client) -> None:
    r = http.post("/v1/voices", data={"name": "piper"}, files={"file": ("v.wav", VOICE_WAV.read_bytes())})
    assert r.status_code == 201, r.text
    assert word_error_rate(VOICE_TEXT, r.json()["transcript"]) <= 0.2
    assert speech(http, {"input": "Mine now.", "voice": "piper", "step_audio": {"seed": 1}}).status_code == 200
    assert http.delete("/v1/voices/piper").status_code == 200


# --- system routes ----------------------------------------------------------------------------


def test_system_routes(http: httpx.Client) -> None:
    assert speech(http, {"input": "Fill the cache.", "voice": "alloy", "step_audio": {"seed": 1}}).status_code == 200
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["status"] == "ready"
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["step-audio-editx"]
    tags = http.get("/v1/tags").json()
    assert "happy" in tags["emotion"] and "whisper" in tags["style"] and "faster" in tags["speed"]
    stats = http.get("/v1/cache/stats").json()
    assert stats["entries"] >= 1
    schema = http.get("/openapi.json").json()
    assert "step_audio" in schema["components"]["schemas"]["SpeechRequest"]["properties"]
    cleared = http.delete("/v1/cache").json()
    assert cleared["cleared"] is True and cleared["stats"]["entries"] == 0


def test_metrics_per_mode(http: httpx.Client) -> None:
    for _ in range(2):  # the second request finds the voice's tokens in the cache
        assert speech(http, {"input": "Metrics.", "voice": "sage", "step_audio": {"seed": 1}}).status_code == 200
    text = http.get("/metrics").text
    for name in (
        'step_audio_requests_total{mode="clone",status="200"}',
        'step_audio_request_latency_seconds_count{mode="clone"}',
        'step_audio_time_to_first_byte_seconds_count{mode="clone"}',
        'step_audio_real_time_factor_count{mode="clone"}',
        'step_audio_queue_wait_seconds_count{mode="clone"}',
        "step_audio_cache_hit_ratio",
    ):
        assert name in text, name
    assert re.search(r'step_audio_request_cache_lookups_total\{mode="clone",result="hit"\} [1-9]', text)


def test_readme_curl_returns_wav(server: LiveServer, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## API") :]
    block = re.search(r"```bash\n(curl .*?)\n```", section, re.S)
    assert block, "the README's API section has a curl example"
    command = block.group(1).replace("\\\n", " ").replace("http://localhost:8003", server.url)
    args = [a.replace("speech.wav", str(tmp_path / "speech.wav")) for a in shlex.split(command)]
    subprocess.run(args, check=True, timeout=120, capture_output=True)
    y, sr = sf.read(tmp_path / "speech.wav")
    assert sr == 24000 and len(y) > 0


@pytest.mark.slow
def test_healthz_answers_fast_during_a_long_generation(http: httpx.Client, server: LiveServer, voice_b64: str) -> None:
    body = {
        "step_audio": {
            "mode": "style",
            "edit_info": "whisper",
            "input_audio_base64": voice_b64,
            "audio_text": VOICE_TEXT,
            "n_edit_iter": 4,
        }
    }
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(
        target=lambda: result.update(r=speech(httpx.Client(base_url=server.url, timeout=300), body))
    )
    service = server.app.state.step_audio.service
    worker.start()
    deadline = time.monotonic() + 30
    while service.running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert service.running == 1
    http.get("/healthz")  # warm the connection
    timings = []
    while service.running and len(timings) < 20:
        t0 = time.perf_counter()
        assert http.get("/healthz").json() == {"status": "ok"}
        timings.append(time.perf_counter() - t0)
    worker.join(300)
    assert len(timings) >= 3, "the generation ended before /healthz was measured"
    assert max(timings) < 0.05, timings
    assert result["r"].status_code == 200


# --- bad inputs -------------------------------------------------------------------------------


def _clone_from(audio_b64: str) -> dict:
    return {"input": "x", "step_audio": {"prompt_audio_base64": audio_b64, "prompt_text": "a"}}


NOT_AUDIO = base64.b64encode(b"this is plain text, not an audio file" * 10).decode()


def _wav_b64(samples: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> str:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return base64.b64encode(buf.getvalue()).decode()


def _empty_wav() -> str:
    return _wav_b64(np.zeros(0, dtype=np.float32))


NOISE = np.random.default_rng(0).standard_normal(8000 * 31).astype(np.float32) * 0.1


BAD_JSON_BODIES = [
    ("malformed json", b'{"input": "x", ', 400, "invalid_json"),
    ("unknown mode", {"input": "x", "step_audio": {"mode": "sing"}}, 400, None),
    ("unknown format", {"input": "x", "voice": "alloy", "response_format": "ogg"}, 400, None),
    ("unknown step_audio field", {"input": "x", "voice": "alloy", "step_audio": {"pitch": 2}}, 400, None),
    ("intensity out of range", {"input": "x", "voice": "alloy", "step_audio": {"intensity": 9}}, 400, None),
    ("invalid base64", _clone_from("%%%"), 400, None),
    ("not audio", _clone_from(NOT_AUDIO), 400, None),
    ("empty audio", _clone_from(""), 400, None),
    ("audio without samples", _clone_from(_empty_wav()), 400, None),
    ("audio too short", _clone_from(_wav_b64(NOISE[:10])), 400, None),
    ("silent audio", _clone_from(_wav_b64(np.zeros(16000, np.float32))), 400, None),
    ("non-finite audio", _clone_from(_wav_b64(np.full(1600, np.nan, np.float32), subtype="FLOAT")), 400, None),
    ("audio too long", _clone_from(_wav_b64(NOISE, 8000, "PCM_U8")), 413, "too_large"),
    ("too long text", {"input": "x" * (MAX_CHARS + 1), "voice": "alloy"}, 413, "too_large"),
    ("unknown voice", {"input": "x", "voice": "nobody"}, 400, None),
    ("unloaded variant", {"input": "x", "voice": "alloy", "step_audio": {"model_variant": "awq"}}, 400, None),
    ("unknown model", {"model": "whisper-1", "input": "x", "voice": "alloy"}, 400, None),
    ("edit_info for another mode", {"step_audio": {"mode": "emotion", "edit_info": "whisper"}}, 400, None),
    ("edit_info where none applies", {"step_audio": {"mode": "denoise", "edit_info": "happy"}}, 400, None),
    ("edit without audio", {"step_audio": {"mode": "emotion", "edit_info": "happy", "audio_text": "a"}}, 400, None),
    ("too many iterations", {"step_audio": {"mode": "vad", "n_edit_iter": 9}}, 400, None),
    ("clone without text", {"input": "  ", "voice": "alloy"}, 400, None),
    ("url to loopback", {"input": "x", "step_audio": {"prompt_audio_url": "http://127.0.0.1:9/a.wav"}}, 400, None),
    ("oversize base64", _clone_from("A" * (MAX_UPLOAD * 2)), 413, None),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_JSON_BODIES, ids=[c[0] for c in BAD_JSON_BODIES])
def test_bad_inputs_get_their_4xx_in_the_envelope(
    http: httpx.Client, case: str, body: object, status: int, code: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post("/v1/audio/speech", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, (case, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    if case in ("audio too short", "silent audio", "non-finite audio", "audio too long"):
        assert error["param"].startswith("step_audio.prompt_audio")
    if case == "unknown voice":
        assert "alloy" in error["message"] and error["param"] == "voice"
    if case == "edit_info for another mode":
        assert "happy" in error["message"]  # lists the valid options


def test_oversize_and_bad_uploads(http: httpx.Client, server: LiveServer) -> None:
    payload = json.dumps({"step_audio": {"mode": "denoise"}})
    big = b"\0" * (MAX_UPLOAD + 1)
    r = http.post("/v1/audio/speech/upload", data={"payload": payload}, files={"input_audio_file": ("a.wav", big)})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input_audio_file"
    huge = b"\0" * (4 * MAX_UPLOAD + (1 << 20))  # over the whole-body limit: refused on Content-Length
    r = http.post("/v1/audio/speech/upload", data={"payload": payload}, files={"input_audio_file": ("a.wav", huge)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    chunks = (b" " * 65536 for _ in range((4 * MAX_UPLOAD) // 65536 + 20))  # no Content-Length: counted
    r = http.post("/v1/audio/speech", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = http.post("/v1/audio/speech/upload", data={"payload": "{nope"}, files={"input_audio_file": ("a", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "payload"
    r = http.post("/v1/audio/speech/upload", data={"payload": payload}, files={"input_audio_file": ("a", b"abc")})
    assert r.status_code == 400 and "input_audio_file" in r.json()["error"]["message"]
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # and the server still serves
    ok = speech(http, {"input": "Still here.", "voice": "alloy", "step_audio": {"seed": 2}})
    assert ok.status_code == 200
