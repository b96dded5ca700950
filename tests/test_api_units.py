"""The HTTP layer's building blocks without a server: codecs, queue, voice store, URL guard, errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from api.audio_io import StreamingAudioWriter, encode_audio, wav_header
from api.errors import UnauthorizedError, status_of
from api.inputs import decode_base64_audio
from api.url_fetch import check_public_address, fetch_audio_url
from engine.service import InferenceService
from engine.types import AudioInput
from engine.voices import OPENAI_VOICES, Voice, VoiceStore
from errors import (
    BusyError,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    TooLargeError,
)

SR = 24000
FORMATS = ("wav", "mp3", "opus", "aac", "flac", "pcm")


def tone(seconds: float, sr: int = SR, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Real decoders: soundfile (libsndfile) where it reads the format, else FFmpeg via PyAV."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, SR
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.audio[0]
            frames = [f.to_ndarray().reshape(-1) for f in c.decode(stream)]
            return np.concatenate(frames), stream.rate
    y, sr = sf.read(io.BytesIO(data), dtype="float32")
    return y, sr


# --- audio_io -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_every_format_decodes_at_24k_with_its_duration(fmt: str) -> None:
    x = tone(1.3)
    y, sr = decode(encode_audio(x, fmt), fmt)
    assert sr == SR
    # lossy codecs pad up to one frame (AAC 1024 + priming, MP3 1152); lossless are exact
    tolerance = 0 if fmt in ("wav", "flac", "pcm") else 2048
    assert abs(len(y) - len(x)) <= tolerance
    if fmt in ("wav", "flac", "pcm"):
        assert np.max(np.abs(y - x)) < 1e-4


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "aac"])
def test_streaming_writer_emits_early_bytes_that_decode(fmt: str) -> None:
    x = tone(2.0)
    writer = StreamingAudioWriter(fmt, SR, streaming=True)
    parts = [writer.write(x[i : i + SR // 2]) for i in range(0, len(x), SR // 2)]
    parts.append(writer.finish())
    assert sum(len(p) for p in parts[:-1]) > 0, "a streaming writer must hand out bytes before finish"
    y, sr = decode(b"".join(parts), fmt)
    assert sr == SR
    assert abs(len(y) - len(x)) <= 2048


def test_wav_header_sizes() -> None:
    assert wav_header(SR, 10)[40:44] == (20).to_bytes(4, "little")
    assert wav_header(SR, None)[40:44] == b"\xff\xff\xff\xff"


# --- errors -------------------------------------------------------------------------------


def test_status_of_each_error_class() -> None:
    assert status_of(InvalidInputError("x")) == 400
    assert status_of(TooLargeError("x")) == 413
    assert status_of(NotFoundError("x")) == 404
    assert status_of(BusyError("x")) == 429
    assert status_of(NotReadyError("x")) == 503
    assert status_of(ModelLoadError("x")) == 503
    assert status_of(UnauthorizedError("x")) == 401


def test_base64_limits() -> None:
    assert decode_base64_audio("data:audio/wav;base64,AAEC", max_bytes=10, param="p") == b"\x00\x01\x02"
    with pytest.raises(InvalidInputError, match="not valid base64"):
        decode_base64_audio("@@@=", max_bytes=10, param="p")
    with pytest.raises(TooLargeError):
        decode_base64_audio("A" * 400, max_bytes=100, param="p")


# --- service ------------------------------------------------------------------------------


def test_service_runs_jobs_off_the_loop_under_inference_mode() -> None:
    async def main() -> None:
        service = InferenceService(queue_size=2)
        service.start()
        try:
            loop_thread = threading.get_ident()
            (thread, grad), timing = await service.submit(
                "clone", lambda: (threading.get_ident(), torch.is_inference_mode_enabled())
            )
            assert thread != loop_thread and grad is True
            assert timing.queue_wait_s >= 0 and timing.run_s >= 0
            with pytest.raises(InvalidInputError, match="boom"):
                await service.submit("clone", lambda: (_ for _ in ()).throw(InvalidInputError("boom")))
        finally:
            service.stop()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def gated_service(queue_size: int) -> AsyncIterator[tuple[InferenceService, threading.Event]]:
    """A started one-worker service and the gate its held jobs wait on (opened and stopped on exit)."""
    service = InferenceService(queue_size=queue_size)
    service.start()
    gate = threading.Event()
    try:
        yield service, gate
    finally:
        gate.set()
        service.stop()


async def hold_the_worker(service: InferenceService, gate: threading.Event) -> asyncio.Future[Any]:
    """A job that keeps the one worker busy until ``gate`` opens; returns once it runs."""
    running = asyncio.ensure_future(service.submit("clone", gate.wait))
    while service.running == 0:
        await asyncio.sleep(0.01)
    return running


def test_service_full_queue_is_busy_at_once_and_cancel_frees_the_place() -> None:
    async def main() -> None:
        async with gated_service(queue_size=1) as (service, gate):
            running = await hold_the_worker(service, gate)
            queued = asyncio.ensure_future(service.submit("clone", lambda: "second"))
            await asyncio.sleep(0.05)
            assert service.queued == 1
            t0 = time.perf_counter()
            with pytest.raises(BusyError) as busy:
                await service.submit("clone", lambda: "third")
            assert time.perf_counter() - t0 < 0.5 and busy.value.retry_after >= 1
            queued.cancel()  # the client went away: its place is free again
            await asyncio.sleep(0.05)
            assert service.queued == 0
            again = asyncio.ensure_future(service.submit("clone", lambda: "fourth"))
            gate.set()
            assert (await again)[0] == "fourth"
            assert (await running)[0] is True

    asyncio.run(main())


def test_retry_after_comes_from_measured_job_times() -> None:
    """Retry-After = the queue ahead x the measured job time / workers; no built-in guess."""
    job_s = 0.3

    async def main() -> None:
        async with gated_service(queue_size=4) as (service, gate):
            assert service.job_seconds() == 0.0  # nothing measured yet
            for _ in range(2):
                await service.submit("clone", lambda: time.sleep(job_s))
            assert job_s <= service.job_seconds() < job_s + 0.2
            holders = [await hold_the_worker(service, gate)]
            holders += [asyncio.ensure_future(service.submit("clone", gate.wait)) for _ in range(4)]
            await asyncio.sleep(0.05)
            with pytest.raises(BusyError) as busy:
                service.refuse_if_full()
            drain = 5 * job_s  # one running and four waiting, one worker
            assert drain <= busy.value.retry_after < drain + 1.0, busy.value.retry_after
            gate.set()
            await asyncio.gather(*holders)

    asyncio.run(main())


def test_retry_after_before_any_job_finished_uses_the_running_job() -> None:
    async def main() -> None:
        async with gated_service(queue_size=1) as (service, gate):
            running = await hold_the_worker(service, gate)
            await asyncio.sleep(0.3)
            assert 0.3 <= service.job_seconds() < 1.0  # a measured lower bound, not a guess
            gate.set()
            await running

    asyncio.run(main())


def test_service_workers_run_jobs_side_by_side() -> None:
    async def main() -> None:
        service = InferenceService(queue_size=4, workers=2)
        service.start()
        both = threading.Barrier(2, timeout=5)  # passes only when two jobs run at the same time
        try:
            results = await asyncio.gather(*(service.submit("clone", both.wait) for _ in range(2)))
            assert sorted(r for r, _ in results) == [0, 1]
        finally:
            service.stop()

    asyncio.run(main())


# --- voices -------------------------------------------------------------------------------


def _clip(seconds: float = 0.5, sr: int = 16000) -> AudioInput:
    return AudioInput(tone(seconds, sr)[None], sr)


def test_voice_store_round_trip_and_persistence(tmp_path: Path) -> None:
    prepared: list[AudioInput] = []
    store = VoiceStore(tmp_path / "voices")
    store.register("narrator_1", _clip(), " Hello there. ", prepare=prepared.append)
    assert len(prepared) == 1
    again = VoiceStore(tmp_path / "voices")  # a restarted server
    voice = again.get("narrator_1")
    assert voice.transcript == "Hello there." and voice.audio.sample_rate == 16000
    np.testing.assert_array_equal(voice.audio.samples, _clip().samples)
    assert again.names() == ["narrator_1"]
    again.delete("narrator_1")
    assert again.names() == []
    with pytest.raises(NotFoundError):
        again.delete("narrator_1")


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "a b", "..", "ünï"])
def test_voice_names_cannot_escape(tmp_path: Path, name: str) -> None:
    store = VoiceStore(tmp_path)
    with pytest.raises(InvalidInputError):
        store.register(name, _clip(), "text")
    assert list(tmp_path.iterdir()) == []


def test_voice_resolution_order(tmp_path: Path) -> None:
    default = Voice("default", _clip(), "default words", builtin=True)
    store = VoiceStore(tmp_path, default_voice=default)
    assert store.resolve("alloy") is default
    assert all(store.resolve(v) is default for v in OPENAI_VOICES)
    store.register("alloy", _clip(0.3), "operator words")
    assert store.resolve("alloy").transcript == "operator words"  # the operator's voice wins
    with pytest.raises(InvalidInputError, match="available voices: alloy") as exc:
        store.resolve("nobody")
    assert "shimmer" in str(exc.value)
    with pytest.raises(InvalidInputError):
        store.register("x", _clip(), "   ")


def test_failed_preparation_writes_nothing(tmp_path: Path) -> None:
    def refuse(_: AudioInput) -> None:
        raise InvalidInputError("no speech")

    store = VoiceStore(tmp_path)
    with pytest.raises(InvalidInputError):
        store.register("v", _clip(), "text", prepare=refuse)
    assert store.names() == [] and list(tmp_path.iterdir()) == []


def test_a_damaged_voice_file_is_absent_not_an_error(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    store.register("good", _clip(), "fine")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(NotFoundError, match="damaged"):
        store.get("broken")
    assert [v.name for v in store.voices()] == ["good"]
    store.delete("broken")  # an operator can still remove it
    assert store.names() == ["good"]


def test_readers_see_whole_voices_while_one_is_replaced(tmp_path: Path) -> None:
    """Each reader gets one registration whole (transcript and clip belong together), never an error."""
    store = VoiceStore(tmp_path)
    lengths = {"short": 0.3, "long": 0.5}
    store.register("v", _clip(lengths["short"]), "short")
    stop = time.monotonic() + 1.0
    problems: list[str] = []

    def write() -> None:
        i = 0
        while time.monotonic() < stop:
            text = ("short", "long")[i % 2]
            store.register("v", _clip(lengths[text]), text)
            store.register("gone", _clip(), "x")
            store.delete("gone")
            i += 1

    def read() -> None:
        while time.monotonic() < stop:
            try:
                voice = store.get("v")
                if voice.seconds != lengths[voice.transcript]:
                    problems.append(f"mixed: {voice.transcript} with {voice.seconds} s")
                if "v" not in [v.name for v in store.voices()]:
                    problems.append("listing lost v")
            except Exception as exc:
                problems.append(repr(exc))

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == [], problems[:5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "v.npz"]
    assert not list((tmp_path / ".tmp").glob("*.tmp"))  # no temporary file left


# --- URL guard ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
        "100.64.0.1", "224.0.0.1", "240.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(InvalidInputError, match="public host"):
        check_public_address(address)


def test_public_addresses_pass() -> None:
    assert str(check_public_address("93.184.216.34")) == "93.184.216.34"
    assert check_public_address("2606:4700::1111").version == 6


def _fetch(url: str, transport: httpx.MockTransport, dns: dict[str, list[str]], **kw: object) -> bytes:
    async def resolver(host: str, port: int) -> list[str]:
        return dns[host]

    kw.setdefault("max_bytes", 1000)
    return asyncio.run(fetch_audio_url(url, timeout_s=5, resolver=resolver, transport=transport, **kw))  # type: ignore[arg-type]


def test_url_fetch_pins_the_checked_address_and_rechecks_redirects() -> None:
    # httpx.MockTransport stands in for the network (a boundary we do not own)
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers["host"]))
        if request.url.path == "/start":
            return httpx.Response(302, headers={"location": "http://cdn.example/clip.wav"})
        if request.url.path == "/clip.wav":
            return httpx.Response(200, content=b"RIFFdata")
        return httpx.Response(302, headers={"location": "http://internal.example/secret"})

    dns = {"media.example": ["93.184.216.34"], "cdn.example": ["8.8.8.8"], "internal.example": ["10.0.0.5"]}
    assert _fetch("http://media.example/start", httpx.MockTransport(handler), dns) == b"RIFFdata"
    assert seen == [("93.184.216.34", "media.example"), ("8.8.8.8", "cdn.example")]
    with pytest.raises(InvalidInputError, match="public host"):
        _fetch("http://media.example/other", httpx.MockTransport(handler), dns)
    # one private answer among public ones is enough to refuse (DNS rebinding)
    with pytest.raises(InvalidInputError, match="public host"):
        _fetch("http://media.example/x", httpx.MockTransport(handler), {"media.example": ["8.8.8.8", "127.0.0.1"]})
    with pytest.raises(InvalidInputError, match="http or https"):
        _fetch("file:///etc/passwd", httpx.MockTransport(handler), dns)


def test_url_fetch_caps_size() -> None:
    big = httpx.MockTransport(lambda r: httpx.Response(200, content=b"x" * 5000))
    with pytest.raises(TooLargeError):
        _fetch("http://media.example/a", big, {"media.example": ["93.184.216.34"]})

    def chunked(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(b"y" * 5000), headers={})

    with pytest.raises(TooLargeError):
        _fetch("http://media.example/b", httpx.MockTransport(chunked), {"media.example": ["93.184.216.34"]})
