"""OpenAI's Custom Voices API through the official SDK, unchanged, against the real server.

One server on local disk shows the SDK's methods (consents: create, retrieve, update, list,
delete; voices: create, delete) and a speech request naming the created voice, the transcript
rules, and vLLM-Omni's fields. Two servers with their own cache directories on one real
S3-compatible store (moto) show what a scaled-out deployment relies on, without Ray: a voice
created through one is spoken by the other right after the 201, a prompt tokenized by one is a
hit on the other, and a store that stops answers 503 for registration while speech that needs
nothing from it goes on. (The same through Ray Serve's proxy: tests/test_ray_serve.py.)
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.api_live import LiveServer, test_settings
from tests.s3_server import MotoS3

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()


def clip(seconds: float = 1.0, seed: int = 0) -> bytes:
    """A short WAV clip (noise with a tone; the tiny model clones anything)."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def create_voice(client: openai.OpenAI, name: str, *, seed: int = 0, transcript: str | None = VOICE_TEXT) -> str:
    consent = client.audio.voice_consents.create(
        name=f"{name} consent", language="en-US", recording=("consent.wav", clip(0.5, 99), "audio/wav")
    )
    extra = {"transcript": transcript} if transcript else None
    voice = client.audio.voices.create(
        name=name, consent=consent.id, audio_sample=("sample.wav", clip(1.0, seed), "audio/wav"), extra_body=extra
    )
    return voice.id


def speak(client: openai.OpenAI, voice: str | dict[str, str]) -> openai._legacy_response.HttpxBinaryResponseContent:
    return client.audio.speech.create(
        model="step-audio-editx",
        voice=voice,  # type: ignore[arg-type]
        input="Hello there.",
        response_format="wav",
    )


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = test_settings(tiny_bundle, tmp_path_factory.mktemp("audio-voices"), enable_auto_transcribe=False)
    with LiveServer(settings) as live:
        yield live


