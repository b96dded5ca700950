"""The one encode path: float32 24 kHz mono samples to wav, mp3, opus, aac, flac or pcm bytes.

``StreamingAudioWriter`` (after Kokoro-FastAPI's) takes audio chunk by chunk and returns the
bytes that are ready, so a response can be sent while later audio is still being made:

- ``pcm`` is raw s16le; ``wav`` is a RIFF header plus s16le, written here (its sizes are exact
  when the total length is known, else 0xFFFFFFFF as streaming WAV writers do);
- ``mp3`` / ``opus`` (Ogg) / ``aac`` (ADTS) / ``flac`` go through PyAV (FFmpeg). A whole-file
  writer muxes into a seekable buffer so the muxer can finish its headers (FLAC STREAMINFO
  totals, the MP3 Xing/LAME frame); a streaming writer muxes into a forward-only sink, so
  every byte it has handed out is final.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Literal, cast

import av
import numpy as np
from av.audio.stream import AudioStream

from audio import VOCODER_SR, to_pcm16

AudioFormat = Literal["wav", "mp3", "opus", "aac", "flac", "pcm"]

CONTENT_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "pcm": "audio/pcm",
}
# format -> (FFmpeg muxer, encoder, bit rate or None for the codec default / lossless)
_AV_CODECS: dict[str, tuple[str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
}
PCM_BYTES = 2  # s16le
WAV_HEADER_BYTES = 44
_STREAMING_SIZE = 0xFFFFFFFF


def to_s16le(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] to little-endian int16 bytes (``audio.to_pcm16``: as soundfile writes them)."""
    return to_pcm16(np.asarray(samples, dtype=np.float32).reshape(-1)).astype("<i2").tobytes()


def wav_header(sample_rate: int, n_samples: int | None) -> bytes:
    """Canonical 44-byte PCM16 mono RIFF header; ``None`` samples = unknown length (streaming)."""
    if n_samples is None:
        riff_size = data_size = _STREAMING_SIZE
    else:
        data_size = n_samples * PCM_BYTES
        riff_size = data_size + WAV_HEADER_BYTES - 8
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * PCM_BYTES, PCM_BYTES, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


class _ForwardSink:
    """A write-only file for PyAV with no seek: muxers then write stream-friendly output."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class StreamingAudioWriter:
    """Encode one response's audio; ``write`` returns bytes ready now, ``finish`` the rest.

    ``streaming=False`` (a whole-file response) returns everything from ``finish`` with the
    container's headers completed. ``total_samples`` makes a WAV header exact when known.
    """

    def __init__(
        self,
        fmt: AudioFormat,
        sample_rate: int = VOCODER_SR,
        *,
        streaming: bool = True,
        total_samples: int | None = None,
    ) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"unknown audio format {fmt!r}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.streaming = streaming
        self._total = total_samples
        self._pending: list[bytes] = []  # pcm/wav bytes held back by a whole-file writer
        self._written = 0
        self._header_sent = False
        self._container: av.container.OutputContainer | None = None
        if fmt in _AV_CODECS:
            muxer, codec, bit_rate = _AV_CODECS[fmt]
            self._sink: _ForwardSink | io.BytesIO = _ForwardSink() if streaming else io.BytesIO()
            self._container = av.open(self._sink, mode="w", format=muxer)
            self._stream = cast(AudioStream, self._container.add_stream(codec, rate=sample_rate, layout="mono"))
            if bit_rate is not None:
                self._stream.bit_rate = bit_rate
            self._pts = 0

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]

    def write(self, samples: np.ndarray) -> bytes:
        """Add ``samples`` (float32, any shape holding one channel); return finished bytes."""
        pcm = to_s16le(samples)
        n = len(pcm) // PCM_BYTES
        self._written += n
        if self._container is None:
            if not self.streaming:
                self._pending.append(pcm)
                return b""
            if self.fmt == "wav" and not self._header_sent:
                self._header_sent = True
                return wav_header(self.sample_rate, self._total) + pcm
            return pcm
        if n:
            frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype="<i2")[None], format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            self._pts += n
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._take() if self.streaming else b""

    def finish(self) -> bytes:
        """Flush the encoder and close the container; return the last bytes."""
        if self._container is None:
            if self.fmt == "wav" and not self._header_sent:
                # a whole-file WAV (or a stream that never wrote) gets the exact sizes
                self._pending.insert(0, wav_header(self.sample_rate, self._written))
                self._header_sent = True
            out, self._pending = b"".join(self._pending), []
            return out
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        if self.streaming:
            return self._take()
        assert isinstance(self._sink, io.BytesIO)
        return self._sink.getvalue()

    def _take(self) -> bytes:
        assert isinstance(self._sink, _ForwardSink)
        return self._sink.take()


def encode_audio(samples: np.ndarray, fmt: AudioFormat, sample_rate: int = VOCODER_SR) -> bytes:
    """Whole-file encoding of ``samples`` (float32 mono) in ``fmt``."""
    writer = StreamingAudioWriter(fmt, sample_rate, streaming=False, total_samples=int(np.size(samples)))
    return writer.write(samples) + writer.finish()


def sse_event(payload: dict[str, object]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def sse_delta(audio: bytes) -> bytes:
    """OpenAI's ``speech.audio.delta`` event carrying base64 audio bytes."""
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})


def sse_error(envelope: dict[str, object]) -> bytes:
    """An ``error`` event carrying OpenAI's error envelope: ``{"type": "error", "error": {...}}``; it ends
    a stream that failed after it started (no ``speech.audio.done`` follows)."""
    return sse_event({"type": "error", **envelope})


def sse_done(usage: dict[str, int] | None = None, **extra: object) -> bytes:
    """OpenAI's ``speech.audio.done`` event (``usage`` in OpenAI's token-count shape), plus our fields."""
    event: dict[str, object] = {"type": "speech.audio.done"}
    if usage is not None:
        event["usage"] = usage
    return sse_event({**event, **extra})
