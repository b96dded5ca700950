"""``POST /v1/audio/speech`` (JSON) and ``POST /v1/audio/speech/upload`` (multipart).

Both build one ``SpeechRequest`` and go through ``synthesize``: validate against the settings
and the loaded engine, resolve audio and voice, queue the work, encode the answer (whole,
chunked audio, or SSE). Response headers report what was applied: seed, intensity, the
number of edit iterations, variant, generated audio tokens.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.audio_io import CONTENT_TYPES, StreamingAudioWriter, encode_audio, sse_delta, sse_done
from api.errors import ERROR_RESPONSES, status_of
from api.inputs import load_audio, read_upload
from api.schemas import (
    EDIT_MODES,
    MODEL_ALIASES,
    MODEL_ID,
    IterationAudio,
    IterationsResponse,
    SpeechRequest,
    StepAudioOptions,
)
from api.state import AppState, Engine, ReadyEngine, State, require_api_key
from engine.types import CloneRequest, EditRequest, SynthesisResult
from errors import InvalidInputError, StepAudioError, TooLargeError

router = APIRouter(tags=["speech"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

T = TypeVar("T")
STREAM_CHUNK_SECONDS = 0.5
MODES_NEEDING_TRANSCRIPT = ("emotion", "style", "speed", "paralinguistic")
MODES_WITH_EDIT_INFO = ("emotion", "style", "speed")
_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {ct: {} for ct in sorted(set(CONTENT_TYPES.values()))}, "description": "The audio."}
}


class ClientGoneError(Exception):
    """The client disconnected while its request waited or ran."""


@router.post("/v1/audio/speech", response_class=Response, responses=_AUDIO_RESPONSES)
async def create_speech(body: SpeechRequest, request: Request, state: State, engine: ReadyEngine) -> Response:
    """OpenAI's speech endpoint: clone (default) or edit, audio given as base64, URL or voice."""
    return await synthesize(request, state, engine, body, {})


@router.post("/v1/audio/speech/upload", response_class=Response, responses=_AUDIO_RESPONSES)
async def create_speech_upload(
    *,
    request: Request,
    state: State,
    engine: ReadyEngine,
    payload: Annotated[str, Form(description="The JSON body of /v1/audio/speech.")],
    prompt_audio_file: Annotated[UploadFile | None, File(description="Clone reference clip.")] = None,
    input_audio_file: Annotated[UploadFile | None, File(description="Audio to edit.")] = None,
) -> Response:
    """The same request as multipart: ``payload`` JSON plus the audio as files."""
    try:
        body = SpeechRequest.model_validate_json(payload)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise InvalidInputError("payload is not valid JSON", param="payload") from exc
        raise
    limit = state.settings.max_upload_bytes
    uploads = {
        name: await read_upload(f, max_bytes=limit, param=f"{name}_file")
        for name, f in (("prompt_audio", prompt_audio_file), ("input_audio", input_audio_file))
        if f is not None
    }
    return await synthesize(request, state, engine, body, uploads)


async def synthesize(
    request: Request, state: AppState, engine: Engine, body: SpeechRequest, uploads: dict[str, bytes]
) -> Response:
    t0 = time.perf_counter()
    mode = body.step_audio.mode
    try:
        return await _synthesize(request=request, state=state, engine=engine, body=body, uploads=uploads, t0=t0)
    except StepAudioError as exc:
        state.metrics.requests.labels(mode, str(status_of(exc))).inc()
        raise
    except ClientGoneError:
        state.metrics.requests.labels(mode, "499").inc()
        return Response(status_code=499)


