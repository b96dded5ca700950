"""Prompt features for the vocoder: the 24 kHz log-mel and the CAM++ speaker embedding.

Both are computed from the prepared prompt (mono, peak-limited, at its own rate) exactly as
the reference's ``CosyVoiceFrontEnd`` does:

* ``prompt_mel``: resample to 24 kHz, reflect-pad (n_fft − hop)/2, STFT (periodic Hann,
  ``center=False``), magnitude ``sqrt(re² + im² + 1e-9)``, librosa's Slaney mel filterbank,
  ``log(max(·, 1e-5))`` → (1, T, 80) at 50 Hz.
* ``SpeakerEncoder.embed``: resample to 16 kHz, Kaldi-compatible 80-bin log fbank (25/10 ms,
  Povey window, DC removal, pre-emphasis 0.97, snip edges, power spectrum, no dither, the
  waveform in [-1, 1] and NOT scaled by 32768), minus its mean over time, through
  ``campplus.onnx`` on CPU → (1, 192).

The Kaldi fbank is our own torch implementation of the algorithm torchaudio's
``compliance.kaldi.fbank`` uses (torchaudio does not load beside our torch).

The engine caches both with the prompt's tokens in one record (``engine/tts.py``);
:func:`frontend_fingerprint` names what decides them, for that record's fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import torch
import torch.nn.functional as F

from audio import TOKENIZER_SR, VOCODER_SR, AudioError, resample
from errors import ModelLoadError

logger = logging.getLogger(__name__)

MAG_EPS = 1e-9  # added to re² + im² before the square root
LOG_MEL_FLOOR = 1e-5  # log-mel floor

# Kaldi fbank as CAM++ was trained on (torchaudio.compliance.kaldi.fbank defaults)
FBANK_SR = TOKENIZER_SR  # 16 kHz
FBANK_BINS = 80
FBANK_FRAME = 400  # 25 ms at 16 kHz
FBANK_SHIFT = 160  # 10 ms at 16 kHz
FBANK_FFT = 512  # frame length rounded up to a power of two
FBANK_PREEMPH = 0.97
FBANK_POVEY_POWER = 0.85  # Povey window = Hann(periodic=False) ** 0.85
FBANK_LOW_HZ = 20.0
FBANK_LOG_EPS = float(torch.finfo(torch.float32).eps)  # energy floor before the log


@dataclass(frozen=True)
class MelConfig:
    """``mel_conf`` of ``cosyvoice.yaml``; defaults are the official values."""

    num_mels: int = 80
    n_fft: int = 1920
    hop_size: int = 480
    win_size: int = 1920
    sampling_rate: int = VOCODER_SR
    fmin: float = 0
    fmax: float | None = 8000

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any]) -> MelConfig:
        """Build from the yaml block; unknown keys are an error (a different frontend)."""
        unknown = set(conf) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelLoadError(f"mel_conf has unknown keys {sorted(unknown)}")
        return cls(**conf)


DEFAULT_MEL_CONF = MelConfig()


def _mel_tuple(conf: MelConfig) -> tuple[Any, ...]:
    return (conf.num_mels, conf.n_fft, conf.hop_size, conf.win_size, conf.sampling_rate, conf.fmin, conf.fmax)


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> torch.Tensor:
    """(n_mels, n_fft/2 + 1) Slaney filterbank, as librosa's defaults give the reference."""
    mel = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(mel).float()


def _as_prompt(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(wav, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[0] != 1:
        raise AudioError(f"expected a prepared mono prompt shaped (1, samples), got {tuple(x.shape)}")
    return x


def log_mel(wav: torch.Tensor, conf: MelConfig = DEFAULT_MEL_CONF) -> torch.Tensor:
    """wav : (B, n) at ``conf.sampling_rate`` -> log-mel (B, num_mels, T), T = n // hop."""
    pad = (conf.n_fft - conf.hop_size) // 2
    if wav.shape[-1] <= pad:
        raise AudioError(
            f"the prompt is too short for a mel frame ({wav.shape[-1]} samples at "
            f"{conf.sampling_rate} Hz, need more than {pad})"
        )
    y = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(conf.win_size, device=wav.device)
    spec = torch.stft(
        y,
        conf.n_fft,
        hop_length=conf.hop_size,
        win_length=conf.win_size,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + MAG_EPS)  # (B, n_fft/2+1, T)
    basis = _mel_basis(conf.sampling_rate, conf.n_fft, conf.num_mels, conf.fmin, conf.fmax)
    mel = torch.matmul(basis.to(wav.device), mag)
    return torch.log(torch.clamp(mel, min=LOG_MEL_FLOOR))


def prompt_mel(
    wav: np.ndarray | torch.Tensor, sample_rate: int, mel_conf: MelConfig = DEFAULT_MEL_CONF
) -> torch.Tensor:
    """Prepared prompt (1, n) at ``sample_rate`` -> the flow's prompt mel (1, T, num_mels) at 50 Hz."""
    x = resample(_as_prompt(wav), int(sample_rate), mel_conf.sampling_rate, kernel_dtype=torch.float32)
    return log_mel(x, mel_conf).transpose(1, 2).contiguous()


@lru_cache(maxsize=4)
def _kaldi_mel_banks(num_bins: int) -> torch.Tensor:
    """(num_bins, FBANK_FFT/2 + 1) triangular Kaldi mel filters (HTK mel scale, no VTLN).

    Computed in float32 like torchaudio's ``get_mel_banks``; the Nyquist column is zero.
    """

    def mel_scale(freq: float) -> float:
        return 1127.0 * math.log(1.0 + freq / 700.0)

    n_fft_bins = FBANK_FFT // 2
    mel_low, mel_high = mel_scale(FBANK_LOW_HZ), mel_scale(FBANK_SR / 2)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = 1127.0 * (1.0 + (FBANK_SR / FBANK_FFT) * torch.arange(n_fft_bins) / 700.0).log()
    mel = mel.unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1)).float()


