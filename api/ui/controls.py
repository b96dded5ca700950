"""The controls a run shares in the Clone and Edit tabs, and how a run reaches its players.

Both tabs end in the same column: intensity, model variant, seed and format, the run button, and
the live player; both send those as the same ``step_audio`` fields, stream into the live player
while the engine makes the audio, and then fill their own outputs. Built once here, so the two
tabs cannot drift apart.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.components import Component

from api.ui.session import SegmentSpoken, Spoken, Ui
from engine.types import SynthesisResult
from llm.sampling import MAX_INTENSITY, MIN_INTENSITY
from settings import ResponseFormat

# pcm is raw samples without a header: a browser cannot play it (the HTTP API serves it)
UI_FORMATS = [f for f in typing.get_args(ResponseFormat) if f != "pcm"]
# concurrency_limit=None on every event: the service's queue is the one gate, not Gradio's.
# private: only the page runs its events (no Gradio API or API docs; programs use /v1).
EVENT: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}


@dataclass(frozen=True)
class RunControls:
    """A tab's run column: what its request takes besides its own inputs, its button, its live player."""

    intensity: gr.Slider
    variant: gr.Radio
    seed: gr.Textbox
    format: gr.Dropdown
    run: gr.Button
    live: gr.Audio

    @property
    def inputs(self) -> list[Component]:
        """The handler's last four inputs, in its parameters' order: variant, intensity, seed, format."""
        return [self.variant, self.intensity, self.seed, self.format]


def run_controls(ui: Ui, prefix: str, variants: list[str], *, run_label: str, live_label: str) -> RunControls:
    """The run column's controls, laid out in place; their ``elem_id`` is ``{prefix}-intensity`` and so on."""
    intensity = gr.Slider(
        MIN_INTENSITY, MAX_INTENSITY, value=1.0, step=0.1, label="Intensity", elem_id=f"{prefix}-intensity"
    )
    variant = gr.Radio(variants, value=variants[0], label="Model variant", elem_id=f"{prefix}-variant")
    with gr.Row():
        seed = gr.Textbox(label="Seed (empty: random)", elem_id=f"{prefix}-seed")
        fmt = gr.Dropdown(UI_FORMATS, value="wav", label="Format", elem_id=f"{prefix}-format")
    run = gr.Button(run_label, variant="primary", elem_id=f"{prefix}-run")
    live = live_player(ui, f"{prefix}-live", label=live_label)
    return RunControls(intensity, variant, seed, fmt, run, live)


def live_player(ui: Ui, elem_id: str, *, label: str) -> gr.Audio:
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


def run_options(variant: str, intensity: float, seed: str | None) -> dict[str, Any]:
    """The ``step_audio`` fields the run column sets. An empty seed means random; anything else goes to
    the request model, which checks it like the API does."""
    return {"model_variant": variant, "intensity": intensity, "seed": (seed or "").strip() or None}


async def to_players(
    ui: Ui,
    body: dict[str, Any],
    uploads: dict[str, bytes],
    progress: gr.Progress,
    *,
    others: int,
    finish: Callable[[Spoken], Awaitable[tuple[Any, ...]]],
    progress_at: int | None = None,
) -> AsyncGenerator[tuple[Any, ...], None]:
    """Run the request: each live chunk to the live player (the ``others`` outputs left as they are),
    each finished text segment as a progress line in output ``progress_at`` of the others, then what
    ``finish`` makes of the finished run. ``aclosing``: when the page leaves, closing this closes the
    request at once (``Ui.speak``)."""
    async with contextlib.aclosing(ui.speak(body, uploads, progress)) as steps:
        async for step in steps:
            if isinstance(step, Spoken):
                yield await finish(step)
            elif isinstance(step, SegmentSpoken):
                if progress_at is not None:
                    rest: list[Any] = [gr.skip()] * others
                    rest[progress_at] = step.line()
                    yield (gr.skip(), *rest)
            else:
                yield (step, *[gr.skip()] * others)


def summary(result: SynthesisResult, wait_s: float, run_s: float, *, variant: str) -> str:
    """The line under a result: what was used (the seed above all, to repeat it) and what it took."""
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
    if len(result.segments) > 1:
        parts.append(f"**segments** {len(result.segments)}")
    if result.cut_short:
        parts.append("**cut short** (a generation reached the length limit)")
    if result.transcript is not None:
        parts.append(f"**transcript** {result.transcript}")
    return " · ".join(parts)
