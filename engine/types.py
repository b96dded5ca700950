"""Plain data passed between the HTTP layer and the engine (no pydantic, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EditMode = Literal["emotion", "style", "paralinguistic", "speed", "denoise", "vad"]
Mode = Literal["clone", "emotion", "style", "paralinguistic", "speed", "denoise", "vad"]


@dataclass(frozen=True)
class AudioInput:
    """Decoded audio: float32 samples shaped (channels, n) in [-1, 1] at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return float(self.samples.shape[-1] / self.sample_rate)


@dataclass(frozen=True)
class CloneRequest:
    prompt_audio: AudioInput
    prompt_text: str | None  # None: transcribe when auto-transcription is on, else 400
    text: str
    variant: str = "base"
    intensity: float = 1.0
    seed: int | None = None
    speed: float = 1.0


@dataclass(frozen=True)
class EditRequest:
    audio: AudioInput
    audio_text: str | None  # None: transcribe when auto-transcription is on, else 400
    mode: EditMode
    edit_info: str | None = None
    text: str | None = None  # paralinguistic: the transcript with inline tags
    n_edit_iter: int = 1
    variant: str = "base"
    intensity: float = 1.0
    seed: int | None = None
    speed: float = 1.0


@dataclass
class SynthesisResult:
    """The final audio plus every intermediate edit iteration (``iterations[-1] is audio``)."""

    audio: np.ndarray  # float32 (n,) at sample_rate
    sample_rate: int
    seed: int
    intensity: float
    iterations: list[np.ndarray] = field(default_factory=list)
    transcript: str | None = None
    n_audio_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
