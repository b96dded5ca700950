"""Plain data passed between the HTTP layer and the engine (no pydantic, no torch).

The value ranges the engine accepts live here once, so the HTTP schema and the engine's own
checks cannot drift apart (the guidance range belongs to ``llm.sampling``, which applies it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np

from engine.segments import Segment

# the names of llm.prompts.EDIT_OPTIONS as types (pydantic needs literals; a test keeps the three equal)
EditMode = Literal["emotion", "style", "speed", "paralinguistic", "denoise", "vad"]
Mode = Literal["clone", "emotion", "style", "speed", "paralinguistic", "denoise", "vad"]  # one enum in the schema
EDIT_MODES: tuple[str, ...] = get_args(EditMode)

PromptCacheResult = Literal["hit", "miss", "none"]  # a prompt's features: cached, computed, no cache

MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class AudioInput:
    """Decoded audio: float32 samples shaped (channels, n) in [-1, 1] at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return float(self.samples.shape[-1] / self.sample_rate)


@dataclass(frozen=True)
class EditStep:
    """One edit of a chain: it runs ``n_edit_iter`` times on the previous step's output.

    ``text`` is paralinguistic's new transcript with inline tags; the step after it hears that text.
    """

    mode: EditMode
    edit_info: str | None = None
    n_edit_iter: int = 1
    text: str | None = None


@dataclass(frozen=True)
class CloneRequest:
    """Speak ``text`` in the voice of ``prompt_audio``, then apply ``edits`` in order."""

    prompt_audio: AudioInput
    prompt_text: str | None  # None: transcribe when auto-transcription is on, else refused
    text: str
    variant: str = "base"
    intensity: float = 1.0
    seed: int | None = None
    speed: float = 1.0
    edits: tuple[EditStep, ...] = ()
    normalize_text: bool = False  # read numbers, dates, currency and units as words (engine.normalize)


@dataclass(frozen=True)
class EditRequest:
    """Edit ``audio`` (``mode`` .. ``n_edit_iter`` are the first step), then apply ``edits`` in order."""

    audio: AudioInput
    audio_text: str | None  # None: transcribe when auto-transcription is on, else refused
    mode: EditMode
    edit_info: str | None = None
    text: str | None = None  # paralinguistic: the transcript with inline tags
    n_edit_iter: int = 1
    variant: str = "base"
    intensity: float = 1.0
    seed: int | None = None
    speed: float = 1.0
    edits: tuple[EditStep, ...] = ()
    normalize_text: bool = False

    @property
    def first_step(self) -> EditStep:
        return EditStep(self.mode, self.edit_info, self.n_edit_iter, self.text)


@dataclass(frozen=True)
class IterationLabel:
    """Where one returned audio comes from: chain step (0: the clone), its mode, iteration, seed,
    and the text segment it speaks (0 unless a long text was cut into segments)."""

    step: int
    mode: str
    edit_info: str | None
    iteration: int
    seed: int
    segment: int = 0


@dataclass(frozen=True)
class SegmentSpan:
    """One segment of a request's audio: the text it speaks and where its audio sits.

    ``start`` / ``end``: its first and one-past-last sample in the request's audio (the pause
    after it is not included); ``chars``: its (start, end) offsets in the request's text.
    ``cut_short``: one of its generations ended at the length limit instead of its stop id.
    """

    index: int
    text: str
    start: int
    end: int
    seed: int
    chars: tuple[int, int] = (0, 0)
    cut_short: bool = False

    @classmethod
    def of(cls, index: int, segment: Segment, start: int, end: int, *, seed: int, cut_short: bool) -> SegmentSpan:
        """Segment ``index``'s span, its text and character offsets taken from ``segment``.

        The streamed captions and the result's spans are built here, so they cannot disagree.
        """
        return cls(index, segment.text, start, end, seed, (segment.start, segment.end), cut_short)


@dataclass
class Timings:
    """Where one request's time went, in seconds; each part adds up over every generation it ran.

    ``first_audio`` (seconds from the first streamed generation's start to its first audio),
    ``first_audio_ids`` (its ids sampled by then) and ``streamed_ids`` (all its ids) are set only
    when the request streamed.
    """

    transcribe: float = 0.0
    prompt_features: float = 0.0
    llm: float = 0.0
    vocoder: float = 0.0
    speed: float = 0.0
    total: float = 0.0
    first_audio: float | None = None
    first_audio_ids: int | None = None
    streamed_ids: int | None = None

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Add the time the block takes to ``part`` (one of the float fields above)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - begin)

    def stream_start_fraction(self) -> float | None:
        """Share of the streamed generation's ids sampled when its first audio left (None: not streamed)."""
        if self.first_audio_ids is None or not self.streamed_ids:
            return None
        return self.first_audio_ids / self.streamed_ids


@dataclass
class SynthesisResult:
    """The final audio plus every intermediate output, each labelled.

    A request whose text is one segment has ``iterations[-1] is audio``; with several segments,
    ``iterations`` holds each segment's outputs in order and ``audio`` joins the segments' last
    outputs (``engine.seams``), each located by its ``segments`` span. ``cache_hits`` /
    ``cache_misses`` count this request's prompt-cache lookups (not a difference of global
    counters, which other workers move at the same time). ``prompt_cache`` says, for each prompt
    the request prepared (one per generation, in order), whether its features were a cache
    ``hit``, a ``miss``, or ``none`` (no cache): what the response's ``X-Step-Audio-Cache`` reports.
    """

    audio: np.ndarray  # float32 (n,) at sample_rate
    sample_rate: int
    seed: int
    intensity: float
    iterations: list[np.ndarray] = field(default_factory=list)
    labels: list[IterationLabel] = field(default_factory=list)
    transcript: str | None = None
    n_audio_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    cache_hits: int = 0
    cache_misses: int = 0
    segments: list[SegmentSpan] = field(default_factory=list)  # a clone's text segments, in order
    cut_short: bool = False  # some generation ended at the length limit: part of the audio is missing
    prompt_cache: list[PromptCacheResult] = field(default_factory=list)


class CancelToken:
    """A request's "the client went away" flag, with hooks that run the moment it is set.

    The service sets it from the event loop; the engine hooks the running generation's cancel
    onto it, so the LLM stops before its next decode step, not at the next poll.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the token is set (at once if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._hooks.append(hook)
                return
        hook()


@dataclass(frozen=True)
class StreamInfo:
    """What a streamed answer can say before its first audio (its response headers)."""

    seed: int
    intensity: float
    sample_rate: int
    iterations: int  # the generations of one segment's chain (the last one is the streamed one)
    transcript: str | None = None
    segments: int | None = None  # how many segments the text was cut into; None while text still arrives
    prompt_cache: tuple[PromptCacheResult, ...] = ()  # as SynthesisResult's: every prompt is ready by now


class AudioSink(Protocol):
    """Where a streamed request's audio goes as it is made (the HTTP layer's response).

    ``start`` is called once, after everything that can reject the request has run and right
    before the first audio is made; ``put`` then receives the 24 kHz float32 pieces in order, and
    ``segment`` the span of each text segment once all its audio has been put. All are called
    from the worker thread and must not block.
    """

    def start(self, info: StreamInfo) -> None: ...

    def put(self, piece: np.ndarray) -> None: ...

    def segment(self, span: SegmentSpan) -> None: ...
