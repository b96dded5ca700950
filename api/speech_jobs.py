"""Running a built speech job: the service queue, the engine's audio stream, the run's metrics.

Shared by the HTTP route (``api.routes.speech``) and the web UI (``api.ui``), so both front ends
queue the same way, stop a generation the same way when their client leaves (cancelling the
awaiting task sets the job's ``CancelToken``), and count in the same ``/metrics`` series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from api.speech_requests import SpeechJob
from api.state import AppState, Engine
from engine.types import CancelToken, CloneRequest, SegmentSpan, StreamInfo, SynthesisResult


class LoopSink:
    """The engine's ``AudioSink`` for one request: hands events to the event loop's queue."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started: asyncio.Future[StreamInfo] = self._loop.create_future()
        self.events: asyncio.Queue[np.ndarray] = asyncio.Queue()

    def start(self, info: StreamInfo) -> None:
        self._loop.call_soon_threadsafe(self._started, info)

    def _started(self, info: StreamInfo) -> None:
        if not self.started.done():
            self.started.set_result(info)

    def put(self, piece: np.ndarray) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, piece)

    def segment(self, span: SegmentSpan) -> None:
        """Segment boundaries are in the finished result; a stream does not announce them yet."""

    async def pieces(self, work: asyncio.Future[Any]) -> AsyncIterator[list[np.ndarray]]:
        """The pieces in order, as many as are ready each time, until ``work`` is done and all are out.

        Every piece is queued before the job's result is set (both go through the loop in order),
        so once ``work`` is done what is left in the queue is the rest of the stream.
        """
        ended = False
        while not ended:
            ready: list[np.ndarray] = []
            if work.done():
                ended = True
            else:
                get = asyncio.ensure_future(self.events.get())
                either: list[asyncio.Future[Any]] = [get, work]
                try:
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not get.done():
                        get.cancel()
                if get.done() and not get.cancelled():
                    ready.append(get.result())
            while not self.events.empty():
                ready.append(self.events.get_nowait())
            if ready:
                yield ready


async def submit_job(
    state: AppState,
    engine: Engine,
    mode: str,
    job: SpeechJob,
    *,
    sink: LoopSink | None = None,
    on_start: Callable[[], None] | None = None,
) -> tuple[SynthesisResult, Any]:
    """Queue ``job`` in the service; cancelling the awaiting task stops it (queued or running).

    ``on_start`` runs in the worker thread when the job leaves the queue (the UI's progress).
    """
    request = job.request
    cancel = CancelToken()  # set by the service when this request's client goes away

    def run() -> SynthesisResult:
        if on_start is not None:
            on_start()
        if isinstance(request, CloneRequest):
            return engine.clone(request, sink=sink, cancel=cancel)
        return engine.edit(request, sink=sink, cancel=cancel)

    return await state.service.submit(mode, run, request=request, cancel=cancel)


def record_run(state: AppState, mode: str, result: SynthesisResult, timing: Any) -> None:
    """A finished job's queue wait, real-time factor, audio seconds and cache lookups."""
    audio_s = len(result.audio) / result.sample_rate
    m = state.metrics
    m.queue_wait.labels(mode).observe(timing.queue_wait_s)
    if audio_s > 0:
        m.rtf.labels(mode).observe(timing.run_s / audio_s)
    m.audio_seconds.labels(mode).inc(audio_s)
    for key, n in (("hit", result.cache_hits), ("miss", result.cache_misses)):
        if n > 0:
            m.cache_lookups.labels(mode, key).inc(n)


def record_answered(state: AppState, mode: str, t0: float) -> None:
    """A request answered in full: its latency from ``t0`` (``time.perf_counter``) and a 200."""
    m = state.metrics
    m.latency.labels(mode).observe(time.perf_counter() - t0)
    m.requests.labels(mode, "200").inc()
