"""The page: Clone, Edit, Voices and Cache tabs above the live server log, composed from their modules.

Each tab lays out its controls and wires its own handlers; what crosses tabs is wired here: the
page's load (waits for the models, then fills the variants, the Transcribe buttons, the edit
inputs and the voices), the last output that Edit can take, the cache panel refreshed after a
clone or an edit, and the Clone tab's voice list that the Voices tab keeps current.
"""

from __future__ import annotations

import asyncio
import time
import typing
from typing import Any

import gradio as gr

from api.demo import DEMO_NOTICE
from api.state import Engine
from api.ui import cache_tab, clone_tab, edit_tab, log_panel, voices_tab
from api.ui.controls import EVENT
from api.ui.errors import guarded
from api.ui.session import Ui

READY_WAIT_S = 900.0  # a page opened while the models load waits this long for them
_INTRO = (
    "# Step-Audio-EditX\nVoice cloning and speech editing. The same server answers the OpenAI-compatible "
    "API (`/v1/audio/speech`); this page goes through its queue and its checks."
)


def build_blocks(ui: Ui) -> gr.Blocks:
    """The page: Clone, Edit, Voices and Cache tabs above the live server log."""
    settings = ui.state.settings
    variants: list[str] = list(dict.fromkeys(settings.variants))

    with gr.Blocks(title="Step-Audio-EditX", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(_INTRO)
        if settings.demo:
            gr.Markdown(f"**DEMO MODE:** {DEMO_NOTICE}.", elem_id="demo-banner")
        status = gr.Markdown("Waiting for the models to load ...", elem_id="server-status")
        last_output = gr.State(None)
        with gr.Tabs():
            clone = clone_tab.layout(ui, variants)
            edit = edit_tab.layout(ui, variants, settings.max_edit_iter)
            voices = voices_tab.layout()
            cache = cache_tab.layout()
        log = log_panel.layout()

        async def on_load() -> tuple[Any, ...]:
            engine = await _ready(ui)
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
                *edit_tab.mode_controls(ui, "emotion"),
                *(await voices_tab.view(ui)),
            )

        blocks.load(
            guarded(on_load),
            outputs=[
                status,
                clone.controls.variant,
                edit.controls.variant,
                clone.transcribe,
                edit.transcribe,
                *edit.mode_extras,
                voices.table,
                voices.pick,
                clone.voice,
            ],
            **EVENT,
        )
        cache_tab.refresh_after(clone_tab.wire(clone, ui, last_output), cache, ui)
        cache_tab.refresh_after(edit_tab.wire(edit, ui, last_output), cache, ui)
        voices_tab.wire(voices, ui, clone.voice)
        cache_tab.wire(cache, ui)
        log_panel.wire(log, ui)
    return typing.cast(gr.Blocks, blocks)  # Gradio's context manager is untyped


async def _ready(ui: Ui) -> Engine:
    """The engine once loaded; the API's 503 message when loading failed or took too long."""
    deadline = time.monotonic() + READY_WAIT_S
    while ui.state.engine is None and ui.state.load_error is None and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return ui.engine()
