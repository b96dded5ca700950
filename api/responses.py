"""A speech job's events encoded as its HTTP response: whole audio, chunked audio, SSE, or JSON.

One encoder for every shape: ``SpeechEncoder`` turns 24 kHz pieces into the response body in
``response_format``, as raw bytes or as SSE ``speech.audio.delta`` events, and ends it with
``speech.audio.done``. A streamed answer encodes the pieces as ``api.pipeline`` delivers them; a
whole answer is the pieces of the finished result, encoded at once (a whole-file container with
exact sizes); a stream whose job finished before any audio was streamed sends the finished
result in ``STREAM_CHUNK_SECONDS`` pieces.

The status and headers leave only once the job has started streaming or has finished, so every
input error is still a 4xx with OpenAI's envelope. A stream that fails after its headers left
ends with an SSE ``error`` event, or, for chunked audio, without the terminating chunk (the
client sees a broken transfer, never a short file that looks whole).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import numpy as np
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import Send

from api.audio_io import (
    CONTENT_TYPES,
    AudioFormat,
    StreamingAudioWriter,
    encode_audio,
    sse_delta,
    sse_done,
    sse_error,
    sse_event,
)
from api.errors import error_body_of, status_of
from api.metrics import Delivery
from api.pipeline import Audio, Caption, Finished, JobEvent, Started, run_job
from api.schemas import IterationAudio, IterationsResponse, SegmentCaption
from api.speech_requests import SpeechJob, api_param
from api.state import AppState, Engine
from engine.types import SegmentSpan, StreamInfo, SynthesisResult
from errors import RequestCancelledError, StepAudioError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_HEADER = "X-Step-Audio-Cache"
STREAM_CHUNK_SECONDS = 0.5


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


class SpeechEncoder:
    """Pieces of one response's audio to its body: raw bytes in ``fmt``, or SSE events carrying them."""

    def __init__(self, fmt: AudioFormat, sample_rate: int, *, sse: bool, total_samples: int | None = None) -> None:
        self.sse = sse
        self.writer = StreamingAudioWriter(fmt, sample_rate, streaming=True, total_samples=total_samples)

    async def pieces(self, pieces: Sequence[np.ndarray]) -> bytes:
        """The bytes ready after ``pieces`` (the encoder runs in a thread)."""
        data = b"".join([await run_in_threadpool(self.writer.write, piece) for piece in pieces])
        return self._framed(data)

    def caption(self, span: SegmentSpan) -> bytes:
        """SSE's ``speech.audio.segment`` event once a text segment's audio has been sent (chunked audio:
        nothing; the finished result's captions are in the JSON of ``return_iterations``)."""
        if not self.sse:
            return b""
        return sse_event({"type": "speech.audio.segment", **caption(span).model_dump()})

    async def finish(self, result: SynthesisResult) -> bytes:
        """The last audio bytes, then the end of the body (``done``)."""
        return await self.finish_audio() + self.done(result)

    async def finish_audio(self) -> bytes:
        """The audio bytes the encoder still held."""
        return self._framed(await run_in_threadpool(self.writer.finish))

    def done(self, result: SynthesisResult) -> bytes:
        """SSE's ``speech.audio.done``, with the token usage, the number of segments and whether a
        generation was cut short at the length limit (``truncated``); chunked audio: nothing."""
        if not self.sse:
            return b""
        n = result.n_audio_tokens
        usage = {"input_tokens": 0, "output_tokens": n, "total_tokens": n}
        return sse_done(usage, segments=max(1, len(result.segments)), truncated=result.cut_short)

    def _framed(self, data: bytes) -> bytes:
        return sse_delta(data) if self.sse and data else data


@dataclass(frozen=True)
class _Answer:
    """What every part of one answer needs: the app, the job, the format, SSE or not, its start time."""

    state: AppState
    job: SpeechJob
    fmt: AudioFormat
    sse: bool
    t0: float

    @property
    def mode(self) -> str:
        return self.job.mode

    def first_audio(self, delivery: Delivery) -> None:
        self.state.metrics.record_first_audio(self.mode, delivery, self.t0)

    def answered(self) -> None:
        self.state.metrics.record_answered(self.mode, self.t0)


def caption(span: SegmentSpan) -> SegmentCaption:
    return SegmentCaption(
        index=span.index,
        text=span.text,
        start=span.start,
        end=span.end,
        seed=span.seed,
        input_start=span.chars[0],
        input_end=span.chars[1],
        truncated=span.cut_short,
    )


def speech_headers(job: SpeechJob, info: StreamInfo) -> dict[str, str]:
    """The ``X-Step-Audio-*`` headers; ``X-Step-Audio-Cache`` lists ``hit`` / ``miss`` / ``none`` for each
    prompt the request prepared, in order (``none`` alone when it prepared none)."""
    headers = {
        "X-Step-Audio-Mode": job.mode,
        "X-Step-Audio-Variant": job.request.variant,
        "X-Step-Audio-Seed": str(info.seed),
        "X-Step-Audio-Intensity": f"{info.intensity:g}",
        "X-Step-Audio-Iterations": str(info.iterations),
        "X-Step-Audio-Sample-Rate": str(info.sample_rate),
        CACHE_HEADER: ",".join(info.prompt_cache) or "none",
    }
    if info.segments is not None:
        headers["X-Step-Audio-Segments"] = str(info.segments)
    if job.edits_report is not None:
        headers["X-Step-Audio-Edits"] = job.edits_report
    if info.transcript is not None:
        headers["X-Step-Audio-Transcript"] = quote(info.transcript, safe=" ,.!?'")
    return headers