async def _synthesize(
    *,
    request: Request,
    state: AppState,
    engine: Engine,
    body: SpeechRequest,
    uploads: dict[str, bytes],
    t0: float,
) -> Response:
    settings = state.settings
    opts = body.step_audio
    mode = opts.mode
    fmt = body.response_format or settings.default_response_format
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
    check_edit_info(mode, opts.edit_info, engine.tags())

    job: CloneRequest | EditRequest
    if mode == "clone":
        job = await _clone_request(state, body, uploads, variant)
    else:
        job = await _edit_request(state, body, uploads, variant)

    try:
        result, timing, cache_delta = await _run_until_disconnect(request, _submit(state, engine, mode, job))
    except InvalidInputError as exc:
        exc.param = api_param(exc.param)
        raise
    audio_s = len(result.audio) / result.sample_rate
    m = state.metrics
    m.queue_wait.labels(mode).observe(timing.queue_wait_s)
    if audio_s > 0:
        m.rtf.labels(mode).observe(timing.run_s / audio_s)
    m.audio_seconds.labels(mode).inc(audio_s)
    for key, n in cache_delta.items():
        if n > 0:
            m.cache_lookups.labels(mode, key).inc(n)

    iterations = result.iterations or [result.audio]
    headers = {
        "X-Step-Audio-Mode": mode,
        "X-Step-Audio-Variant": variant,
        "X-Step-Audio-Seed": str(result.seed),
        "X-Step-Audio-Intensity": f"{result.intensity:g}",
        "X-Step-Audio-Iterations": str(len(iterations)),
        "X-Step-Audio-Audio-Tokens": str(result.n_audio_tokens),
        "X-Step-Audio-Sample-Rate": str(result.sample_rate),
    }
    if result.transcript is not None:
        headers["X-Step-Audio-Transcript"] = quote(result.transcript, safe=" ,.!?'")
    if opts.return_iterations:
        return await _iterations_response(
            state=state, mode=mode, fmt=fmt, result=result, iterations=iterations, headers=headers, t0=t0
        )
    if body.stream_format is None:
        data = await run_in_threadpool(encode_audio, result.audio, fmt, result.sample_rate)
        m.ttfb.labels(mode).observe(time.perf_counter() - t0)
        m.latency.labels(mode).observe(time.perf_counter() - t0)
        m.requests.labels(mode, "200").inc()
        return Response(data, media_type=CONTENT_TYPES[fmt], headers=headers)
    sse = body.stream_format == "sse"
    return StreamingResponse(
        _stream(state, mode, fmt, result, t0, sse=sse),
        media_type="text/event-stream" if sse else CONTENT_TYPES[fmt],
        headers=headers,
    )


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
    assert mode in EDIT_MODES
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


async def _submit(
    state: AppState, engine: Engine, mode: str, job: CloneRequest | EditRequest
) -> tuple[SynthesisResult, Any, dict[str, int]]:
    delta: dict[str, int] = {}

    def run() -> SynthesisResult:
        before = _cache_counts(engine)
        result = engine.clone(job) if isinstance(job, CloneRequest) else engine.edit(job)
        after = _cache_counts(engine)
        delta.update({k: after[k] - before.get(k, 0) for k in after})
        return result

    result, timing = await state.service.submit(mode, run, request=job)
    return result, timing, delta


def _cache_counts(engine: Engine) -> dict[str, int]:
    try:
        stats = engine.cache_stats()
    except Exception:  # stats are best-effort bookkeeping; a request never fails on them
        return {}
    return {"hit": int(stats.get("hits", 0)), "miss": int(stats.get("misses", 0))}


async def _run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (a queued job leaves the queue)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGoneError


async def _stream(
    state: AppState, mode: str, fmt: str, result: SynthesisResult, t0: float, *, sse: bool
) -> AsyncIterator[bytes]:
    """Chunked audio or SSE events; the encoder runs in a thread chunk by chunk."""
    m = state.metrics
    writer = StreamingAudioWriter(fmt, result.sample_rate, streaming=True, total_samples=len(result.audio))
    step = max(1, int(STREAM_CHUNK_SECONDS * result.sample_rate))
    first = True
    audio = np.asarray(result.audio, dtype=np.float32)
    for start in range(0, len(audio), step):
        data = await run_in_threadpool(writer.write, audio[start : start + step])
        if data:
            if first:
                m.ttfb.labels(mode).observe(time.perf_counter() - t0)
                first = False
            yield sse_delta(data) if sse else data
    data = await run_in_threadpool(writer.finish)
    if data:
        if first:
            m.ttfb.labels(mode).observe(time.perf_counter() - t0)
        yield sse_delta(data) if sse else data
    if sse:
        n = result.n_audio_tokens
        yield sse_done({"input_tokens": 0, "output_tokens": n, "total_tokens": n})
    m.latency.labels(mode).observe(time.perf_counter() - t0)
    m.requests.labels(mode, "200").inc()


async def _iterations_response(
    *,
    state: AppState,
    mode: str,
    fmt: str,
    result: SynthesisResult,
    iterations: list[np.ndarray],
    headers: dict[str, str],
    t0: float,
) -> JSONResponse:
    encoded = [await run_in_threadpool(encode_audio, it, fmt, result.sample_rate) for it in iterations]
    body = IterationsResponse(
        format=fmt,  # type: ignore[arg-type]
        sample_rate=result.sample_rate,
        seed=result.seed,
        intensity=result.intensity,
        transcript=result.transcript,
        iterations=[
            IterationAudio(
                index=i + 1,
                audio_base64=base64.b64encode(d).decode("ascii"),
                seconds=len(a) / result.sample_rate,
            )
            for i, (d, a) in enumerate(zip(encoded, iterations, strict=True))
        ],
    )
    m = state.metrics
    m.ttfb.labels(mode).observe(time.perf_counter() - t0)
    m.latency.labels(mode).observe(time.perf_counter() - t0)
    m.requests.labels(mode, "200").inc()
    return JSONResponse(body.model_dump(), headers=headers)