def test_the_sdk_creates_lists_uses_and_deletes_custom_voices(server: LiveServer) -> None:
    client = sdk(server.url)
    consent = client.audio.voice_consents.create(
        name="Ada's consent", language="en-US", recording=("consent.wav", clip(0.5), "audio/wav")
    )
    assert consent.object == "audio.voice_consent" and consent.id.startswith("cons_")
    assert client.audio.voice_consents.retrieve(consent.id).name == "Ada's consent"
    assert client.audio.voice_consents.update(consent.id, name="Ada").name == "Ada"
    assert consent.id in [c.id for c in client.audio.voice_consents.list()]

    voice = client.audio.voices.create(
        name="Ada",
        consent=consent.id,
        audio_sample=("ada.wav", clip(1.0), "audio/wav"),
        extra_body={"transcript": VOICE_TEXT},
    )
    assert voice.object == "audio.voice" and voice.type == "audio_sample" and voice.name == "Ada"
    assert voice.id.startswith("voice_") and voice.created_at > 0
    for named in ({"id": voice.id}, voice.id):  # the SDK's custom voice object, and the id as a string
        audio, sr = sf.read(io.BytesIO(speak(client, named).content))
        assert sr == 24000 and len(audio) > 0

    with httpx.Client(base_url=server.url, timeout=30) as http:
        listing = http.get("/v1/audio/voices").json()
        assert [v["id"] for v in listing["data"]] == [voice.id] and listing["data"][0]["consent"] == consent.id
        assert voice.id in listing["voices"] and "alloy" in listing["voices"]  # vLLM-Omni's keys too
        assert listing["uploaded_voices"][0]["id"] == voice.id
        assert http.get(f"/v1/audio/voices/{voice.id}").json()["name"] == "Ada"
        assert voice.id in [v["id"] for v in http.get("/v1/voices").json()["data"]]  # our own API sees it

    deleted = client.audio.voices.delete(voice.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (voice.id, True, "audio.voice.deleted")
    with pytest.raises(openai.NotFoundError):
        client.audio.voices.delete(voice.id)  # as OpenAI: deleting a deleted voice is a 404
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        speak(client, {"id": voice.id})
    assert client.audio.voice_consents.retrieve(consent.id).id == consent.id  # the consent stays
    gone = client.audio.voice_consents.delete(consent.id)
    assert gone.deleted and gone.id == consent.id
    with pytest.raises(openai.NotFoundError):
        client.audio.voice_consents.retrieve(consent.id)


def test_a_voice_needs_its_transcript_a_consent_and_a_sample(server: LiveServer) -> None:
    client = sdk(server.url)
    consent = client.audio.voice_consents.create(name="c", language="en", recording=("c.wav", clip(0.5), "audio/wav"))
    sample = ("s.wav", clip(1.0), "audio/wav")
    with pytest.raises(openai.BadRequestError) as no_text:  # auto-transcription is off on this server
        client.audio.voices.create(name="x", consent=consent.id, audio_sample=sample)
    error = no_text.value.body
    assert isinstance(error, dict) and error["param"] == "transcript"
    assert "extra_body" in error["message"] and "--enable-auto-transcribe" in error["message"]
    with pytest.raises(openai.BadRequestError, match="no consent recording") as no_consent:
        client.audio.voices.create(
            name="x", consent="cons_" + "0" * 24, audio_sample=sample, extra_body={"transcript": "hi"}
        )
    assert isinstance(no_consent.value.body, dict) and no_consent.value.body["param"] == "consent"
    with pytest.raises(openai.BadRequestError, match="text prompt"):
        client.audio.voices.create(name="x", prompt="a warm voice", type="prompt")
    with pytest.raises(openai.BadRequestError, match="audio_sample"):
        client.audio.voices.create(
            name="x",
            consent=consent.id,
            audio_sample=("s.txt", b"not audio", "text/plain"),
            extra_body={"transcript": "hi"},
        )
    with pytest.raises(openai.BadRequestError, match="BCP 47"):
        client.audio.voice_consents.create(name="c", language="english!", recording=("c.wav", clip(0.5), "audio/wav"))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert [v for v in http.get("/v1/audio/voices").json()["data"] if v["name"] == "x"] == []  # nothing half made


def test_vllm_omni_fields_are_accepted(server: LiveServer) -> None:
    client = sdk(server.url)
    recording = ("c.wav", clip(0.5), "audio/wav")
    consent = client.audio.voice_consents.create(name="c", language="zh-CN", recording=recording)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        created = http.post(
            "/v1/audio/voices",
            data={"name": "omni_voice", "consent": consent.id, "ref_text": VOICE_TEXT, "speaker_description": "calm"},
            files={"audio_sample": ("s.wav", clip(1.0, 3), "audio/wav")},
        )
        assert created.status_code == 201, created.text
        assert http.delete("/v1/audio/voices/omni_voice").json()["id"] == created.json()["id"]  # by name
        assert http.get(f"/v1/audio/voices/{created.json()['id']}").status_code == 404


# --- two servers, one store -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3() as s3:
        yield s3


@pytest.fixture(scope="module")
def pair(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory, store: MotoS3
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers, each with its own cache directory, sharing one object store."""
    patch = pytest.MonkeyPatch()
    for name, value in store.env.items():
        patch.setenv(name, value)
    servers = [
        LiveServer(
            test_settings(
                tiny_bundle,
                tmp_path_factory.mktemp(f"replica-{i}"),
                enable_auto_transcribe=False,
                store_url=store.url("shared"),
                ui=False,
            )
        )
        for i in range(2)
    ]
    try:
        with servers[0] as a, servers[1] as b:
            yield a, b
    finally:
        patch.undo()


def test_a_voice_created_on_one_server_speaks_on_the_other(pair: tuple[LiveServer, LiveServer]) -> None:
    a, b = pair
    voice_id = create_voice(sdk(a.url), "shared voice", seed=5)
    with httpx.Client(timeout=120) as http:
        first = http.post(
            f"{b.url}/v1/audio/speech",
            json={"model": "step-audio-editx", "voice": {"id": voice_id}, "input": "Right after the 201."},
        )
        assert first.status_code == 200, first.text
        # registering tokenized the sample on a; b's own cache has never seen it: a shared-level hit
        assert first.headers["x-step-audio-cache"] == "hit"
        stats = http.get(f"{b.url}/v1/cache/stats").json()
        assert stats["shared"]["hits"] == 1 and stats["shared"]["store"].startswith("s3://step-audio/shared/")
        assert sdk(b.url).audio.voices.delete(voice_id).deleted
        gone = http.post(f"{a.url}/v1/audio/speech", json={"model": "tts-1", "voice": voice_id, "input": "Gone?"})
        assert gone.status_code == 400 and "unknown voice" in gone.json()["error"]["message"]


def test_a_store_that_stops_refuses_registration_and_loses_nothing(
    pair: tuple[LiveServer, LiveServer], store: MotoS3
) -> None:
    a, b = pair
    kept = create_voice(sdk(a.url), "kept", seed=7)
    store.stop()
    try:
        with pytest.raises(openai.APIStatusError) as refused:  # X-Should-Retry: false: the SDK does not retry
            create_voice(sdk(b.url), "refused", seed=8)
        assert refused.value.status_code == 503
        assert "voice store is unreachable" in refused.value.message
        with httpx.Client(timeout=120) as http:
            default = http.post(f"{b.url}/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."})
            assert default.status_code == 200, default.text
            clip_with_text = http.post(
                f"{a.url}/v1/audio/speech/upload",
                data={"payload": '{"model": "tts-1", "input": "Hi.", "step_audio": {"prompt_text": "hello"}}'},
                files={"prompt_audio_file": ("p.wav", clip(0.8, 11), "audio/wav")},
            )
            assert clip_with_text.status_code == 200, clip_with_text.text
            listed = http.get(f"{a.url}/v1/audio/voices")
            assert listed.status_code == 503 and listed.json()["error"]["code"] == "storage_unavailable"
    finally:
        store.start()
    again = create_voice(sdk(b.url), "after", seed=9)
    with httpx.Client(timeout=30) as http:
        ids = [v["id"] for v in http.get(f"{a.url}/v1/audio/voices").json()["data"]]
    assert kept in ids and again in ids
