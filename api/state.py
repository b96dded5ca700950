"""What the routes share, kept on ``app.state.step_audio`` (no module-level singletons)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import Depends, Request

from api.metrics import Metrics
from engine.segments import Segment
from engine.service import InferenceService
from engine.types import AudioInput, AudioSink, CancelToken, CloneRequest, EditRequest, EditStep, SynthesisResult
from engine.voices import VoiceStore
from errors import ModelLoadError, NotReadyError
from settings import Settings

if TYPE_CHECKING:
    from llm.decode import DecodeObserver


class Engine(Protocol):
    """Everything the HTTP layer and the web UI use of ``engine.tts.StepAudioEngine``."""

    @property
    def variants(self) -> list[str]: ...
    @property
    def auto_transcribe(self) -> bool: ...
    def transcribe(self, audio: AudioInput) -> str: ...

    def clone(
        self,
        request: CloneRequest,
        *,
        sink: AudioSink | None = None,
        cancel: CancelToken | None = None,
        text: Iterable[Segment] | None = None,
    ) -> SynthesisResult: ...
    def segments(self, text: str) -> list[Segment]: ...
    def count_tokens(self, text: str) -> int: ...
    @property
    def segment_max_tokens(self) -> int: ...
    def edit(
        self, request: EditRequest, *, sink: AudioSink | None = None, cancel: CancelToken | None = None
    ) -> SynthesisResult: ...
    def tags(self) -> dict[str, list[str]]: ...
    def check_steps(self, steps: Sequence[EditStep]) -> tuple[EditStep, ...]: ...
    def prepare_voice(self, audio: AudioInput) -> None: ...
    def cache_stats(self) -> dict[str, Any]: ...
    def clear_cache(self) -> None: ...
    def default_voice(self) -> tuple[AudioInput, str]: ...
    def set_observer(self, observer: DecodeObserver | None) -> None: ...
    def close(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    service: InferenceService
    voices: VoiceStore
    metrics: Metrics
    engine: Engine | None = None
    load_error: str | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    loading_stage: str = "starting"
    extra: dict[str, Any] = field(default_factory=dict)

    def require_engine(self) -> Engine:
        if self.engine is None:
            if self.load_error:
                raise ModelLoadError(f"the models failed to load: {self.load_error}")
            raise NotReadyError(f"the models are still loading ({self.loading_stage}); retry shortly")
        return self.engine


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.step_audio
    return state


State = Annotated[AppState, Depends(get_state)]


def get_engine(state: State) -> Engine:
    return state.require_engine()


ReadyEngine = Annotated[Engine, Depends(get_engine)]
