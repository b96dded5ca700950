"""The web UI: Gradio Blocks mounted at ``/ui`` inside the API server (``/`` redirects there).

It is a second front end on the same back end, not a client of it: every request is built by
``api.speech_requests.build_request`` from a ``SpeechRequest`` (so the UI has exactly the API's
validation and limits), runs through the app's one ``InferenceService`` queue (a UI request waits
behind API requests and counts in ``/metrics``), and domain errors become the same sentences the
API puts in its error envelope, shown in the page instead of a traceback. Gradio's own queue is
not a second gate: inference events have no Gradio concurrency limit, so the service's bounded
queue alone decides (a full queue is the API's 429 message).

Live playback: a clone (and an edit's last iteration) streams from the engine through the same
``AudioSink`` path as the API's streamed responses (``api.speech_jobs``) into Gradio's streaming
audio output, which plays while the LLM still generates; the complete result then fills the
Output player. A page that leaves cancels the request, as a gone HTTP client does.

Offline by construction: analytics off before Gradio is imported, the default theme's fonts are
shipped with Gradio, no server-side rendering (no Node), no run history. Gradio serves only its
own upload/cache directories (no ``allowed_paths``). Every request under ``/ui/`` passes
``api.ui_guard.UiGuard`` first: only the routes the page uses, the key's login (throttled) in
front of every route that runs work, files only from Gradio's upload directory, Gradio's errors in
the API's envelope. The events are private (no programmatic Gradio API, no API docs): programs
use the HTTP API.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio at import and at launch: never phone home

import asyncio
import contextlib
import functools
import hmac
import logging
import shutil
import tempfile
import threading
import time
import typing
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount

from api.audio_io import encode_audio
from api.demo import DEMO_NOTICE
from api.errors import status_of, validation_message
from api.inputs import decode_audio_bytes
from api.logs import RecentLogHandler
from api.routes.system import cache_stats, clear_cache
from api.routes.voices import add_voice, list_voices
from api.schemas import MODEL_ID, SpeechRequest
from api.speech_jobs import LoopSink, record_answered, record_run, submit_job
from api.speech_requests import build_request
from api.state import AppState, Engine
from api.ui_guard import GradioApp, LoginThrottle, UiGuard, UploadedFiles
from engine import chains
from engine.types import EDIT_MODES, AudioInput, CloneRequest, EditRequest, EditStep, SynthesisResult
from errors import StepAudioError
from llm.sampling import MAX_INTENSITY, MIN_INTENSITY
from settings import ResponseFormat

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
# pcm is raw samples without a header: a browser cannot play it (the HTTP API serves it)
UI_FORMATS = [f for f in typing.get_args(ResponseFormat) if f != "pcm"]
PROGRESS_POLL_S = 0.25
LOG_POLL_S = 1.0
LOG_PANEL_LINES = 200
READY_WAIT_S = 900.0  # a page opened while the models load waits this long for them
_JOIN_OVERHEAD_BYTES = 1 << 20  # an event's JSON beyond its texts: file references, numbers, choices
_JOIN_BYTES_PER_CHAR = 24  # a text field's character as JSON at worst (an escaped surrogate pair), a few fields
# Gradio's textbox keeps its scroll position on updates; the panel follows the newest line instead
_SCROLL_LOG_JS = (
    "() => { const t = document.querySelector('#server-log textarea'); if (t) t.scrollTop = t.scrollHeight; }"
)
_STATUS_TITLES = {
    400: "Invalid input",
    401: "Unauthorized",
    404: "Not found",
    413: "Too large",
    429: "Busy",
    503: "Not ready",
}


@dataclass(frozen=True)
class _Spoken:
    """A finished request: the engine request, its result, its queue wait and run seconds."""

    job: CloneRequest | EditRequest
    result: SynthesisResult
    wait_s: float
    run_s: float


@dataclass
class _Ui:
    """What the event handlers share: the app state, the log ring, a private output folder, the uploads.

    ``live``: whether results also play while they are generated. Gradio's streaming player
    encodes the pieces with the ``ffmpeg`` program; without it the page plays complete results.
    """

    state: AppState
    logs: RecentLogHandler
    out_dir: Path
    files: UploadedFiles
    live: bool = False

    # --- plumbing ---------------------------------------------------------------------
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
    ) -> AsyncGenerator[bytes | _Spoken, None]:
        """Validate like the API, queue in the service, report the wait, stream, count in ``/metrics``.

        Yields WAV chunks of the audio as the engine makes it (when ``live``), then the finished
        run. A page that goes away cancels or closes this generator: that cancels the job, which
        leaves the queue or, running, has its cancel token set, as for a gone HTTP client.
        """
        engine = self.engine()
        request = SpeechRequest.model_validate(body)
        mode = request.step_audio.mode
        metrics = self.state.metrics
        t0 = time.perf_counter()
        started = threading.Event()
        try:
            speech_job = await build_request(self.state, engine, request, uploads)
            sink = LoopSink() if self.live else None
            work = asyncio.ensure_future(
                submit_job(self.state, engine, mode, speech_job, sink=sink, on_start=started.set)
            )
            service = self.state.service
            try:
                await asyncio.sleep(0)  # let the task enqueue the job, so the count below includes it
                watch: list[asyncio.Future[Any]] = [work] if sink is None else [work, sink.started]
                while not any(f.done() for f in watch):
                    waited = time.perf_counter() - t0
                    if started.is_set():
                        progress((round(waited), None), desc="running", unit="s")
                    else:
                        ahead = max(service.queued - 1 + service.running, 0)
                        progress(0.0, desc=f"waiting in the server queue: {ahead} request(s) ahead")
                    await asyncio.wait(watch, timeout=PROGRESS_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if sink is not None and sink.started.done():
                    sample_rate = sink.started.result().sample_rate
                    async for pieces in sink.pieces(work):
                        yield await run_in_threadpool(encode_audio, np.concatenate(pieces), "wav", sample_rate)
            except BaseException:  # the page went away (cancelled or closed): stop the job like the API does
                work.cancel()
                raise
            result, timing = work.result()
        except StepAudioError as exc:
            metrics.requests.labels(mode, str(status_of(exc))).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            metrics.requests.labels(mode, "499").inc()
            raise
        record_run(self.state, mode, result, timing)
        record_answered(self.state, mode, t0)
        yield _Spoken(speech_job.request, result, timing.queue_wait_s, timing.run_s)

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


def takes_edit_info(mode: str, tags: dict[str, list[str]]) -> bool:
    """Whether ``mode``'s list in ``/v1/tags`` is its ``edit_info`` choices (paralinguistic's are inline tags)."""
    return mode != "paralinguistic" and bool(tags.get(mode))


def needs_audio_text(mode: str) -> bool:
    """Whether an edit in ``mode`` needs the transcript of its audio (the engine's rule)."""
    return chains.needs_transcript([EditStep(mode=mode)])  # type: ignore[arg-type]


def user_error(exc: BaseException) -> gr.Error:
    """The message a page shows for ``exc``: the API's error sentence, never a traceback."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, StepAudioError):
        status = status_of(exc)
        title = _STATUS_TITLES.get(status, "Server error")
        return gr.Error(str(exc), title=f"{title} ({status})", duration=None, print_exception=False)
    if isinstance(exc, ValidationError):
        message, _ = validation_message([dict(e) for e in exc.errors()])
        return gr.Error(message, title="Invalid input (400)", duration=None, print_exception=False)
    logger.exception("web UI: unexpected error: %s", exc)
    return gr.Error("internal server error (see the server log)", title="Server error (500)", duration=None)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async handler with every failure turned into a ``user_error`` (Gradio reads the signature)."""

    @functools.wraps(fn)  # Gradio reads the wrapped signature (inputs, the Progress parameter)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise user_error(exc) from None

    return wrapper


def _guarded_stream(fn: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncGenerator[Any, None]]:
    """``_guarded`` for an async generator handler; closing it closes ``fn``'s generator at once."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(fn(*args, **kwargs)) as updates:
                async for update in updates:
                    yield update
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise user_error(exc) from None

    return wrapper


def _seed(value: str | None) -> str | None:
    """Empty means random; anything else goes to the request model, which checks it like the API does."""
    return (value or "").strip() or None


def _summary(result: SynthesisResult, wait_s: float, run_s: float, *, variant: str) -> str:
    seconds = len(result.audio) / result.sample_rate
    parts = [
        f"**seed** {result.seed}",
        f"**intensity** {result.intensity:g}",
        f"**variant** {variant}",
        f"**audio** {seconds:.2f} s",
        f"**audio tokens** {result.n_audio_tokens}",
        f"**queue wait** {wait_s:.1f} s",
        f"**run** {run_s:.1f} s",
    ]
    if result.transcript is not None:
        parts.append(f"**transcript** {result.transcript}")
    return " · ".join(parts)


def _live_player(ui: _Ui, elem_id: str, *, label: str = "Live playback") -> gr.Audio:
    """The player that plays a result while it is generated (Gradio's streaming output, HLS in the page).

    Gradio wants ``microphone`` among a streaming Audio's sources; as an output it never records.
    The finished audio, in the chosen format, is the Output player's (with its download button).
    """
    return gr.Audio(
        label=label,
        sources=["microphone"],
        streaming=True,
        autoplay=True,
        interactive=False,
        buttons=[],
        visible=ui.live,
        elem_id=elem_id,
    )


def build_blocks(ui: _Ui) -> gr.Blocks:
    """The page: Clone, Edit, Voices and Cache tabs above the live server log."""
    settings = ui.state.settings
    max_iter = settings.max_edit_iter
    variants = list(dict.fromkeys(settings.variants))

    with gr.Blocks(title="Step-Audio-EditX", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(
            "# Step-Audio-EditX\nVoice cloning and speech editing. The same server answers the OpenAI-compatible "
            "API (`/v1/audio/speech`); this page goes through its queue and its checks."
        )
        if settings.demo:
            gr.Markdown(f"**DEMO MODE:** {DEMO_NOTICE}.", elem_id="demo-banner")
        status = gr.Markdown("Waiting for the models to load ...", elem_id="server-status")
        last_output = gr.State(None)

        with gr.Tabs():
            # --- Clone ------------------------------------------------------------------
            with gr.Tab("Clone", id="clone", elem_id="tab-clone"), gr.Row():
                with gr.Column():
                    c_clip = gr.Audio(
                        sources=["upload", "microphone"],
                        type="filepath",
                        label="Reference clip (upload or record; overrides the voice)",
                        elem_id="clone-clip",
                    )
                    c_voice = gr.Dropdown(
                        choices=["default"],
                        value="default",
                        label="Voice (used when no clip is given)",
                        elem_id="clone-voice",
                    )
                    with gr.Row():
                        c_transcript = gr.Textbox(
                            label="Transcript of the clip (empty: the voice's own, or Whisper when on)",
                            lines=2,
                            scale=4,
                            elem_id="clone-transcript",
                        )
                        c_transcribe = gr.Button("Transcribe", visible=False, scale=1, elem_id="clone-transcribe")
                    c_text = gr.Textbox(label="Text to speak", lines=3, elem_id="clone-text")
                with gr.Column():
                    c_intensity = gr.Slider(
                        MIN_INTENSITY, MAX_INTENSITY, value=1.0, step=0.1, label="Intensity", elem_id="clone-intensity"
                    )
                    c_variant = gr.Radio(variants, value=variants[0], label="Model variant", elem_id="clone-variant")
                    with gr.Row():
                        c_seed = gr.Textbox(label="Seed (empty: random)", elem_id="clone-seed")
                        c_format = gr.Dropdown(UI_FORMATS, value="wav", label="Format", elem_id="clone-format")
                    c_run = gr.Button("Generate", variant="primary", elem_id="clone-run")
                    c_live = _live_player(ui, "clone-live")
                    c_out = gr.Audio(
                        label="Output", type="filepath", interactive=False, buttons=["download"], elem_id="clone-out"
                    )
                    c_info = gr.Markdown(elem_id="clone-info")

            # --- Edit -------------------------------------------------------------------
            with gr.Tab("Edit", id="edit", elem_id="tab-edit"), gr.Row():
                with gr.Column():
                    e_audio = gr.Audio(
                        sources=["upload", "microphone"],
                        type="filepath",
                        label="Audio to edit (upload, record, or use the last output)",
                        elem_id="edit-audio",
                    )
                    e_use_last = gr.Button("Use the last output", size="sm", elem_id="edit-use-last")
                    e_mode = gr.Dropdown(list(EDIT_MODES), value="emotion", label="Mode", elem_id="edit-mode")
                    e_info = gr.Dropdown([], label="Edit option (edit_info)", elem_id="edit-info")
                    e_tagged = gr.Textbox(
                        label="Transcript with inline tags", visible=False, lines=2, elem_id="edit-tagged"
                    )
                    with gr.Row():
                        e_transcript = gr.Textbox(
                            label="Transcript of the audio", lines=2, scale=4, elem_id="edit-transcript"
                        )
                        e_transcribe = gr.Button("Transcribe", visible=False, scale=1, elem_id="edit-transcribe")
                with gr.Column():
                    e_iter = gr.Slider(1, max_iter, value=1, step=1, label="Edit iterations", elem_id="edit-iter")
                    e_intensity = gr.Slider(
                        MIN_INTENSITY, MAX_INTENSITY, value=1.0, step=0.1, label="Intensity", elem_id="edit-intensity"
                    )
                    e_variant = gr.Radio(variants, value=variants[0], label="Model variant", elem_id="edit-variant")
                    with gr.Row():
                        e_seed = gr.Textbox(label="Seed (empty: random)", elem_id="edit-seed")
                        e_format = gr.Dropdown(UI_FORMATS, value="wav", label="Format", elem_id="edit-format")
                    e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    e_live = _live_player(ui, "edit-live", label="Live playback of the last iteration")
                    e_outs = [
                        gr.Audio(
                            label=f"Iteration {i + 1}",
                            type="filepath",
                            interactive=False,
                            buttons=["download"],
                            visible=i == 0,
                            elem_id=f"edit-out-{i + 1}",
                        )
                        for i in range(max_iter)
                    ]
                    e_result = gr.Markdown(elem_id="edit-result")

            # --- Voices -----------------------------------------------------------------
            with gr.Tab("Voices", id="voices", elem_id="tab-voices"):
                v_table = gr.Dataframe(
                    headers=["voice", "source", "seconds", "transcript"],
                    interactive=False,
                    label="Voices",
                    elem_id="voices-table",
                )
                with gr.Row():
                    with gr.Column():
                        v_name = gr.Textbox(label="Name (letters, digits, - and _)", elem_id="voice-name")
                        v_clip = gr.Audio(
                            sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="voice-clip"
                        )
                        v_transcript = gr.Textbox(label="Transcript of the clip", lines=2, elem_id="voice-transcript")
                        v_register = gr.Button("Register", variant="primary", elem_id="voice-register")
                    with gr.Column():
                        v_pick = gr.Dropdown([], label="Voice", elem_id="voice-pick")
                        with gr.Row():
                            v_play = gr.Button("Play", elem_id="voice-play")
                            v_delete = gr.Button("Delete", variant="stop", elem_id="voice-delete")
                        v_audio = gr.Audio(label="Clip", type="filepath", interactive=False, elem_id="voice-audio")
                        v_message = gr.Markdown(elem_id="voice-message")

            # --- Cache ------------------------------------------------------------------
            with gr.Tab("Cache", id="cache", elem_id="tab-cache") as cache_tab:
                with gr.Row():
                    k_entries = gr.Number(label="Entries", interactive=False, elem_id="cache-entries")
                    k_bytes = gr.Number(label="Bytes", interactive=False, elem_id="cache-bytes")
                    k_hits = gr.Number(label="Hits", interactive=False, elem_id="cache-hits")
                    k_misses = gr.Number(label="Misses", interactive=False, elem_id="cache-misses")
                    k_ratio = gr.Number(label="Hit ratio", interactive=False, elem_id="cache-ratio")
                with gr.Row():
                    k_refresh = gr.Button("Refresh", elem_id="cache-refresh")
                    k_clear = gr.Button("Clear the cache", variant="stop", elem_id="cache-clear")
                gr.Markdown("Hits and misses count since the server started; entries and bytes are on disk.")

        with gr.Accordion("Server log (newest last)", open=True):
            log_box = gr.Textbox(
                show_label=False,
                lines=12,
                max_lines=12,
                autoscroll=True,
                interactive=False,
                elem_id="server-log",
            )
        log_timer = gr.Timer(LOG_POLL_S)

        # --- handlers -------------------------------------------------------------------
        def edit_controls(mode: str) -> tuple[Any, Any, Any]:
            tags = ui.state.engine.tags() if ui.state.engine is not None else {}
            options = tags.get(mode, [])
            info = gr.update(
                choices=options, value=options[0] if options else None, visible=takes_edit_info(mode, tags)
            )
            tagged = gr.update(
                visible=mode == "paralinguistic",
                info="Tags: " + " ".join(f"[{t}]" for t in tags.get("paralinguistic", [])),
            )
            transcript = gr.update(visible=needs_audio_text(mode))
            return info, tagged, transcript

        async def voices_view() -> tuple[Any, Any, Any]:
            cards = (await list_voices(ui.state)).data
            rows = [[c.id, c.source, c.seconds, c.transcript] for c in cards]
            registered = [c.id for c in cards if c.source == "registered"]
            names = ["default", *registered] if ui.state.voices.default_voice is not None else registered
            return (
                gr.update(value=rows),
                gr.update(choices=[c.id for c in cards], value=None),
                gr.update(choices=names, value=names[0] if names else None),
            )

        async def cache_view() -> tuple[Any, ...]:
            stats = await cache_stats(ui.engine())
            if not stats.get("enabled", True):
                raise gr.Error("the token cache is disabled on this server")
            return (
                stats.get("entries"),
                stats.get("bytes"),
                stats.get("hits"),
                stats.get("misses"),
                stats.get("hit_ratio"),
            )

        async def on_load() -> tuple[Any, ...]:
            deadline = time.monotonic() + READY_WAIT_S
            while ui.state.engine is None and ui.state.load_error is None and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            engine = ui.engine()  # raises the API's 503 message when loading failed or timed out
            loaded = list(engine.variants)
            default_variant = "base" if "base" in loaded else loaded[0]
            auto = engine.auto_transcribe
            ready = f"Ready · variants: {', '.join(loaded)} · auto-transcription {'on' if auto else 'off'}"
            return (
                ready,
                gr.update(choices=loaded, value=default_variant),
                gr.update(choices=loaded, value=default_variant),
                gr.update(visible=auto),
                gr.update(visible=auto),
                *edit_controls("emotion"),
                *(await voices_view()),
            )

        async def clone(  # noqa: PLR0917  # Gradio passes the inputs positionally
            clip: str | None,
            voice: str | None,
            transcript: str | None,  # a hidden text box sends null
            text: str | None,
            variant: str,
            intensity: float,
            seed: str | None,
            fmt: str,
            progress: gr.Progress = gr.Progress(),  # noqa: B008  # Gradio's documented idiom
        ) -> AsyncGenerator[tuple[Any, ...], None]:
            """Clone: the clip (or the voice) speaks the text; it plays while it is made when ``live``."""
            uploads = {"prompt_audio": data} if (data := await ui.read_clip(clip, "prompt_audio_file")) else {}
            body = {
                "model": MODEL_ID,
                "input": text or "",
                "voice": None if uploads else (voice or None),
                "response_format": fmt,
                "step_audio": {
                    "mode": "clone",
                    "model_variant": variant,
                    "prompt_text": (transcript or "").strip() or None,
                    "intensity": intensity,
                    "seed": _seed(seed),
                },
            }
            # aclosing: when the page leaves, closing this handler closes the request at once (``_Ui.speak``)
            async with contextlib.aclosing(ui.speak(body, uploads, progress)) as steps:
                async for step in steps:
                    if not isinstance(step, _Spoken):
                        yield step, gr.skip(), gr.skip(), gr.skip()
                        continue
                    result = step.result
                    path = await run_in_threadpool(ui.write_audio, result.audio, result.sample_rate, fmt, "clone")
                    yield gr.skip(), path, _summary(result, step.wait_s, step.run_s, variant=step.job.variant), path

        async def edit(  # noqa: PLR0917
            audio: str | None,
            mode: str,
            edit_info: str | None,
            tagged: str | None,
            transcript: str | None,  # a hidden text box sends null
            n_iter: float,
            variant: str,
            intensity: float,
            seed: str | None,
            fmt: str,
            progress: gr.Progress = gr.Progress(),  # noqa: B008
        ) -> AsyncGenerator[tuple[Any, ...], None]:
            """Edit: every iteration's audio is shown and downloadable; the last one is the result.

            Only the last iteration plays while it is made: the earlier ones are its input.
            """
            data = await ui.read_clip(audio, "input_audio_file")
            body = {
                "model": MODEL_ID,
                "input": (tagged or "") if mode == "paralinguistic" else "",
                "response_format": fmt,
                "step_audio": {
                    "mode": mode,
                    "model_variant": variant,
                    "edit_info": edit_info if takes_edit_info(mode, ui.engine().tags()) else None,
                    "audio_text": ((transcript or "").strip() or None) if needs_audio_text(mode) else None,
                    "n_edit_iter": int(n_iter),
                    "intensity": intensity,
                    "seed": _seed(seed),
                },
            }
            skip_all = [gr.skip()] * (max_iter + 2)
            speaking = ui.speak(body, {"input_audio": data} if data else {}, progress)
            async with contextlib.aclosing(speaking) as steps:
                async for step in steps:
                    if not isinstance(step, _Spoken):
                        yield (step, *skip_all)
                        continue
                    result = step.result
                    iterations = result.iterations or [result.audio]
                    paths = [
                        await run_in_threadpool(ui.write_audio, it, result.sample_rate, fmt, f"{mode}-iter{i + 1}")
                        for i, it in enumerate(iterations)
                    ]
                    outs = [
                        gr.update(value=paths[i], visible=True)
                        if i < len(paths)
                        else gr.update(value=None, visible=False)
                        for i in range(max_iter)
                    ]
                    summary = f"**iterations** {len(paths)} · " + _summary(
                        result, step.wait_s, step.run_s, variant=step.job.variant
                    )
                    yield (gr.skip(), *outs, summary, paths[-1])

        async def use_last(last: str | None) -> str:
            if not last:
                raise gr.Error("no output yet: clone or edit something first")
            return last

        async def transcribe(path: str | None) -> str:
            return await ui.transcribe_clip(path)

        async def register(name: str | None, clip: str | None, transcript: str | None) -> tuple[Any, ...]:
            data = await ui.read_clip(clip, "file")
            if data is None:
                raise gr.Error("give the voice's clip (upload or record)")
            voice = await add_voice(ui.state, ui.engine(), (name or "").strip(), data, transcript)
            return (f"Registered **{voice.name}** ({voice.seconds:.1f} s): {voice.transcript}", *(await voices_view()))

        async def play(name: str | None) -> str:
            if not name:
                raise gr.Error("pick a voice first")
            voice = await run_in_threadpool(ui.state.voices.resolve, name)
            samples = np.asarray(voice.audio.samples, dtype=np.float32)
            path = ui.out_dir / f"voice-{uuid.uuid4().hex[:8]}.wav"
            await run_in_threadpool(sf.write, path, samples.T, voice.audio.sample_rate)
            return str(path)

        async def delete(name: str | None) -> tuple[Any, ...]:
            if not name:
                raise gr.Error("pick a voice first")
            await run_in_threadpool(ui.state.voices.delete, name)
            return (f"Deleted **{name}**.", *(await voices_view()))

        async def clear() -> tuple[Any, ...]:
            await clear_cache(ui.engine())
            return await cache_view()

        async def log_tick(seen: int) -> tuple[Any, int]:
            version = ui.logs.version
            if version == seen:
                return gr.skip(), seen
            return "\n".join(ui.logs.lines()[-LOG_PANEL_LINES:]), version

        # --- wiring ---------------------------------------------------------------------
        # concurrency_limit=None on every event: the service's queue is the one gate, not Gradio's.
        # private: only the page runs its events (no Gradio API or API docs; programs use /v1).
        event: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}
        edit_extras = [e_info, e_tagged, e_transcript]
        voice_outputs = [v_table, v_pick, c_voice]
        cache_outputs = [k_entries, k_bytes, k_hits, k_misses, k_ratio]
        log_seen = gr.State(-1)

        blocks.load(
            _guarded(on_load),
            outputs=[status, c_variant, e_variant, c_transcribe, e_transcribe, *edit_extras, *voice_outputs],
            **event,
        )
        c_run.click(
            _guarded_stream(clone),
            inputs=[c_clip, c_voice, c_transcript, c_text, c_variant, c_intensity, c_seed, c_format],
            outputs=[c_live, c_out, c_info, last_output],
            **event,
        ).success(_guarded(cache_view), outputs=cache_outputs, show_progress="hidden", **event)
        e_run.click(
            _guarded_stream(edit),
            inputs=[e_audio, e_mode, e_info, e_tagged, e_transcript, e_iter, e_variant, e_intensity, e_seed, e_format],
            outputs=[e_live, *e_outs, e_result, last_output],
            **event,
        ).success(_guarded(cache_view), outputs=cache_outputs, show_progress="hidden", **event)
        e_mode.change(edit_controls, inputs=e_mode, outputs=edit_extras, **event)
        e_use_last.click(_guarded(use_last), inputs=last_output, outputs=e_audio, **event)
        c_transcribe.click(_guarded(transcribe), inputs=c_clip, outputs=c_transcript, **event)
        e_transcribe.click(_guarded(transcribe), inputs=e_audio, outputs=e_transcript, **event)
        v_register.click(
            _guarded(register), inputs=[v_name, v_clip, v_transcript], outputs=[v_message, *voice_outputs], **event
        )
        v_play.click(_guarded(play), inputs=v_pick, outputs=v_audio, **event)
        v_delete.click(_guarded(delete), inputs=v_pick, outputs=[v_message, *voice_outputs], **event)
        cache_tab.select(_guarded(cache_view), outputs=cache_outputs, show_progress="minimal", **event)
        k_refresh.click(_guarded(cache_view), outputs=cache_outputs, show_progress="minimal", **event)
        k_clear.click(_guarded(clear), outputs=cache_outputs, **event)
        log_timer.tick(log_tick, inputs=log_seen, outputs=[log_box, log_seen], show_progress="hidden", **event).then(
            None, js=_SCROLL_LOG_JS, show_progress="hidden"
        )
    return typing.cast(gr.Blocks, blocks)  # Gradio's context manager is untyped


def mount_ui(app: FastAPI, state: AppState) -> tuple[frozenset[str], tuple[str, ...]]:
    """Mount the UI at ``/ui`` behind its guard and redirect ``/`` to it; the log handler lives as long as the app.

    Returns the paths and path prefixes that answer without a Bearer key (``/``, the UI): a browser
    cannot send one, so with ``--api-key`` the UI's own login page asks for the key instead, and
    the guard lets no route that runs work answer before that login.
    """
    settings = state.settings
    logs = RecentLogHandler()
    out_dir = Path(tempfile.mkdtemp(prefix="step-audio-ui-"))
    live = shutil.which("ffmpeg") is not None
    if not live:
        logger.info("web UI: no ffmpeg program on PATH, so results play once complete (no live playback)")
    files = UploadedFiles(gr.utils.get_upload_folder(), settings.max_upload_bytes)
    blocks = build_blocks(_Ui(state=state, logs=logs, out_dir=out_dir, files=files, live=live))
    key = settings.api_key.get_secret_value() if settings.api_key else None

    def check_key(_user: str, password: str) -> bool:
        return key is not None and hmac.compare_digest(password.encode(), key.encode())

    gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        auth=check_key if key else None,
        auth_message="This server has an API key: enter it as the password (any user name).",
        allowed_paths=[],
        max_file_size=settings.max_upload_bytes,
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,  # only our own messages (gr.Error) reach the page, never an exception's text
    )
    # A mounted app never "launches", and Gradio checks that inputs come from its upload folder only
    # for launched ones: turn its own check on too (the guard and read_clip check before it).
    blocks.has_launched = True
    gradio_app = typing.cast(GradioApp, next(r.app for r in app.routes if isinstance(r, Mount) and r.path == UI_PATH))
    app.add_middleware(
        UiGuard,
        prefix=UI_PATH,
        gradio=gradio_app,
        files=files,
        max_join_bytes=_JOIN_OVERHEAD_BYTES + _JOIN_BYTES_PER_CHAR * settings.max_input_chars,
        login=key is not None,
        throttle=LoginThrottle(),
    )

    @app.get("/", include_in_schema=False)
    async def to_ui() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        logs.attach()
        try:
            async with inner(a) as value:
                yield value
        finally:
            logs.detach()
            shutil.rmtree(out_dir, ignore_errors=True)

    app.router.lifespan_context = lifespan
    return frozenset({"/", UI_PATH}), (f"{UI_PATH}/",)
