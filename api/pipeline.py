"""One path for a speech job, shared by the HTTP route and the web UI: queue, start, audio, end.

``run_job`` submits a built job to the service queue and yields what happens to it, in order:

    Started(info)   the engine accepted the request and is about to make audio (streams only)
    Audio(pieces)   24 kHz pieces as the streaming vocoder makes them (streams only)
    Caption(span)   a text segment's audio is complete: its text and samples (streams only)
    Finished(result, timing)

Every outcome but a complete answer is counted here, once: an error with its status, a client
that went away (the consumer stopped iterating before ``Finished``: the job leaves the queue or,
running, has its ``CancelToken`` set, so its generation stops before the next decode step) as
499. What the consumer sends is its own business: ``api.responses`` encodes the events into an
HTTP response, the web UI into its players; both record the first audio and the answer through
``api.metrics.Metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.speech_requests import SpeechJob, api_param
from api.state import AppState, Engine
from engine.segments import Segment
from engine.service import JobTiming
from engine.types import CancelToken, CloneRequest, SegmentSpan, StreamInfo, SynthesisResult
from errors import InvalidInputError, RequestCancelledError, StepAudioError


@dataclass(frozen=True)
class Started:
    info: StreamInfo


@dataclass(frozen=True)
class Audio:
    pieces: list[np.ndarray]


@dataclass(frozen=True)
class Caption:
    span: SegmentSpan


@dataclass(frozen=True)
class Finished:
    result: SynthesisResult
    timing: JobTiming


JobEvent = Started | Audio | Caption | Finished
_Streamed = Started | Audio | Caption


class LoopSink:
    """The engine's ``AudioSink`` for one job: its calls, made on a worker thread, become events on
    the event loop's queue, in order (the job's result is set after them, through the same loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[_Streamed] = asyncio.Queue()

    def start(self, info: StreamInfo) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, Started(info))

    def put(self, piece: np.ndarray) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, Audio([piece]))

    def segment(self, span: SegmentSpan) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, Caption(span))

    async def events(self, work: asyncio.Future[tuple[SynthesisResult, JobTiming]]) -> AsyncIterator[_Streamed]:
        """The events until ``work`` is done and every one is out; pieces that are ready together
        come as one ``Audio``."""
        while not (work.done() and self.queue.empty()):
            if self.queue.empty():
                get = asyncio.ensure_future(self.queue.get())
                pending: list[asyncio.Future[Any]] = [get, work]
                try:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not get.done():
                        get.cancel()
                ready = [get.result()] if get.done() and not get.cancelled() else []
            else:
                ready = []
            while not self.queue.empty():
                ready.append(self.queue.get_nowait())
            for event in _merged(ready):
                yield event


def _merged(events: list[_Streamed]) -> list[_Streamed]:
    out: list[_Streamed] = []
    for event in events:
        if isinstance(event, Audio) and out and isinstance(out[-1], Audio):
            out[-1] = Audio([*out[-1].pieces, *event.pieces])
        else:
            out.append(event)
    return out


async def run_job(
    state: AppState,
    engine: Engine,
    job: SpeechJob,
    *,
    stream: bool,
    on_start: Callable[[], None] | None = None,
    text: Iterable[Segment] | None = None,
) -> AsyncGenerator[JobEvent, None]:
    """The job's events (see the module docstring). ``on_start`` runs in the worker thread when the
    job leaves the queue (the web UI's progress). ``text``: a clone's segments as they become known
    (the WebSocket's ``SegmentFeed``) instead of its request's text. Errors raise, their fields named
    as the API names them."""
    mode = job.mode
    metrics = state.metrics
    sink = LoopSink() if stream else None
    cancel = CancelToken()  # set by the service when this job's consumer goes away
    request = job.request

    def run() -> SynthesisResult:
        if on_start is not None:
            on_start()
        if isinstance(request, CloneRequest):
            return engine.clone(request, sink=sink, cancel=cancel, text=text)
        return engine.edit(request, sink=sink, cancel=cancel)

    work = asyncio.ensure_future(state.service.submit(mode, run, request=request, cancel=cancel))
    try:
        if sink is not None:
            async for event in sink.events(work):
                yield event
        result, timing = await work
    except InvalidInputError as exc:
        exc.param = api_param(exc.param)
        metrics.record_status(mode, exc)
        raise
    except StepAudioError as exc:
        metrics.record_status(mode, exc)
        raise
    except RequestCancelledError:
        metrics.record_status(mode, 499)
        raise
    except Exception:
        metrics.record_status(mode, 500)
        raise
    except BaseException:
        # CancelledError or GeneratorExit: the consumer went away before the end. Counted here, not
        # from ``work``'s state: a consumer cancelled while awaiting ``work`` has cancelled it too.
        work.cancel()
        metrics.record_status(mode, 499)
        raise
    metrics.record_run(mode, result, timing)
    yield Finished(result, timing)  # a consumer that stops after this has had the whole answer
