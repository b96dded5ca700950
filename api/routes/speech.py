"""``POST /v1/audio/speech`` (JSON) and ``POST /v1/audio/speech/upload`` (multipart).

Both build one ``SpeechRequest`` and go through ``synthesize``: ``api.speech_requests`` validates
it and builds the engine request, the service queue runs it, and the answer is encoded here
(whole, chunked audio, or SSE). Response headers report what was applied: seed, intensity, the
number of outputs (clone and edit iterations), variant, generated audio tokens, the chained
edits (``X-Step-Audio-Edits``) and the prompt cache's answer per prompt (``X-Step-Audio-Cache``).

The JSON body is read as bytes and parsed in a worker thread (``api.json_body``), not by FastAPI
on the event loop. A stream that fails after its headers left ends with an SSE ``error`` event,
or, for chunked audio, without the terminating chunk (the client sees a broken transfer, never
a short file that looks whole).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Send

from api.admission import queues_a_job
from api.audio_io import (
    CONTENT_TYPES,
    AudioFormat,
    StreamingAudioWriter,
    encode_audio,
    sse_delta,
    sse_done,
    sse_error,
)
from api.errors import ERROR_RESPONSES, ErrorResponse, error_body, status_of
from api.json_body import parse_json, read_json
from api.openapi import json_body
from api.schemas import IterationAudio, IterationsResponse, SpeechRequest
from api.speech_jobs import LoopSink, record_answered, record_run, submit_job
from api.speech_requests import SpeechJob, api_param, build_request
from api.state import AppState, Engine, ReadyEngine, State
from engine.types import StreamInfo, SynthesisResult
from errors import InvalidInputError, RequestCancelledError, StepAudioError

CACHE_HEADER = "X-Step-Audio-Cache"

router = APIRouter(tags=["speech"], responses=ERROR_RESPONSES)  # the API key and body limits: api.admission

logger = logging.getLogger(__name__)

T = TypeVar("T")
STREAM_CHUNK_SECONDS = 0.5
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The audio in `response_format` (whole, or chunked with `stream_format: audio`); "
        "`stream_format: sse` sends `speech.audio.delta` / `speech.audio.done` events; "
        "`step_audio.return_iterations` answers JSON with every edit iteration.",
        "model": IterationsResponse,  # application/json
        "content": {
            **{ct: _BINARY for ct in sorted(set(CONTENT_TYPES.values()))},
            "text/event-stream": {"schema": {"type": "string", "description": "Server-sent events."}},
        },
    },
}


class ClientGoneError(Exception):
    """The client disconnected while its request waited or ran."""


class _StreamAbortedError(Exception):
    """A chunked audio stream failed after its headers left: end it without the terminating chunk."""


class AbortableStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` whose body iterator can end it as a broken transfer.

    Returning without the final (empty, ``more_body: False``) message makes the server close the
    connection without HTTP's last chunk, so a client's read fails instead of ending cleanly.
    """

    async def stream_response(self, send: Send) -> None:
        with contextlib.suppress(_StreamAbortedError):  # the final message stays unsent
            await super().stream_response(send)


@router.post(
    "/v1/audio/speech",
    response_class=Response,
    responses={**_AUDIO_RESPONSES, 415: {"model": ErrorResponse, "description": "The body is not declared as JSON."}},
)
@queues_a_job
@json_body(SpeechRequest)
async def create_speech(request: Request, state: State, engine: ReadyEngine) -> Response:
    """OpenAI's speech endpoint: clone (default) or edit, audio given as base64, URL or voice."""
    body = await read_json(request, SpeechRequest)
    return await synthesize(request, state, engine, body, {})


