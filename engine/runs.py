"""The state of one request while the engine runs it, and of each chain of generations in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.types import (
    AudioSink,
    CancelToken,
    CloneRequest,
    EditRequest,
    IterationLabel,
    PromptCacheResult,
    Timings,
)


@dataclass
class RequestRun:
    """What every chain of one request shares: the request, its seed, timings, sink and cancel token."""

    request: CloneRequest | EditRequest
    seed: int
    timings: Timings = field(default_factory=Timings)
    sink: AudioSink | None = None
    cancel: CancelToken | None = None
    transcript: str | None = None  # of the request's audio, for the stream's headers
    segments: int | None = None  # how many text segments, when known up front
    prompt_cache: list[PromptCacheResult] = field(default_factory=list)  # per generation's prompt, in order


@dataclass
class ChainRun:
    """One chain of generations (a clone segment and its edits, or an edit request): every output so
    far with its label. Its last generation streams to ``sink`` when it has one."""

    seed: int
    segment: int = 0
    sink: AudioSink | None = None
    outputs: list[np.ndarray] = field(default_factory=list)
    labels: list[IterationLabel] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cut_short: bool = False
    heard: np.ndarray | None = None  # the last output as streamed, speed applied (None: it did not stream)

    @property
    def generations(self) -> int:
        return len(self.outputs)

    def at_speed(self, stretch: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
        """Every output at the request's speed: ``stretch`` applied, except to a streamed last output,
        which went out stretched already (the stretch is deterministic: the same samples, made once)."""
        if self.heard is None:
            return [stretch(wav) for wav in self.outputs]
        return [stretch(wav) for wav in self.outputs[:-1]] + [self.heard]
