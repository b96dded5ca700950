"""The Edit tab: one edit (with its iterations) of an uploaded, recorded or last output's audio.

Every iteration appears in its own player with a download button; only the last one plays while
it is made (the earlier ones are its input). The mode decides which of its inputs show: the
``edit_info`` choices (the lists ``GET /v1/tags`` returns), the tagged transcript of a
paralinguistic edit, the transcript of the audio.
"""

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
from engine import chains
from engine.types import EDIT_MODES, EditStep


def takes_edit_info(mode: str, tags: dict[str, list[str]]) -> bool:
    """Whether ``mode``'s list in ``/v1/tags`` is its ``edit_info`` choices (paralinguistic's are inline tags)."""
    return mode != "paralinguistic" and bool(tags.get(mode))


def needs_audio_text(mode: str) -> bool:
    """Whether an edit in ``mode`` needs the transcript of its audio (the engine's rule)."""
    return chains.needs_transcript([EditStep(mode=mode)])  # type: ignore[arg-type]


@dataclass(frozen=True)
class EditTab:
    audio: gr.Audio
    use_last: gr.Button
    mode: gr.Dropdown
    info: gr.Dropdown
    tagged: gr.Textbox
    transcript: gr.Textbox
    transcribe: gr.Button
    iterations: gr.Slider
    controls: RunControls
    outs: list[gr.Audio]
    result: gr.Markdown

    @property
    def mode_extras(self) -> list[gr.components.Component]:
        """The inputs the mode shows or hides (``mode_controls``'s outputs)."""
        return [self.info, self.tagged, self.transcript]


def layout(ui: Ui, variants: list[str], max_iter: int) -> EditTab:
    """The tab's controls, laid out in place (inside the page's ``gr.Tabs``)."""
    with gr.Tab("Edit", id="edit", elem_id="tab-edit"), gr.Row():
        with gr.Column():
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="Audio to edit (upload, record, or use the last output)",
                elem_id="edit-audio",
            )
            use_last = gr.Button("Use the last output", size="sm", elem_id="edit-use-last")
            mode = gr.Dropdown(list(EDIT_MODES), value="emotion", label="Mode", elem_id="edit-mode")
            info = gr.Dropdown([], label="Edit option (edit_info)", elem_id="edit-info")
            tagged = gr.Textbox(label="Transcript with inline tags", visible=False, lines=2, elem_id="edit-tagged")
            with gr.Row():
                transcript = gr.Textbox(label="Transcript of the audio", lines=2, scale=4, elem_id="edit-transcript")
                transcribe = gr.Button("Transcribe", visible=False, scale=1, elem_id="edit-transcribe")
        with gr.Column():
            iterations = gr.Slider(1, max_iter, value=1, step=1, label="Edit iterations", elem_id="edit-iter")
            controls = run_controls(
                ui, "edit", variants, run_label="Edit", live_label="Live playback of the last iteration"
            )
            outs = [
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
            result = gr.Markdown(elem_id="edit-result")
    return EditTab(audio, use_last, mode, info, tagged, transcript, transcribe, iterations, controls, outs, result)


def mode_controls(ui: Ui, mode: str) -> tuple[Any, Any, Any]:
    """Updates of the inputs ``mode`` takes: its ``edit_info`` choices, the tagged transcript, the transcript."""
    tags = ui.state.engine.tags() if ui.state.engine is not None else {}
    options = tags.get(mode, [])
    info = gr.update(choices=options, value=options[0] if options else None, visible=takes_edit_info(mode, tags))
    tagged = gr.update(
        visible=mode == "paralinguistic",
        info="Tags: " + " ".join(f"[{t}]" for t in tags.get("paralinguistic", [])),
    )
    transcript = gr.update(visible=needs_audio_text(mode))
    return info, tagged, transcript


def _body(
    ui: Ui,
    mode: str,
    edit_info: str | None,
    tagged: str | None,
    transcript: str | None,
    *,
    n_iter: float,
    fmt: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """An edit's request body. Only the inputs its mode shows count: a hidden one keeps whatever the
    page last had in it."""
    return {
        "model": MODEL_ID,
        "input": (tagged or "") if mode == "paralinguistic" else "",
        "response_format": fmt,
        "step_audio": {
            "mode": mode,
            "edit_info": edit_info if takes_edit_info(mode, ui.engine().tags()) else None,
            "audio_text": ((transcript or "").strip() or None) if needs_audio_text(mode) else None,
            "n_edit_iter": int(n_iter),
            **options,
        },
    }


def wire(tab: EditTab, ui: Ui, last_output: gr.State) -> gr.events.Dependency:
    """The tab's handlers; returns the run event (the page refreshes the cache panel after it)."""
    max_iter = len(tab.outs)

    async def edit(  # noqa: PLR0917  # Gradio passes the inputs positionally
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
        progress: gr.Progress = gr.Progress(),  # noqa: B008  # Gradio's documented idiom
    ) -> AsyncGenerator[tuple[Any, ...], None]:
        """Edit: every iteration's audio is shown and downloadable; the last one is the result."""
        data = await ui.read_clip(audio, "input_audio_file")
        options = run_options(variant, intensity, seed)
        body = _body(ui, mode, edit_info, tagged, transcript, n_iter=n_iter, fmt=fmt, options=options)

        async def finish(step: Spoken) -> tuple[Any, ...]:
            result = step.result
            paths = [
                await run_in_threadpool(ui.write_audio, it, result.sample_rate, fmt, f"{mode}-iter{i + 1}")
                for i, it in enumerate(result.iterations or [result.audio])
            ]
            outs = [
                gr.update(value=paths[i], visible=True) if i < len(paths) else gr.update(value=None, visible=False)
                for i in range(max_iter)
            ]
            done = summary(result, step.wait_s, step.run_s, variant=step.job.variant)
            return (gr.skip(), *outs, f"**iterations** {len(paths)} · {done}", paths[-1])

        uploads = {"input_audio": data} if data else {}
        players = to_players(ui, body, uploads, progress, others=max_iter + 2, finish=finish)
        async with contextlib.aclosing(players) as updates:
            async for update in updates:
                yield update

    async def use_last(last: str | None) -> str:
        if not last:
            raise gr.Error("no output yet: clone or edit something first")
        return last

    def edit_controls(mode: str) -> tuple[Any, Any, Any]:
        return mode_controls(ui, mode)

    tab.mode.change(edit_controls, inputs=tab.mode, outputs=tab.mode_extras, **EVENT)
    tab.use_last.click(guarded(use_last), inputs=last_output, outputs=tab.audio, **EVENT)
    tab.transcribe.click(guarded(ui.transcribe_clip), inputs=tab.audio, outputs=tab.transcript, **EVENT)
    return tab.controls.run.click(
        guarded_stream(edit),
        inputs=[tab.audio, tab.mode, tab.info, tab.tagged, tab.transcript, tab.iterations, *tab.controls.inputs],
        outputs=[tab.controls.live, *tab.outs, tab.result, last_output],
        **EVENT,
    )