@router.post("/v1/audio/speech/upload", response_class=Response, responses=_AUDIO_RESPONSES)
@queues_a_job
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
    # the payload's bytes were checked for UTF-8 as they arrived (api.admission)
    body = await run_in_threadpool(parse_json, payload, SpeechRequest, what="payload", param="payload")
    uploads = {  # each file's size was bounded while the body streamed in (api.admission)
        name: await f.read()
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
    if body.stream_format is not None and not opts.return_iterations:
        return await _stream_response(
            request, state, engine, job, mode=mode, fmt=fmt, sse=body.stream_format == "sse", t0=t0
        )
    try:
        result, timing = await _run_until_disconnect(request, submit_job(state, engine, mode, job))
    except InvalidInputError as exc:
        exc.param = api_param(exc.param)
        raise
    record_run(state, mode, result, timing)
    iterations = result.iterations or [result.audio]
    headers = _headers(
        mode,
        job,
        _result_info(result, len(iterations)),
    )
    headers["X-Step-Audio-Audio-Tokens"] = str(result.n_audio_tokens)
    if opts.return_iterations:
        return await _iterations_response(
            state=state, mode=mode, fmt=fmt, result=result, iterations=iterations, headers=headers, t0=t0
        )
    if body.stream_format is None:
        data = await run_in_threadpool(encode_audio, result.audio, fmt, result.sample_rate)
        m = state.metrics
        m.ttfb.labels(mode).observe(time.perf_counter() - t0)
        m.ttfa.labels(mode, "whole").observe(time.perf_counter() - t0)
        record_answered(state, mode, t0)
        return Response(data, media_type=CONTENT_TYPES[fmt], headers=headers)
    # a request that asked for a stream but ran whole (return_iterations): sliced as it is
    sse = body.stream_format == "sse"
    return StreamingResponse(
        _stream_whole(state, mode, fmt, result, t0, sse=sse),
        media_type="text/event-stream" if sse else CONTENT_TYPES[fmt],
        headers=headers,
    )


def _result_info(result: SynthesisResult, iterations: int) -> StreamInfo:
    return StreamInfo(
        result.seed,
        result.intensity,
        result.sample_rate,
        iterations,
        result.transcript,
        prompt_cache=tuple(result.prompt_cache),
    )


def _headers(mode: str, job: SpeechJob, info: StreamInfo) -> dict[str, str]:
    """The ``X-Step-Audio-*`` headers; ``X-Step-Audio-Cache`` lists ``hit`` / ``miss`` / ``none`` for each
    prompt the request prepared, in order (``none`` alone when it prepared none)."""
    headers = {
        "X-Step-Audio-Mode": mode,
        "X-Step-Audio-Variant": job.request.variant,
        "X-Step-Audio-Seed": str(info.seed),
        "X-Step-Audio-Intensity": f"{info.intensity:g}",
        "X-Step-Audio-Iterations": str(info.iterations),
        "X-Step-Audio-Sample-Rate": str(info.sample_rate),
        CACHE_HEADER: ",".join(info.prompt_cache) or "none",
    }
    if job.edits_report is not None:
        headers["X-Step-Audio-Edits"] = job.edits_report
    if info.transcript is not None:
        headers["X-Step-Audio-Transcript"] = quote(info.transcript, safe=" ,.!?'")
    return headers


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


async def _stream_response(
    request: Request,
    state: AppState,
    engine: Engine,
    job: SpeechJob,
    *,
    mode: str,
    fmt: AudioFormat,
    sse: bool,
    t0: float,
) -> Response:
    """Real streaming: audio leaves as the streaming vocoder makes it, while the LLM generates.

    The response starts (status and headers) only once the engine has accepted the request and
    its last generation (every prompt is prepared by then), so every input error is still the 4xx
    a whole request gets; a failure after that ends the stream with an error (``_stream_pieces``).
    """
    sink = LoopSink()
    work = asyncio.ensure_future(submit_job(state, engine, mode, job, sink=sink))
    first = sink.started

    async def started() -> None:
        pending: list[asyncio.Future[Any]] = [work, first]
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    try:
        await _run_until_disconnect(request, started())
    except BaseException:
        work.cancel()  # the service sets the job's cancel event: the engine stops within a step
        first.cancel()
        raise
    if not first.done():  # the job ended before any stream began: an error, or nothing to stream
        first.cancel()
        try:
            result, timing = work.result()
        except InvalidInputError as exc:
            exc.param = api_param(exc.param)
            raise
        record_run(state, mode, result, timing)
        headers = _headers(mode, job, _result_info(result, len(result.iterations)))
        return StreamingResponse(
            _stream_whole(state, mode, fmt, result, t0, sse=sse),
            media_type="text/event-stream" if sse else CONTENT_TYPES[fmt],
            headers=headers,
        )
    info = first.result()
    return AbortableStreamingResponse(
        _stream_pieces(state, mode, fmt, info=info, sink=sink, work=work, t0=t0, sse=sse),
        media_type="text/event-stream" if sse else CONTENT_TYPES[fmt],
        headers=_headers(mode, job, info),
    )


async def _stream_pieces(
    state: AppState,
    mode: str,
    fmt: AudioFormat,
    *,
    info: StreamInfo,
    sink: LoopSink,
    work: asyncio.Future[tuple[SynthesisResult, Any]],
    t0: float,
    sse: bool,
) -> AsyncIterator[bytes]:
    """Encode and send each piece as it arrives; a client that leaves cancels the work.

    A failure after the headers left cannot change the status any more: SSE ends with an ``error``
    event in OpenAI's envelope; chunked audio ends without its terminating chunk.
    """
    m = state.metrics
    writer = StreamingAudioWriter(fmt, info.sample_rate, streaming=True)
    first = True

    def mark_first() -> None:
        nonlocal first
        if first:
            first = False
            m.ttfb.labels(mode).observe(time.perf_counter() - t0)
            m.ttfa.labels(mode, "streamed").observe(time.perf_counter() - t0)

    try:
        async for pieces in sink.pieces(work):
            for piece in pieces:
                data = await run_in_threadpool(writer.write, piece)
                if data:
                    mark_first()
                    yield sse_delta(data) if sse else data
        try:
            result, timing = work.result()
        except RequestCancelledError as exc:
            logger.info("a %s stream stopped: %s", mode, exc)
            m.requests.labels(mode, "499").inc()
            return
        except Exception as exc:
            status = _stream_failed(state, mode, exc)
            if not sse:
                raise _StreamAbortedError from exc
            if isinstance(exc, StepAudioError):
                yield sse_error(
                    error_body(status, str(exc), code=exc.code, param=api_param(getattr(exc, "param", None)))
                )
            else:
                yield sse_error(error_body(status, "internal server error", code="server_error"))
            return
        record_run(state, mode, result, timing)
        fraction = result.timings.stream_start_fraction()
        if fraction is not None:
            m.stream_start.labels(mode).observe(fraction)
        data = await run_in_threadpool(writer.finish)
        if data:
            mark_first()
            yield sse_delta(data) if sse else data
        if sse:
            n = result.n_audio_tokens
            yield sse_done({"input_tokens": 0, "output_tokens": n, "total_tokens": n})
        record_answered(state, mode, t0)
    finally:
        if not work.done():  # the client went away mid-stream
            work.cancel()
            m.requests.labels(mode, "499").inc()


def _stream_failed(state: AppState, mode: str, exc: Exception) -> int:
    """Log and count a stream that failed after it started; the status its error would have had."""
    if isinstance(exc, StepAudioError):
        status = status_of(exc)
        logger.warning("a %s stream failed after it started (%d): %s", mode, status, exc)
    else:
        status = 500
        logger.error("a %s stream failed after it started", mode, exc_info=exc)
    state.metrics.requests.labels(mode, str(status)).inc()
    return status


async def _stream_whole(
    state: AppState, mode: str, fmt: AudioFormat, result: SynthesisResult, t0: float, *, sse: bool
) -> AsyncIterator[bytes]:
    """A finished result sent as chunked audio or SSE events; the encoder runs in a thread."""
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
                m.ttfa.labels(mode, "whole").observe(time.perf_counter() - t0)
                first = False
            yield sse_delta(data) if sse else data
    data = await run_in_threadpool(writer.finish)
    if data:
        if first:
            m.ttfb.labels(mode).observe(time.perf_counter() - t0)
            m.ttfa.labels(mode, "whole").observe(time.perf_counter() - t0)
        yield sse_delta(data) if sse else data
    if sse:
        n = result.n_audio_tokens
        yield sse_done({"input_tokens": 0, "output_tokens": n, "total_tokens": n})
    record_answered(state, mode, t0)


async def _iterations_response(
    *,
    state: AppState,
    mode: str,
    fmt: AudioFormat,
    result: SynthesisResult,
    iterations: list[np.ndarray],
    headers: dict[str, str],
    t0: float,
) -> JSONResponse:
    encoded = [await run_in_threadpool(encode_audio, it, fmt, result.sample_rate) for it in iterations]
    body = IterationsResponse(
        format=fmt,
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
    record_answered(state, mode, t0)
    return JSONResponse(body.model_dump(), headers=headers)
