"""Pydantic request/response bodies of the HTTP API.

Only shape and range checks live here, with the ranges the engine defines (``engine.types``,
``llm.sampling``), and the fixed length bounds of identifiers and URLs (``max_length``, so the
OpenAPI document states them; over one is a 413 like every other size limit). Limits that depend
on the settings (free-text length, bytes, seconds, iterations, chain length: ``api.limits``) and
checks that need the catalogue (loaded variants, edit_info per mode, voices) live in
``api.speech_requests``, so they can answer 413 or list what is available.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from engine.types import MAX_SEED, MAX_SPEED, MIN_SPEED, EditMode, Mode
from llm.sampling import MAX_INTENSITY, MIN_INTENSITY
from settings import ResponseFormat, Variant

StreamFormat = Literal["audio", "sse"]

MODEL_ID = "step-audio-editx"
# Names OpenAI clients send by default; all mean "the Step-Audio-EditX model".
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")

MAX_NAME_CHARS = 64  # model, voice, edit_info: the longest valid value is far shorter (voice names: 64)
MAX_URL_CHARS = 2048  # *_audio_url: what browsers and most servers accept
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


def unicode_text(value: object) -> object:
    """Refuse a string holding a lone UTF-16 surrogate: valid JSON (``"\\ud800"``) but not text that
    a tokenizer, a file or a header can take. Every text field passes here at the boundary. A body
    that is not UTF-8 is parsed with its bad bytes as lone surrogates (``api.json_body``), so this
    check names the field that holds them too."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"is not valid UTF-8 text: a lone surrogate at character {exc.start} (a \\udXXX escape, or a "
                "byte sequence that is not UTF-8); send valid Unicode text"
            ) from None
    return value


class _TextModel(BaseModel):
    """A request body whose every string field must be valid Unicode text.

    The check runs before the field's own type: a constrained or union-typed string would
    otherwise fail on the surrogate with pydantic's less telling message, once per union member.
    """

    @field_validator("*", mode="before")
    @classmethod
    def check_unicode_text(cls, value: object) -> object:
        return unicode_text(value)


class EditStepBody(_TextModel):
    """One step of ``step_audio.edits``: it edits the previous step's output."""

    model_config = ConfigDict(extra="forbid")

    mode: EditMode = Field(description="The edit mode.")
    edit_info: Name | None = Field(None, description="Edit option of the mode (GET /v1/tags).")
    n_edit_iter: int = Field(1, ge=1, description="Iterations of this step (at most the server's --max-edit-iter).")
    text: str | None = Field(
        None,
        description="paralinguistic: the new transcript with inline tags; later steps hear it "
        "(at most --max-input-chars characters).",
    )


