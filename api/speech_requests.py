"""From the HTTP body to the engine's request: every check that needs the settings or the engine.

Shape and range checks are pydantic's (``api.schemas``); here: text limits (``api.limits``, first,
so every later check reads bounded text), iteration limits, the model / variant, each edit step
against the catalogue, the chain's limits (inline tags counted), which audio inputs a mode takes,
transcripts, voices. All of it runs before any audio is decoded or any job queued.
Audio is decoded and bounded by ``api.inputs``.

The engine names request fields by its own dataclass fields (``text``, ``audio``, ``variant``);
``api_param`` turns them into HTTP names, so HTTP names stay in this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from api.inputs import load_audio
from api.limits import check_request_text
from api.schemas import MODEL_ALIASES, MODEL_ID, SpeechRequest, StepAudioOptions
from api.state import AppState, Engine
from engine import chains
from engine.instructions import map_instructions
from engine.types import CloneRequest, EditRequest, EditStep
from errors import InvalidInputError, StepAudioError, TooLargeError

# engine-side field names -> HTTP ones (the rest are step_audio.<name> or top-level as they are)
_HTTP_NAMES = {
    "text": "input",
    "audio": "step_audio.input_audio",
    "prompt_audio": "step_audio.prompt_audio",
    "variant": "step_audio.model_variant",
    "speed": "speed",
}


@dataclass(frozen=True)
class SpeechJob:
    """The engine request and, when the request chains edits, what they are (``X-Step-Audio-Edits``)."""

    request: CloneRequest | EditRequest
    edits_report: str | None = None

    @property
    def mode(self) -> str:
        """``clone``, or the edit mode of the request's own (first) edit: the label of its metrics."""
        return "clone" if isinstance(self.request, CloneRequest) else self.request.mode


async def build_request(
    state: AppState,
    engine: Engine,
    body: SpeechRequest,
    uploads: dict[str, bytes],
    *,
    text_arrives_later: bool = False,
) -> SpeechJob:
    """Validate ``body`` (plus uploaded files by field name) and build the engine request.

    ``text_arrives_later``: a clone whose text comes afterwards, piece by piece (the WebSocket):
    ``input`` is not required, and the text's segments go to the engine as they become known.
    """
    check_request_text(state.settings, body)
    opts = body.step_audio
    variant = resolve_variant(body, list(engine.variants))
    if opts.return_iterations and body.stream_format is not None:
        raise InvalidInputError("return_iterations answers JSON; it cannot stream", param="stream_format")
    first, edits, text, report = _chain(state, engine, body)
    if opts.mode == "clone":
        request: CloneRequest | EditRequest = await _clone_request(
            state, body, uploads, variant, text=text, edits=edits, text_arrives_later=text_arrives_later
        )
    else:
        assert first is not None
        request = await _edit_request(state, body, uploads, variant, first=first, edits=edits)
    return SpeechJob(request, report)


async def build_counted(state: AppState, engine: Engine, body: SpeechRequest, uploads: dict[str, bytes]) -> SpeechJob:
    """``build_request``, with a refusal counted in the metrics under the request's mode.

    ``run_job`` counts only the jobs it is given, so the speech route and the web UI count a
    request refused before that here. The WebSocket's utterances do not count theirs, which is why
    ``build_request`` itself counts nothing.
    """
    try:
        return await build_request(state, engine, body, uploads)
    except StepAudioError as exc:
        state.metrics.record_status(body.step_audio.mode, exc)
        raise


def api_param(param: str | None) -> str | None:
    """The HTTP name of a field the engine names by its own request fields (``audio_text``, ``text``)."""
    if param in _HTTP_NAMES:
        return _HTTP_NAMES[param]
    if param and param in StepAudioOptions.model_fields:
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


