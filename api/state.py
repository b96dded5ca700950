"""What the routes share, kept on ``app.state.step_audio`` (no module-level singletons)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from api.errors import UnauthorizedError
from api.metrics import Metrics
from engine.service import InferenceService
from engine.types import AudioInput, CloneRequest, EditRequest, EditStep, SynthesisResult
from engine.voices import VoiceStore
from errors import ModelLoadError, NotReadyError
from settings import Settings


class Engine(Protocol):
    """What the HTTP layer needs from ``engine.tts.StepAudioEngine`` (see INTERFACES.md)."""

    variants: list[str]

    def clone(self, request: CloneRequest) -> SynthesisResult: ...
    def edit(self, request: EditRequest) -> SynthesisResult: ...
    def tags(self) -> dict[str, list[str]]: ...
    def check_steps(self, steps: Sequence[EditStep]) -> tuple[EditStep, ...]: ...
    def prepare_voice(self, audio: AudioInput) -> None: ...
    def cache_stats(self) -> dict[str, Any]: ...
    def clear_cache(self) -> None: ...


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
    return request.app.state.step_audio


State = Annotated[AppState, Depends(get_state)]


def get_engine(state: State) -> Engine:
    return state.require_engine()


ReadyEngine = Annotated[Engine, Depends(get_engine)]


def require_api_key(request: Request, state: State) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (every route but /healthz)."""
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise UnauthorizedError("a valid API key is required (Authorization: Bearer <key>)")
