"""Audio constants and the one decode / prepare / resample path shared by every stage.

The resampler reproduces the windowed-sinc interpolation (Hann window, 6 zero crossings,
roll-off 0.99) that the reference gets from ``torchaudio``; torchaudio itself does not import
beside our torch, and a different resampler (soxr, linear) moves the reference's tokens.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from errors import InvalidInputError

TOKENIZER_SR = 16000  # wav2token and the CAM++ speaker fbank work at 16 kHz
VOCODER_SR = 24000  # the prompt mel and the generated speech are 24 kHz
PCM16_SCALE = 32768.0  # 16-bit PCM <-> float: decoders divide by this, ``to_pcm16`` multiplies
PROMPT_PEAK = 0.6  # the reference limits prompt peaks to this before any feature

RESAMPLE_LOWPASS_WIDTH = 6
RESAMPLE_ROLLOFF = 0.99


class AudioError(InvalidInputError):
    """Audio that cannot be used: undecodable, empty, silent, non-finite or too short."""


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any container soundfile or FFmpeg (PyAV) reads.

    Returns float32 samples shaped ``(channels, n)`` in [-1, 1] (PCM16 / 32768, as the
    reference's loader gives) and the sample rate.
    """
    if not data:
        raise AudioError("the audio is empty (0 bytes)")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        wav = np.ascontiguousarray(samples.T)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        wav, sr = _decode_with_av(data)
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


def _decode_with_av(data: bytes) -> tuple[np.ndarray, int]:
    import av  # imported lazily: only needed for compressed formats soundfile cannot read

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError("the file holds no audio stream")
            resampler = av.AudioResampler(format="fltp")
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            sr = stream.rate
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise AudioError(f"the bytes are not a readable audio file ({exc.__class__.__name__})") from exc
    if not chunks:
        raise AudioError("the audio holds no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(sr)


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


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``(new, 1, 2*width + orig)`` for reduced rates ``orig -> new``.

    The arithmetic runs in ``dtype`` and the order of operations follows the reference, because
    the reference itself builds the kernel two ways: in float64 (then cast) for the tokenizer's
    resampler object, and in the waveform's float32 for the frontend's functional call. The
    difference (about 6e-6 on the samples) is amplified past the fixture tolerances by log
    features, so each caller picks the precision its reference counterpart used.
    """
    base = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_LOWPASS_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + idx
    t = (t * base).clamp(-RESAMPLE_LOWPASS_WIDTH, RESAMPLE_LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / RESAMPLE_LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = kernel * (window * (base / orig))
    return kernel.to(torch.float32), width


def resample(
    wav: torch.Tensor, orig_sr: int, new_sr: int, *, kernel_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Band-limited resampling of ``(..., n)`` float32 audio; any rate pair, up or down.

    Output length is ``ceil(n * new_sr / orig_sr)``. ``kernel_dtype`` float64 matches the
    reference tokenizer's resampler, float32 its frontend's (see ``_sinc_kernel``).
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"invalid sample rates {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, kernel_dtype)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1]).to(torch.float32)
    n = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel.to(x.device), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    y = y[..., : math.ceil(new * n / orig)]
    return y.reshape(*shape[:-1], y.shape[-1])