def result_info(result: SynthesisResult) -> StreamInfo:
    iterations = len(result.iterations) or 1
    return StreamInfo(
        result.seed,
        result.intensity,
        result.sample_rate,
        iterations,
        result.transcript,
        len(result.segments) or None,
        prompt_cache=tuple(result.prompt_cache),
    )


async def respond(
    request: Request,
    state: AppState,
    engine: Engine,
    job: SpeechJob,
    *,
    fmt: AudioFormat,
    stream_format: str | None,
    return_iterations: bool,
    t0: float,
) -> Response:
    """Run ``job`` and answer with its audio in the shape the request asked for."""
    answer = _Answer(state, job, fmt, stream_format == "sse", t0)
    events = run_job(state, engine, job, stream=stream_format is not None and not return_iterations)
    try:
        first = await until_disconnect(request, anext(events))
    except ClientGoneError:  # counted by the pipeline when its consumer went away
        return Response(status_code=499)
    media_type = "text/event-stream" if answer.sse else CONTENT_TYPES[fmt]
    if isinstance(first, Started):
        headers = speech_headers(job, first.info)
        return AbortableStreamingResponse(_streamed(answer, first.info, events), media_type=media_type, headers=headers)
    assert isinstance(first, Finished)
    await events.aclose()
    result = first.result
    headers = speech_headers(job, result_info(result))
    headers["X-Step-Audio-Audio-Tokens"] = str(result.n_audio_tokens)
    headers["X-Step-Audio-Truncated"] = "true" if result.cut_short else "false"
    if return_iterations:
        return await _iterations(answer, result, headers)
    if stream_format is None:
        data = await run_in_threadpool(encode_audio, result.audio, fmt, result.sample_rate)
        answer.first_audio("whole")
        answer.answered()
        return Response(data, media_type=media_type, headers=headers)
    return StreamingResponse(_sliced(answer, result), media_type=media_type, headers=headers)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientGoneError``."""
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
    with contextlib.suppress(asyncio.CancelledError, Exception):  # let the job's cleanup run before we answer
        await task
    raise ClientGoneError


async def _streamed(answer: _Answer, info: StreamInfo, events: AsyncGenerator[JobEvent, None]) -> AsyncIterator[bytes]:
    """The body of a real stream: each piece encoded and sent as the engine makes it."""
    encoder = SpeechEncoder(answer.fmt, info.sample_rate, sse=answer.sse)
    first = True
    captions = b""  # a segment's caption follows the bytes its audio was encoded into
    try:
        async for event in events:
            if isinstance(event, Caption):
                captions += encoder.caption(event.span)
                continue
            if isinstance(event, Audio):
                audio = await encoder.pieces(event.pieces)
            elif isinstance(event, Finished):
                audio = await encoder.finish_audio()
            else:
                continue
            if audio and first:
                first = False
                answer.first_audio("streamed")
            data, captions = audio + captions, b""
            if isinstance(event, Finished):
                data += encoder.done(event.result)
            if data:
                yield data
    except RequestCancelledError as exc:
        logger.info("a %s stream stopped: %s", answer.mode, exc)
        return
    except Exception as exc:  # counted by the pipeline; the status line has left, so say it in the body
        _log_failed(answer.mode, exc)
        if not answer.sse:
            raise _StreamAbortedError from exc
        yield sse_error(error_body_of(exc, name_param=api_param))
        return
    answer.answered()


async def _sliced(answer: _Answer, result: SynthesisResult) -> AsyncIterator[bytes]:
    """A finished result sent as a stream, in pieces of ``STREAM_CHUNK_SECONDS``."""
    encoder = SpeechEncoder(answer.fmt, result.sample_rate, sse=answer.sse, total_samples=result.audio.size)
    step = max(1, int(STREAM_CHUNK_SECONDS * result.sample_rate))
    audio = np.asarray(result.audio, dtype=np.float32)
    pieces = [audio[i : i + step] for i in range(0, audio.size, step)] or [audio]
    first = True
    for k, piece in enumerate(pieces):
        data = await encoder.pieces([piece])
        if k == len(pieces) - 1:
            data += await encoder.finish(result)
        if data:
            if first:
                first = False
                answer.first_audio("whole")
            yield data
    answer.answered()


def _log_failed(mode: str, exc: Exception) -> None:
    if isinstance(exc, StepAudioError):
        logger.warning("a %s stream failed after it started (%d): %s", mode, status_of(exc), exc)
    else:
        logger.error("a %s stream failed after it started", mode, exc_info=exc)


async def _iterations(answer: _Answer, result: SynthesisResult, headers: dict[str, str]) -> JSONResponse:
    """``return_iterations``: every output of the chain, labelled, as base64 in JSON."""
    iterations = result.iterations or [result.audio]
    encoded = [await run_in_threadpool(encode_audio, audio, answer.fmt, result.sample_rate) for audio in iterations]
    body = IterationsResponse(
        format=answer.fmt,
        sample_rate=result.sample_rate,
        seed=result.seed,
        intensity=result.intensity,
        transcript=result.transcript,
        iterations=[
            IterationAudio(
                index=i + 1,
                segment=label.segment,
                step=label.step,
                mode=label.mode,
                edit_info=label.edit_info,
                iteration=label.iteration,
                seed=label.seed,
                audio_base64=base64.b64encode(data).decode("ascii"),
                seconds=len(audio) / result.sample_rate,
            )
            for i, (data, audio, label) in enumerate(zip(encoded, iterations, result.labels, strict=True))
        ],
        segments=[caption(span) for span in result.segments],
        truncated=result.cut_short,
    )
    answer.state.metrics.record_first_byte(answer.mode, answer.t0)
    answer.answered()
    return JSONResponse(body.model_dump(), headers=headers)
