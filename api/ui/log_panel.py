"""The server log under every tab: the in-memory ring of the server's last log lines, newest last.

A timer reads the ring every second while the page is open (also while a request runs) and sends
the lines only when the ring changed since this page last read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from api.ui.controls import EVENT
from api.ui.session import Ui

LOG_POLL_S = 1.0
LOG_PANEL_LINES = 200
# Gradio's textbox keeps its scroll position on updates; the panel follows the newest line instead
_SCROLL_LOG_JS = (
    "() => { const t = document.querySelector('#server-log textarea'); if (t) t.scrollTop = t.scrollHeight; }"
)


@dataclass(frozen=True)
class LogPanel:
    box: gr.Textbox
    timer: gr.Timer


def layout() -> LogPanel:
    """The panel, laid out in place (below the page's tabs)."""
    with gr.Accordion("Server log (newest last)", open=True):
        box = gr.Textbox(
            show_label=False, lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="server-log"
        )
    return LogPanel(box, gr.Timer(LOG_POLL_S))


def wire(panel: LogPanel, ui: Ui) -> None:
    seen = gr.State(-1)  # the ring's version this page shows

    async def log_tick(shown: int) -> tuple[Any, int]:
        version = ui.logs.version
        if version == shown:
            return gr.skip(), shown
        return "\n".join(ui.logs.lines()[-LOG_PANEL_LINES:]), version

    panel.timer.tick(log_tick, inputs=seen, outputs=[panel.box, seen], show_progress="hidden", **EVENT).then(
        None, js=_SCROLL_LOG_JS, show_progress="hidden"
    )
