"""From the HTTP body to the engine's request: every check that needs the settings or the engine.

Shape and range checks are pydantic's (``api.schemas``); here: text and iteration limits, the
model / variant, ``edit_info`` per mode, which audio inputs a mode takes, transcripts, voices.
Audio is decoded and bounded by ``api.inputs``.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from api.inputs import load_audio
from api.schemas import EDIT_MODES, MODEL_ALIASES, MODEL_ID, SpeechRequest, StepAudioOptions
from api.state import AppState, Engine
from engine.types import CloneRequest, EditRequest
from errors import InvalidInputError, TooLargeError

MODES_NEEDING_TRANSCRIPT = ("emotion", "style", "speed", "paralinguistic")
MODES_WITH_EDIT_INFO = ("emotion", "style", "speed")


async def build_request(
    state: AppState, engine: Engine, body: SpeechRequest, uploads: dict[str, bytes]
) -> CloneRequest | EditRequest:
    """Validate ``body`` (plus uploaded files by field name) and build the engine request."""
    settings = state.settings
    opts = body.step_audio
    variant = resolve_variant(body, list(engine.variants))
    if len(body.input) > settings.max_input_chars:
        raise TooLargeError(
            f"input is {len(body.input)} characters; the limit is {settings.max_input_chars}", param="input"
        )
    if opts.n_edit_iter > settings.max_edit_iter:
        raise InvalidInputError(
            f"n_edit_iter is at most {settings.max_edit_iter} on this server", param="step_audio.n_edit_iter"
        )
    if opts.return_iterations and body.stream_format is not None:
        raise InvalidInputError("return_iterations answers JSON; it cannot stream", param="stream_format")
    check_edit_info(opts.mode, opts.edit_info, engine.tags())
    if opts.mode == "clone":
        return await _clone_request(state, body, uploads, variant)
    return await _edit_request(state, body, uploads, variant)


def api_param(param: str | None) -> str | None:
    """The engine names request fields plainly (``audio_text``); the API nests them in ``step_audio``."""
    if param and (param in StepAudioOptions.model_fields or param in ("prompt_audio", "input_audio")):
        return f"step_audio.{param}"
    return param


def resolve_variant(body: SpeechRequest, loaded: list[str]) -> str:
    """The LLM variant: ``step_audio.model_variant``, else the one ``model`` names, else base."""
    named: str | None = None
    model = body.model
    if model.startswith(f"{MODEL_ID}-"):
        named = model.removeprefix(f"{MODEL_ID}-")
    elif model not in (MODEL_ID, *MODEL_ALIASES):
        known = [MODEL_ID, *(f"{MODEL_ID}-{v}" for v in loaded if v != "base"), *MODEL_ALIASES]
        raise InvalidInputError(f"unknown model {model!r}; use one of: {', '.join(known)}", param="model")
    variant = body.step_audio.model_variant or named or ("base" if "base" in loaded else loaded[0])
    if variant not in loaded:
        raise InvalidInputError(
            f"model variant {variant!r} is not loaded on this server; loaded: {', '.join(loaded)}",
            param="step_audio.model_variant",
        )
    return variant


def check_edit_info(mode: str, edit_info: str | None, tags: dict[str, list[str]]) -> None:
    """emotion/style/speed need one of their options; the other modes take none."""
    if mode in MODES_WITH_EDIT_INFO:
        options = tags.get(mode, [])
        if edit_info is None:
            raise InvalidInputError(
                f"mode {mode!r} needs step_audio.edit_info, one of: {', '.join(options)}",
                param="step_audio.edit_info",
            )
        if edit_info not in options:
            raise InvalidInputError(
                f"edit_info {edit_info!r} is not valid for mode {mode!r}; valid: {', '.join(options)}",
                param="step_audio.edit_info",
            )
    elif edit_info is not None:
        hint = " (put the tags inline in `input`)" if mode == "paralinguistic" else ""
        raise InvalidInputError(f"mode {mode!r} takes no edit_info{hint}", param="step_audio.edit_info")


async def _clone_request(state: AppState, body: SpeechRequest, uploads: dict[str, bytes], variant: str) -> CloneRequest:
    opts = body.step_audio
    if not body.input.strip():
        raise InvalidInputError("clone needs the text to speak in `input`", param="input")
    _refuse_unused(opts.input_audio_base64, opts.input_audio_url, uploads.get("input_audio"), "input_audio", "clone")
    prompt = await load_audio(
        state.settings,
        base64_value=opts.prompt_audio_base64,
        url=opts.prompt_audio_url,
        upload=uploads.get("prompt_audio"),
        param="prompt_audio",
    )
    prompt_text = opts.prompt_text
    if prompt is None:
        if body.voice_name is None:
            raise InvalidInputError(
                "clone needs a voice: `voice`, or step_audio.prompt_audio_base64 / prompt_audio_url",
                param="voice",
            )
        voice = await run_in_threadpool(state.voices.resolve, body.voice_name)
        prompt = voice.audio
        prompt_text = prompt_text if prompt_text is not None else voice.transcript
    _need_transcript(state, prompt_text, "step_audio.prompt_text", "the clone reference clip")
    return CloneRequest(
        prompt_audio=prompt,
        prompt_text=prompt_text,
        text=body.input,
        variant=variant,
        intensity=opts.intensity,
        seed=opts.seed,
        speed=body.speed,
    )


async def _edit_request(state: AppState, body: SpeechRequest, uploads: dict[str, bytes], variant: str) -> EditRequest:
    opts = body.step_audio
    mode = opts.mode
    assert mode != "clone" and mode in EDIT_MODES
    _refuse_unused(opts.prompt_audio_base64, opts.prompt_audio_url, uploads.get("prompt_audio"), "prompt_audio", mode)
    audio = await load_audio(
        state.settings,
        base64_value=opts.input_audio_base64,
        url=opts.input_audio_url,
        upload=uploads.get("input_audio"),
        param="input_audio",
    )
    if audio is None:
        raise InvalidInputError(
            f"mode {mode!r} edits audio: give step_audio.input_audio_base64, input_audio_url "
            "or the input_audio_file upload",
            param="step_audio.input_audio_base64",
        )
    text: str | None = None
    if mode == "paralinguistic":
        if not body.input.strip():
            raise InvalidInputError(
                "paralinguistic needs `input`: the transcript with inline tags such as [Laughter]",
                param="input",
            )
        text = body.input
    if mode in MODES_NEEDING_TRANSCRIPT:
        _need_transcript(state, opts.audio_text, "step_audio.audio_text", "the audio to edit")
    return EditRequest(
        audio=audio,
        audio_text=opts.audio_text,
        mode=mode,
        edit_info=opts.edit_info,
        text=text,
        n_edit_iter=opts.n_edit_iter,
        variant=variant,
        intensity=opts.intensity,
        seed=opts.seed,
        speed=body.speed,
    )


def _refuse_unused(b64: str | None, url: str | None, upload: bytes | None, name: str, mode: str) -> None:
    if b64 is not None or url is not None or upload is not None:
        raise InvalidInputError(f"{name} is not used by mode {mode!r}", param=f"step_audio.{name}_base64")


def _need_transcript(state: AppState, text: str | None, param: str, what: str) -> None:
    if text is not None and not text.strip():
        raise InvalidInputError(f"{param} is empty", param=param)
    if text is None and not state.settings.enable_auto_transcribe:
        raise InvalidInputError(
            f"{param} (the transcript of {what}) is required: auto-transcription is off on this server "
            "(start it with --enable-auto-transcribe)",
            param=param,
        )