def _chain(
    state: AppState, engine: Engine, body: SpeechRequest
) -> tuple[EditStep | None, tuple[EditStep, ...], str, str | None]:
    """The request's own edit (None for a clone), the edits after it, the clone's text, the report.

    Edits after the first operation come from inline tags in a clone's text (a paralinguistic step
    first), then from ``step_audio.edits`` or from ``instructions`` (not both). Each step is
    checked here, its errors named by where the step came from, and the whole chain against the
    limits: nothing is decoded or queued for a request that breaks a rule. The clone's text keeps
    its tags: the engine cuts it into segments and gives each segment that holds tags its own
    paralinguistic step (``engine.speaking``), so the edits returned are the ones after it.
    """
    opts = body.step_audio
    text = body.input
    first: EditStep | None = None
    inline: chains.InlineTags | None = None
    edits: list[tuple[EditStep, Callable[[str], str]]] = []
    if opts.mode == "clone":
        if opts.edit_info is not None:
            raise InvalidInputError("mode 'clone' takes no edit_info", param="step_audio.edit_info")
        inline = chains.split_inline_tags(text)
        if inline is not None:  # counted and checked here; realised per segment by the engine
            edits.append((EditStep("paralinguistic", text=inline.tagged), lambda _: "input"))
    else:
        tagged = body.input if opts.mode == "paralinguistic" else None
        step = EditStep(opts.mode, opts.edit_info, opts.n_edit_iter, tagged)
        first = _checked(engine, step, lambda f: "input" if f == "text" else f"step_audio.{f}")
    if opts.edits is not None and body.instructions is not None:
        raise InvalidInputError(
            "give step_audio.edits or instructions, not both (instructions map onto the same edits)",
            param="instructions",
        )
    report: str | None = None
    if opts.edits is not None:
        for i, item in enumerate(opts.edits):
            step = EditStep(item.mode, item.edit_info, item.n_edit_iter, item.text)
            edits.append((step, _edits_field(i)))
    elif body.instructions is not None:
        mapped = map_instructions(body.instructions)
        edits.extend((step, lambda _: "instructions") for step in mapped.steps)
        report = mapped.report
    checked = tuple(_checked(engine, step, where) for step, where in edits)
    chain = (first, *checked) if first is not None else checked
    try:
        chains.check_limits(
            chain,
            clone=first is None,
            max_steps=state.settings.max_chain_steps,
            max_generations=state.settings.max_chain_generations,
        )
    except TooLargeError as exc:  # named by where the steps came from; inline tags alone: input
        exc.param = "step_audio.edits" if opts.edits else "instructions" if body.instructions is not None else "input"
        raise
    if edits and report is None:
        report = chains.describe(checked)
    after = checked[1:] if first is None and inline is not None else checked
    return first, after, text, report


def _edits_field(index: int) -> Callable[[str], str]:
    """Engine field -> HTTP name for item ``index`` of ``step_audio.edits`` (binds the index now)."""
    return lambda field: f"step_audio.edits[{index}].{field}"


def _checked(engine: Engine, step: EditStep, where: Callable[[str], str]) -> EditStep:
    """``engine.check_steps`` on one step, its error named by ``where`` (engine field -> HTTP name)."""
    try:
        return engine.check_steps([step])[0]
    except InvalidInputError as exc:
        exc.param = where(exc.param or "mode")
        raise


async def _clone_request(
    state: AppState,
    body: SpeechRequest,
    uploads: dict[str, bytes],
    variant: str,
    *,
    text: str,
    edits: tuple[EditStep, ...],
    text_arrives_later: bool = False,
) -> CloneRequest:
    opts = body.step_audio
    if not text.strip() and not text_arrives_later:
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
        text=text,
        variant=variant,
        intensity=opts.intensity,
        seed=opts.seed,
        speed=body.speed,
        edits=edits,
        normalize_text=opts.normalize_text,
    )


async def _edit_request(
    state: AppState,
    body: SpeechRequest,
    uploads: dict[str, bytes],
    variant: str,
    *,
    first: EditStep,
    edits: tuple[EditStep, ...],
) -> EditRequest:
    opts = body.step_audio
    mode = first.mode
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
    if chains.needs_transcript((first, *edits)):
        _need_transcript(state, opts.audio_text, "step_audio.audio_text", "the audio to edit")
    return EditRequest(
        audio=audio,
        audio_text=opts.audio_text,
        mode=mode,
        edit_info=first.edit_info,
        text=first.text,
        n_edit_iter=first.n_edit_iter,
        variant=variant,
        intensity=opts.intensity,
        seed=opts.seed,
        speed=body.speed,
        edits=edits,
        normalize_text=opts.normalize_text,
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
