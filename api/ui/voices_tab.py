"""The Voices tab: the voice store the API serves (``/v1/voices``): list, register, play, delete.

Registration goes through the route's own function (the clip tokenized once, as ``POST
/v1/voices`` does); a registered voice appears in the Clone tab's voice list.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
from starlette.concurrency import run_in_threadpool

from api.routes.voices import add_voice, list_voices
from api.ui.controls import EVENT
from api.ui.errors import guarded
from api.ui.session import Ui


@dataclass(frozen=True)
class VoicesTab:
    table: gr.Dataframe
    name: gr.Textbox
    clip: gr.Audio
    transcript: gr.Textbox
    register: gr.Button
    pick: gr.Dropdown
    play: gr.Button
    delete: gr.Button
    audio: gr.Audio
    message: gr.Markdown


def layout() -> VoicesTab:
    """The tab's controls, laid out in place (inside the page's ``gr.Tabs``)."""
    with gr.Tab("Voices", id="voices", elem_id="tab-voices"):
        table = gr.Dataframe(
            headers=["voice", "source", "seconds", "transcript"],
            interactive=False,
            label="Voices",
            elem_id="voices-table",
        )
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Name (letters, digits, - and _)", elem_id="voice-name")
                clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="voice-clip")
                transcript = gr.Textbox(label="Transcript of the clip", lines=2, elem_id="voice-transcript")
                register = gr.Button("Register", variant="primary", elem_id="voice-register")
            with gr.Column():
                pick = gr.Dropdown([], label="Voice", elem_id="voice-pick")
                with gr.Row():
                    play = gr.Button("Play", elem_id="voice-play")
                    delete = gr.Button("Delete", variant="stop", elem_id="voice-delete")
                audio = gr.Audio(label="Clip", type="filepath", interactive=False, elem_id="voice-audio")
                message = gr.Markdown(elem_id="voice-message")
    return VoicesTab(table, name, clip, transcript, register, pick, play, delete, audio, message)


async def view(ui: Ui) -> tuple[Any, Any, Any]:
    """Updates of the voices table, the voice to play or delete, and the Clone tab's voice list."""
    cards = (await list_voices(ui.state)).data
    rows = [[c.id, c.source, c.seconds, c.transcript] for c in cards]
    registered = [c.id for c in cards if c.source == "registered"]
    names = ["default", *registered] if ui.state.voices.default_voice is not None else registered
    return (
        gr.update(value=rows),
        gr.update(choices=[c.id for c in cards], value=None),
        gr.update(choices=names, value=names[0] if names else None),
    )


def wire(tab: VoicesTab, ui: Ui, clone_voice: gr.Dropdown) -> None:
    """The tab's handlers; a change of the store also updates the Clone tab's voice list."""
    voice_outputs = [tab.table, tab.pick, clone_voice]

    async def register(name: str | None, clip: str | None, transcript: str | None) -> tuple[Any, ...]:
        data = await ui.read_clip(clip, "file")
        if data is None:
            raise gr.Error("give the voice's clip (upload or record)")
        voice = await add_voice(ui.state, ui.engine(), (name or "").strip(), data, transcript)
        return (f"Registered **{voice.name}** ({voice.seconds:.1f} s): {voice.transcript}", *(await view(ui)))

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
        return (f"Deleted **{name}**.", *(await view(ui)))

    inputs = [tab.name, tab.clip, tab.transcript]
    tab.register.click(guarded(register), inputs=inputs, outputs=[tab.message, *voice_outputs], **EVENT)
    tab.play.click(guarded(play), inputs=tab.pick, outputs=tab.audio, **EVENT)
    tab.delete.click(guarded(delete), inputs=tab.pick, outputs=[tab.message, *voice_outputs], **EVENT)
