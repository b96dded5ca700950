"""Audio constants and the one decode / prepare / resample path shared by every stage.

The resampler reproduces the windowed-sinc interpolation (Hann window, 6 zero crossings,
roll-off 0.99) that the reference gets from ``torchaudio``; torchaudio itself does not import
beside our torch, and a different resampler (soxr, linear) moves the reference's tokens.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from errors import InvalidInputError, TooLargeError

TOKENIZER_SR = 16000  # wav2token and the CAM++ speaker fbank work at 16 kHz
VOCODER_SR = 24000  # the prompt mel and the generated speech are 24 kHz
PCM16_SCALE = 32768.0  # 16-bit PCM <-> float: decoders divide by this, ``to_pcm16`` multiplies
PROMPT_PEAK = 0.6  # the reference limits prompt peaks to this before any feature

RESAMPLE_LOWPASS_WIDTH = 6
RESAMPLE_ROLLOFF = 0.99
_READ_BLOCK = 1 << 16  # frames per soundfile read
_UNKNOWN_FRAMES = 1 << 62  # libsndfile's length for a stream that does not state one is the largest int64


class AudioError(InvalidInputError):
    """Audio that cannot be used: undecodable, empty, silent, non-finite or too short."""


def decode_audio(data: bytes, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any container soundfile or FFmpeg (PyAV) reads, refusing audio past ``max_seconds``.

    Returns float32 samples shaped ``(channels, n)`` in [-1, 1] (PCM16 / 32768, as the
    reference's loader gives) and the sample rate. Compression makes bytes a poor bound (2 h of
    silence is a 200 KB FLAC), so the duration is checked first from the container's header where
    it states one, and decoding stops as soon as ``max_seconds`` is passed otherwise: memory and
    time stay bounded by the limit, not by what the file claims or holds.
    """
    if not data:
        raise AudioError("the audio is empty (0 bytes)")
    try:
        wav, sr = _decode_with_soundfile(data, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        wav, sr = _decode_with_av(data, max_seconds)
    if wav.size == 0:
        raise AudioError("the audio holds no samples")
    if not np.isfinite(wav).all():
        raise AudioError("the audio holds non-finite samples (NaN or infinity)")
    return wav, int(sr)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] to int16 as soundfile writes a 16-bit WAV: ``floor(x * 32768)``, clipped.

    The one float -> 16-bit conversion: the encoder of every PCM answer uses it, and so does the
    edit loop's round trip (the reference saves each output with soundfile and reloads it), so
    audio a client gets as WAV and feeds back equals what a chain or an iteration hands on.
    """
    x = np.floor(np.asarray(samples, dtype=np.float32) * np.float32(PCM16_SCALE))
    return np.clip(x, -PCM16_SCALE, PCM16_SCALE - 1).astype(np.int16)


def _too_long(max_seconds: float, seconds: float | None = None) -> TooLargeError:
    lasts = f"lasts {seconds:.1f} s" if seconds is not None else f"lasts more than {max_seconds:g} s"
    return TooLargeError(f"the audio {lasts}; the limit is {max_seconds:g} s")


def _frame_limit(max_seconds: float | None, sr: int) -> int | None:
    """Frames allowed at ``sr`` (None: no limit); one more than this means the audio is too long."""
    return None if max_seconds is None else math.floor(max_seconds * sr)


def _decode_with_soundfile(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        sr = int(f.samplerate)
        limit = _frame_limit(max_seconds, sr)
        if max_seconds is not None and limit is not None and limit < f.frames < _UNKNOWN_FRAMES:
            raise _too_long(max_seconds, f.frames / sr)
        blocks: list[np.ndarray] = []
        total = 0
        while True:  # block by block: a length the header does not state cannot be read at once
            want = _READ_BLOCK if limit is None else min(_READ_BLOCK, limit + 1 - total)
            block = f.read(want, dtype="float32", always_2d=True)
            blocks.append(block)
            total += block.shape[0]
            if max_seconds is not None and limit is not None and total > limit:
                raise _too_long(max_seconds)
            if block.shape[0] < want or want == 0:
                break
    return np.ascontiguousarray(np.concatenate(blocks).T), sr


def _decode_with_av(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av  # imported lazily: only needed for compressed formats soundfile cannot read

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next(iter(container.streams.audio), None)
            if stream is None:
                raise AudioError("the file holds no audio stream")
            if max_seconds is not None:
                stated = _stated_seconds(stream, container)
                if stated is not None and stated > max_seconds:
                    raise _too_long(max_seconds, stated)
            resampler = av.AudioResampler(format="fltp")
            chunks: list[np.ndarray] = []
            total = 0
            limit = _frame_limit(max_seconds, int(stream.rate)) if stream.rate else None
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    total += chunks[-1].shape[-1]
                if max_seconds is not None and limit is not None and total > limit:
                    raise _too_long(max_seconds)
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            sr = stream.rate
    except (AudioError, TooLargeError):
        raise
    except (av.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise AudioError(f"the bytes are not a readable audio file ({exc.__class__.__name__})") from exc
    if not chunks:
        raise AudioError("the audio holds no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(sr)


def _stated_seconds(stream: Any, container: Any) -> float | None:
    """The duration the container's header states (stream first, then container), None if unstated."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def to_mono(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(n,)`` or ``(channels, n)`` to a ``(1, n)`` float32 tensor by the channel mean."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise AudioError(f"expected audio shaped (channels, samples), got {tuple(x.shape)}")
    return x.mean(dim=0, keepdim=True) if x.shape[0] > 1 else x


def limit_peak(wav: torch.Tensor, peak: float = PROMPT_PEAK) -> torch.Tensor:
    """Scale down so max |x| <= peak (never up), as the reference prepares prompts."""
    top = wav.abs().max()
    return wav / top * peak if top > peak else wav


