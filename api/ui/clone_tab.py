"""The Clone tab: a clip (or a voice) speaks the text, playing while it is made."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import gradio as gr
from starlette.concurrency import run_in_threadpool

from api.schemas import MODEL_ID
from api.ui.controls import EVENT, RunControls, run_controls, run_options, summary, to_players
from api.ui.errors import guarded, guarded_stream
from api.ui.session import Spoken, Ui


@dataclass(frozen=True)
class CloneTab:
    clip: gr.Audio
    voice: gr.Dropdown
    transcript: gr.Textbox
    transcribe: gr.Button
    text: gr.Textbox
    controls: RunControls
    out: gr.Audio
    info: gr.Markdown


def layout(ui: Ui, variants: list[str]) -> CloneTab:
    """The tab's controls, laid out in place (inside the page's ``gr.Tabs``)."""
    with gr.Tab("Clone", id="clone", elem_id="tab-clone"), gr.Row():
        with gr.Column():
            clip = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="Reference clip (upload or record; overrides the voice)",
                elem_id="clone-clip",
            )
            voice = gr.Dropdown(
                choices=["default"], value="default", label="Voice (used when no clip is given)", elem_id="clone-voice"
            )
            with gr.Row():
                transcript = gr.Textbox(
                    label="Transcript of the clip (empty: the voice's own, or Whisper when on)",
                    lines=2,
                    scale=4,
                    elem_id="clone-transcript",
                )
                transcribe = gr.Button("Transcribe", visible=False, scale=1, elem_id="clone-transcribe")
            text = gr.Textbox(label="Text to speak", lines=3, elem_id="clone-text")
        with gr.Column():
            controls = run_controls(ui, "clone", variants, run_label="Generate", live_label="Live playback")
            out = gr.Audio(
                label="Output", type="filepath", interactive=False, buttons=["download"], elem_id="clone-out"
            )
            info = gr.Markdown(elem_id="clone-info")
    return CloneTab(clip, voice, transcript, transcribe, text, controls, out, info)


def wire(tab: CloneTab, ui: Ui, last_output: gr.State) -> gr.events.Dependency:
    """The tab's handlers; returns the run event (the page refreshes the cache panel after it)."""

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
                "prompt_text": (transcript or "").strip() or None,
                **run_options(variant, intensity, seed),
            },
        }

        async def finish(step: Spoken) -> tuple[Any, ...]:
            result = step.result
            path = await run_in_threadpool(ui.write_audio, result.audio, result.sample_rate, fmt, "clone")
            return gr.skip(), path, summary(result, step.wait_s, step.run_s, variant=step.job.variant), path

        players = to_players(ui, body, uploads, progress, others=3, finish=finish, progress_at=1)
        async with contextlib.aclosing(players) as updates:
            async for update in updates:
                yield update

    tab.transcribe.click(guarded(ui.transcribe_clip), inputs=tab.clip, outputs=tab.transcript, **EVENT)
    return tab.controls.run.click(
        guarded_stream(clone),
        inputs=[tab.clip, tab.voice, tab.transcript, tab.text, *tab.controls.inputs],
        outputs=[tab.controls.live, tab.out, tab.info, last_output],
        **EVENT,
    )
