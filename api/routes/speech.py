"""``POST /v1/audio/speech`` (JSON) and ``POST /v1/audio/speech/upload`` (multipart).

Both build one ``SpeechRequest`` and go through ``synthesize``: ``api.speech_requests`` validates
it and builds the engine request, the service queue runs it, and the answer is encoded here
(whole, chunked audio, or SSE). Response headers report what was applied: seed, intensity, the
number of outputs (clone and edit iterations), variant, generated audio tokens, and the chained
edits (``X-Step-Audio-Edits``).
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
from api.inputs import read_upload
from api.schemas import IterationAudio, IterationsResponse, SpeechRequest
from api.speech_requests import SpeechJob, api_param, build_request
from api.state import AppState, Engine, ReadyEngine, State, require_api_key
from engine.types import CloneRequest, SynthesisResult
from errors import InvalidInputError, StepAudioError

router = APIRouter(tags=["speech"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

T = TypeVar("T")
STREAM_CHUNK_SECONDS = 0.5
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
    opts = body.step_audio
    mode = opts.mode
    fmt = body.response_format or state.settings.default_response_format
    job = await build_request(state, engine, body, uploads)
    try:
        result, timing = await _run_until_disconnect(request, _submit(state, engine, mode, job))
    except InvalidInputError as exc:
        exc.param = api_param(exc.param)
        raise
    audio_s = len(result.audio) / result.sample_rate
    m = state.metrics
    m.queue_wait.labels(mode).observe(timing.queue_wait_s)
    if audio_s > 0:
        m.rtf.labels(mode).observe(timing.run_s / audio_s)
    m.audio_seconds.labels(mode).inc(audio_s)
    for key, n in (("hit", result.cache_hits), ("miss", result.cache_misses)):
        if n > 0:
            m.cache_lookups.labels(mode, key).inc(n)

    iterations = result.iterations or [result.audio]
    headers = {
        "X-Step-Audio-Mode": mode,
        "X-Step-Audio-Variant": job.request.variant,
        "X-Step-Audio-Seed": str(result.seed),
        "X-Step-Audio-Intensity": f"{result.intensity:g}",
        "X-Step-Audio-Iterations": str(len(iterations)),
        "X-Step-Audio-Audio-Tokens": str(result.n_audio_tokens),
        "X-Step-Audio-Sample-Rate": str(result.sample_rate),
    }
    if job.edits_report is not None:
        headers["X-Step-Audio-Edits"] = job.edits_report
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


async def _submit(state: AppState, engine: Engine, mode: str, job: SpeechJob) -> tuple[SynthesisResult, Any]:
    request = job.request

    def run() -> SynthesisResult:
        return engine.clone(request) if isinstance(request, CloneRequest) else engine.edit(request)

    return await state.service.submit(mode, run, request=request)


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
                step=label.step,
                mode=label.mode,
                edit_info=label.edit_info,
                iteration=label.iteration,
                seed=label.seed,
                audio_base64=base64.b64encode(d).decode("ascii"),
                seconds=len(a) / result.sample_rate,
            )
            for i, (d, a, label) in enumerate(zip(encoded, iterations, result.labels, strict=True))
        ],
    )
    m = state.metrics
    m.ttfb.labels(mode).observe(time.perf_counter() - t0)
    m.latency.labels(mode).observe(time.perf_counter() - t0)
    m.requests.labels(mode, "200").inc()
    return JSONResponse(body.model_dump(), headers=headers)
