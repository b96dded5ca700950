"""What the page's handlers share: the app, its uploads, its output folder, and speaking through the pipeline.

A request of the page is built exactly as the API builds one (``api.speech_requests``) and runs
through the API's own pipeline (``api.pipeline.run_job``): the same queue, the same cancellation
when its client goes away, the same ``/metrics`` series.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from starlette.concurrency import run_in_threadpool

from api.audio_io import encode_audio
from api.inputs import decode_audio_bytes
from api.logs import RecentLogHandler
from api.pipeline import Caption, Finished, JobEvent, Started, run_job
from api.schemas import SpeechRequest
from api.speech_requests import build_counted
from api.state import AppState, Engine
from api.ui.uploads import UploadedFiles
from engine.types import AudioInput, CloneRequest, EditRequest, StreamInfo, SynthesisResult

PROGRESS_POLL_S = 0.25


@dataclass(frozen=True)
class SegmentSpoken:
    """A text segment's audio is complete: the ``done``-th of ``total`` (None: not known yet)."""

    done: int
    total: int | None
    text: str

    def line(self) -> str:
        of = f" of {self.total}" if self.total else ""
        return f"**segment {self.done}{of}** spoken: {self.text}"


@dataclass(frozen=True)
class Spoken:
    """A finished request: the engine request, its result, its queue wait and run seconds."""

    job: CloneRequest | EditRequest
    result: SynthesisResult
    wait_s: float
    run_s: float


@dataclass
class Ui:
    """What the event handlers share: the app state, the log ring, a private output folder, the uploads.

    ``live``: whether results also play while they are generated. Gradio's streaming player
    encodes the pieces with the ``ffmpeg`` program; without it the page plays complete results.
    """

    state: AppState
    logs: RecentLogHandler
    out_dir: Path
    files: UploadedFiles
    live: bool = False

    def engine(self) -> Engine:
        return self.state.require_engine()

    def write_audio(self, samples: np.ndarray, sample_rate: int, fmt: str, stem: str) -> str:
        """Encode with the API's one encoder into the private folder; Gradio copies it into its cache."""
        path = self.out_dir / f"{stem}-{uuid.uuid4().hex[:8]}.{fmt}"
        path.write_bytes(encode_audio(samples, fmt, sample_rate))  # type: ignore[arg-type]
        return str(path)

    async def read_clip(self, path: str | None, param: str) -> bytes | None:
        """An uploaded or recorded clip's bytes: only an upload of the page, never past the limit.

        The guard checked the request already; this checks the path Gradio hands over again, on the
        opened file, off the event loop, so no handler can be made to read another server file.
        """
        if not path:
            return None
        return await run_in_threadpool(self.files.read, path, param)

    async def speak(
        self, body: dict[str, Any], uploads: dict[str, bytes], progress: gr.Progress
    ) -> AsyncGenerator[bytes | SegmentSpoken | Spoken, None]:
        """Validate like the API, then run the job through the API's own pipeline (``api.pipeline``).

        Yields WAV chunks of the audio as the engine makes it (when ``live``), a ``SegmentSpoken`` as
        each text segment's audio is complete (the progress line of a long text), then the finished
        run. The pipeline counts every outcome but a complete answer (an error with its status, a
        page that went away as 499); this records the first audio and the answer, as the route does.
        A page that goes away cancels or closes this generator, which closes the pipeline's: that
        cancels the job, which leaves the queue or, running, has its cancel token set.
        """
        engine = self.engine()
        request = SpeechRequest.model_validate(body)
        mode = request.step_audio.mode
        metrics = self.state.metrics
        t0 = time.perf_counter()
        job = await build_counted(self.state, engine, request, uploads)
        started = threading.Event()
        events = run_job(self.state, engine, job, stream=self.live, on_start=started.set)
        async with contextlib.aclosing(events):
            event = await self._first_event(events, started, t0, progress)
            info: StreamInfo | None = None
            streamed = False
            while not isinstance(event, Finished):
                if isinstance(event, Started):
                    info = event.info
                elif isinstance(event, Caption):
                    total = info.segments if info is not None else None
                    yield SegmentSpoken(event.span.index + 1, total, event.span.text)
                else:
                    assert info is not None  # the pipeline starts a stream before its audio
                    chunk = await run_in_threadpool(encode_audio, np.concatenate(event.pieces), "wav", info.sample_rate)
                    if not streamed:
                        streamed = True
                        metrics.record_first_audio(mode, "streamed", t0)
                    yield chunk
                event = await anext(events)
            if not streamed:
                metrics.record_first_audio(mode, "whole", t0)
            metrics.record_answered(mode, t0)
            yield Spoken(job.request, event.result, event.timing.queue_wait_s, event.timing.run_s)

    async def _first_event(
        self, events: AsyncGenerator[JobEvent, None], started: threading.Event, t0: float, progress: gr.Progress
    ) -> JobEvent:
        """The pipeline's first event; until it comes, the progress overlay says where the job is.

        Polled, never ``wait_for``: a timeout must not cancel the pipeline's step (that would stop
        the job). The first report comes after one poll: by then the job is in the queue (the
        pipeline submits it on its first step), and a job that starts at once shows no wait.
        """
        service = self.state.service
        step = asyncio.ensure_future(anext(events))
        try:
            while not (await asyncio.wait([step], timeout=PROGRESS_POLL_S))[0]:
                if started.is_set():
                    progress((round(time.perf_counter() - t0), None), desc="running", unit="s")
                else:
                    ahead = max(service.queued - 1 + service.running, 0)
                    progress(0.0, desc=f"waiting in the server queue: {ahead} request(s) ahead")
        except BaseException:  # the page went away: the cancelled step stops the job (and counts a 499)
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await step
            raise
        return step.result()

    async def transcribe_clip(self, path: str | None) -> str:
        """Whisper on an uploaded clip, through the queue (the same model the API uses)."""
        engine = self.engine()
        if not engine.auto_transcribe:
            raise gr.Error("auto-transcription is off on this server (start it with --enable-auto-transcribe)")
        data = await self.read_clip(path, "audio")
        if data is None:
            raise gr.Error("give a clip to transcribe first")
        audio: AudioInput = await decode_audio_bytes(data, settings=self.state.settings, param="audio")
        text, _ = await self.state.service.submit("transcribe", functools.partial(engine.transcribe, audio))
        return str(text).strip()