def prepare_prompt(wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
    """Decoded audio to the reference's prompt waveform: mono, peak-limited, ``(1, n)``."""
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    x = to_mono(wav)
    if x.numel() == 0:
        raise AudioError("the audio holds no samples")
    if not torch.isfinite(x).all():
        raise AudioError("the audio holds non-finite samples (NaN or infinity)")
    return limit_peak(x)


# A dense polyphase kernel has ``new * (2 * width + orig)`` taps for the reduced rates; rates that
# share no factor (4001 -> 16000) would make it gigabytes, so past this size the windowed sinc is
# evaluated only where the output needs it (``_resample_direct``). Every common rate pair
# (8k-48k, 11.025k/22.05k/44.1k) stays far below and keeps the reference's exact kernel.
DENSE_KERNEL_MAX_TAPS = 1 << 20
KERNEL_CACHE_MAX_BYTES = 32 << 20  # dense kernels kept for reuse, least recently used evicted first
_DIRECT_BLOCK_TAPS = 1 << 18  # weights evaluated at once by the direct path (bounds its scratch memory)


def _band(orig: int, new: int) -> tuple[float, int]:
    """The low-pass cutoff (in units of the lower rate) and the kernel's half-width in input samples."""
    base = min(orig, new) * RESAMPLE_ROLLOFF
    return base, math.ceil(RESAMPLE_LOWPASS_WIDTH * orig / base)


def _windowed_sinc(t: torch.Tensor, base: float, orig: int) -> torch.Tensor:
    """Hann-windowed sinc at ``t`` (input-minus-output time in input periods x cutoff), in the reference's order."""
    t = t.clamp(-RESAMPLE_LOWPASS_WIDTH, RESAMPLE_LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / RESAMPLE_LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return kernel * (window * (base / orig))


class _KernelCache:
    """Dense kernels by ``(orig, new, dtype)``, bounded by their bytes rather than their count."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int, torch.dtype], tuple[torch.Tensor, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, orig: int, new: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        key = (orig, new, dtype)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = _sinc_kernel(orig, new, dtype)
        size = item[0].numel() * item[0].element_size()
        with self._lock:
            if key not in self._items and size <= self.max_bytes:
                self._items[key] = item
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (old, _) = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return item

    @property
    def nbytes(self) -> int:
        return self._bytes


_KERNELS = _KernelCache(KERNEL_CACHE_MAX_BYTES)


def _sinc_kernel(orig: int, new: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``(new, 1, 2*width + orig)`` for reduced rates ``orig -> new``.

    The arithmetic runs in ``dtype`` and the order of operations follows the reference, because
    the reference itself builds the kernel two ways: in float64 (then cast) for the tokenizer's
    resampler object, and in the waveform's float32 for the frontend's functional call. The
    difference (about 6e-6 on the samples) is amplified past the fixture tolerances by log
    features, so each caller picks the precision its reference counterpart used.
    """
    base, width = _band(orig, new)
    idx = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + idx
    kernel = _windowed_sinc(t * base, base, orig)
    return kernel.to(torch.float32), width


def _resample_direct(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``(b, n)`` float32 resampled by evaluating the kernel at each output's own inputs only.

    Output ``j`` sits at input time ``j * orig / new``; the window reaches ``width`` input samples
    either side, so it takes ``2 * width + 1`` weights, computed from exact integer offsets (float64)
    block by block. Memory is bounded by the block and time by ``n_out * (2 * width + 1)``, whatever
    the rates; the values equal the dense kernel's up to float32 rounding.
    """
    base, width = _band(orig, new)
    n = x.shape[-1]
    n_out = math.ceil(new * n / orig)
    offsets = torch.arange(-width, width + 1, dtype=torch.int64)
    block = max(1, _DIRECT_BLOCK_TAPS // offsets.numel())
    y = torch.empty(x.shape[0], n_out, dtype=torch.float32, device=x.device)
    for start in range(0, n_out, block):
        j = torch.arange(start, min(n_out, start + block), dtype=torch.int64)[:, None]
        idx = (j * orig) // new + offsets
        t = (idx * new - j * orig).to(torch.float64) / (orig * new) * base
        weights = _windowed_sinc(t, base, orig) * ((idx >= 0) & (idx < n))
        taken = x[:, idx.clamp(0, n - 1).to(x.device)]
        y[:, start : start + j.shape[0]] = (taken * weights.to(torch.float32, copy=False).to(x.device)).sum(-1)
    return y


def resample(
    wav: torch.Tensor, orig_sr: int, new_sr: int, *, kernel_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Band-limited resampling of ``(..., n)`` float32 audio; any rate pair, up or down.

    Output length is ``ceil(n * new_sr / orig_sr)``. ``kernel_dtype`` float64 matches the
    reference tokenizer's resampler, float32 its frontend's (see ``_sinc_kernel``); rate pairs
    whose dense kernel would pass ``DENSE_KERNEL_MAX_TAPS`` take ``_resample_direct`` instead.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"invalid sample rates {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    shape = wav.shape
    x = wav.reshape(-1, shape[-1]).to(torch.float32)
    n = x.shape[-1]
    _, width = _band(orig, new)
    if new * (2 * width + orig) > DENSE_KERNEL_MAX_TAPS:
        y = _resample_direct(x, orig, new)
        return y.reshape(*shape[:-1], y.shape[-1])
    kernel, width = _KERNELS.get(orig, new, kernel_dtype)
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel.to(x.device), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    y = y[..., : math.ceil(new * n / orig)]
    return y.reshape(*shape[:-1], y.shape[-1])