def kaldi_fbank(wav16k: torch.Tensor, num_mel_bins: int = FBANK_BINS) -> torch.Tensor:
    """wav16k : (n,) float32 in [-1, 1] -> log fbank (frames, num_mel_bins), frames = 1 + (n-400)//160."""
    n = wav16k.shape[-1]
    if n < FBANK_FRAME:
        raise AudioError(
            f"the prompt is too short for a speaker embedding ({n} samples at 16 kHz, need at least {FBANK_FRAME})"
        )
    x = wav16k.reshape(-1).float().contiguous()
    frames = x.as_strided((1 + (n - FBANK_FRAME) // FBANK_SHIFT, FBANK_FRAME), (FBANK_SHIFT, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC
    prev = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - FBANK_PREEMPH * prev
    window = torch.hann_window(FBANK_FRAME, periodic=False, dtype=torch.float32).pow(FBANK_POVEY_POWER)
    frames = F.pad(frames * window.to(frames.device), (0, FBANK_FFT - FBANK_FRAME))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (frames, 257)
    energies = torch.mm(power, _kaldi_mel_banks(num_mel_bins).to(power.device).T)
    return torch.clamp(energies, min=FBANK_LOG_EPS).log()


def campplus_features(wav: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Prepared prompt (1, n) -> CAM++ input (1, frames, 80) on CPU: 16 kHz fbank minus its time mean."""
    x = resample(_as_prompt(wav).cpu(), int(sample_rate), FBANK_SR, kernel_dtype=torch.float32)
    feat = kaldi_fbank(x[0])
    return (feat - feat.mean(dim=0, keepdim=True)).unsqueeze(0)


class SpeakerEncoder:
    """CAM++ speaker embedding from ``campplus.onnx``, run with onnxruntime on CPU."""

    def __init__(self, campplus_onnx_path: Path | str, threads: int = 1) -> None:
        import onnxruntime as ort  # imported lazily: only needed once a vocoder is built

        path = Path(campplus_onnx_path)
        if not path.is_file():
            raise ModelLoadError(f"CAM++ speaker model not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelLoadError(f"cannot load CAM++ speaker model {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        # identity of the model file: cached embeddings from another campplus.onnx are stale
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()

    def embed(self, wav: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Prepared prompt (1, n) at ``sample_rate`` -> speaker embedding (1, D) float32 (D = 192)."""
        feat = campplus_features(wav, sample_rate)
        out = self.session.run(None, {self.input_name: feat.numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1).copy())


@dataclass(frozen=True)
class PromptFeatures:
    """What the flow needs from a prompt besides its tokens."""

    prompt_mel: torch.Tensor  # (1, T, 80) float32, 50 Hz
    spk_emb: torch.Tensor  # (1, 192) float32


def frontend_fingerprint(encoder: SpeakerEncoder, mel_conf: MelConfig = DEFAULT_MEL_CONF) -> str:
    """sha256 hex of what decides the prompt features: ``campplus.onnx`` and the mel config."""
    return hashlib.sha256(f"{encoder.fingerprint}\0{_mel_tuple(mel_conf)!r}".encode()).hexdigest()


def prompt_features(
    wav: np.ndarray | torch.Tensor,
    sample_rate: int,
    speaker_encoder: SpeakerEncoder,
    mel_conf: MelConfig = DEFAULT_MEL_CONF,
) -> PromptFeatures:
    """Prompt mel + speaker embedding of a prepared prompt ``(1, n)`` at ``sample_rate``."""
    return PromptFeatures(prompt_mel(wav, sample_rate, mel_conf), speaker_encoder.embed(wav, sample_rate))