class StepAudioOptions(_TextModel):
    """The ``step_audio`` object: everything OpenAI's body has no field for."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("clone", description="clone, or one of the edit modes.")
    model_variant: Variant | None = Field(
        None, description="LLM variant (must be loaded); default: the one `model` names, else base."
    )
    prompt_text: str | None = Field(
        None, description="Transcript of the clone reference clip (at most --max-input-chars characters)."
    )
    prompt_audio_base64: str | None = Field(
        None, description="Clone reference clip (overrides `voice`); at most --max-upload-bytes once decoded."
    )
    prompt_audio_url: str | None = Field(
        None, max_length=MAX_URL_CHARS, description="Clone reference clip by URL (when enabled)."
    )
    input_audio_base64: str | None = Field(None, description="Audio to edit; at most --max-upload-bytes once decoded.")
    input_audio_url: str | None = Field(
        None, max_length=MAX_URL_CHARS, description="Audio to edit, by URL (when enabled)."
    )
    audio_text: str | None = Field(
        None, description="Transcript of the audio to edit (at most --max-input-chars characters)."
    )
    edit_info: Name | None = Field(None, description="Edit option of the mode (GET /v1/tags).")
    intensity: float = Field(
        1.0,
        ge=MIN_INTENSITY,
        le=MAX_INTENSITY,
        description="Guidance scale on the LLM's conditioning; 1.0 is exactly the reference model. "
        "Other values are an inference-time technique StepFun did not train or validate.",
    )
    n_edit_iter: int = Field(
        1, ge=1, description="Edit iterations, each on the previous output (at most the server's --max-edit-iter)."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed for reproducible output; generation i of a request uses seed + i."
    )
    edits: list[EditStepBody] | None = Field(
        None, description="Edits applied in order after the clone (or after this request's own edit)."
    )
    return_iterations: bool = Field(
        False,
        description="Answer JSON with every output's audio (base64), labelled with its chain step, instead of "
        "the final audio.",
    )
    normalize_text: bool = Field(
        False,
        description="Read numbers, dates, times, currency and units as words (Chinese and English text "
        "normalization) before the model sees the text; off: the model reads the text as given, as the reference.",
    )


class VoiceRef(_TextModel):
    model_config = ConfigDict(extra="forbid")

    id: Name


class SpeechRequest(_TextModel):
    """OpenAI's ``/v1/audio/speech`` body plus ``step_audio``.

    Unknown top-level fields are ignored (newer OpenAI clients may send more); unknown
    fields inside ``step_audio`` are refused, so a typo is an error and not a silent no-op.
    """

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"model": MODEL_ID, "input": "Hello from Step-Audio-EditX.", "voice": "alloy"},
                {
                    "input": "Well [Laughter] that was fun.",
                    "voice": "alloy",
                    "stream_format": "sse",
                    "step_audio": {"seed": 7, "edits": [{"mode": "emotion", "edit_info": "happy"}]},
                },
            ]
        },
    )

    model: Name = Field(MODEL_ID, description=f"{MODEL_ID} (or an alias: {', '.join(MODEL_ALIASES)}).")
    input: str = Field(
        "",
        description="Target text (clone; paralinguistic: the tagged transcript); at most --max-input-chars characters.",
    )
    voice: Name | VoiceRef | None = Field(None, description="A registered voice or an OpenAI voice name.")
    response_format: ResponseFormat | None = Field(None, description="Default: the server's (wav).")
    speed: float = Field(1.0, ge=MIN_SPEED, le=MAX_SPEED, description="Tempo, pitch unchanged.")
    stream_format: StreamFormat | None = Field(
        None, description="audio: chunked audio; sse: speech.audio.delta / speech.audio.done events."
    )
    instructions: str | None = Field(
        None,
        description="Free text mapped onto the model's emotion / style / speed edits, run after the clone "
        "(reported in X-Step-Audio-Edits; text that maps to nothing is accepted). Not with step_audio.edits. "
        "At most --max-input-chars characters.",
    )
    step_audio: StepAudioOptions = Field(default_factory=StepAudioOptions)

    @field_validator("voice", mode="before")
    @classmethod
    def check_voice_length(cls, value: object) -> object:
        """The name's bound as one error at ``voice`` (the union would report it once per member)."""
        if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
            raise PydanticCustomError(
                "string_too_long", "String should have at most {max_length} characters", {"max_length": MAX_NAME_CHARS}
            )
        return value

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class ModelCard(BaseModel):
    id: Name
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stepfun-ai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(BaseModel):
    id: Name
    object: Literal["voice"] = "voice"
    transcript: str
    seconds: float
    sample_rate: int
    source: Literal["registered", "builtin"]
    aliases: list[str] = Field(default_factory=list)
    created: int | None = None


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceCard]


class IterationAudio(BaseModel):
    """One output: ``step`` 0 is the clone, step k the k-th edit step; ``iteration`` counts within it;
    ``segment`` is the text segment it speaks (0 unless a long text was cut into segments)."""

    index: int
    segment: int = 0
    step: int
    mode: str
    edit_info: str | None
    iteration: int
    seed: int
    audio_base64: str
    seconds: float


class SegmentCaption(BaseModel):
    """One text segment of the answer: its text, where its audio sits in the final audio (samples,
    end excluded; the pause after it is not included), its seed, and its offsets in ``input``.
    ``truncated``: its generation ended at the length limit, so its audio is cut short."""

    index: int
    text: str
    start: int
    end: int
    seed: int
    input_start: int
    input_end: int
    truncated: bool = False


class IterationsResponse(BaseModel):
    """``step_audio.return_iterations``: every output of the chain, the last one being the final audio."""

    object: Literal["speech.iterations"] = "speech.iterations"
    format: ResponseFormat
    sample_rate: int
    seed: int
    intensity: float
    transcript: str | None
    iterations: list[IterationAudio]
    segments: list[SegmentCaption] = Field(default_factory=list)
    truncated: bool = False
