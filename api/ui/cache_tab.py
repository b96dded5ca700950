"""The Cache tab: the token cache's size and hit counts (what ``GET /v1/cache/stats`` answers), and Clear.

The panel also refreshes after each clone or edit (``refresh_after``), so a repeated clip's hit
shows at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from api.routes.system import cache_stats, clear_cache
from api.ui.controls import EVENT
from api.ui.errors import guarded
from api.ui.session import Ui


@dataclass(frozen=True)
class CacheTab:
    tab: gr.Tab
    entries: gr.Number
    bytes: gr.Number
    hits: gr.Number
    misses: gr.Number
    ratio: gr.Number
    refresh: gr.Button
    clear: gr.Button

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [self.entries, self.bytes, self.hits, self.misses, self.ratio]


def layout() -> CacheTab:
    """The tab's controls, laid out in place (inside the page's ``gr.Tabs``)."""
    with gr.Tab("Cache", id="cache", elem_id="tab-cache") as tab:
        with gr.Row():
            entries = gr.Number(label="Entries", interactive=False, elem_id="cache-entries")
            size = gr.Number(label="Bytes", interactive=False, elem_id="cache-bytes")
            hits = gr.Number(label="Hits", interactive=False, elem_id="cache-hits")
            misses = gr.Number(label="Misses", interactive=False, elem_id="cache-misses")
            ratio = gr.Number(label="Hit ratio", interactive=False, elem_id="cache-ratio")
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="cache-refresh")
            clear = gr.Button("Clear the cache", variant="stop", elem_id="cache-clear")
        gr.Markdown("Hits and misses count since the server started; entries and bytes are on disk.")
    return CacheTab(tab, entries, size, hits, misses, ratio, refresh, clear)


def viewer(ui: Ui) -> Callable[[], Awaitable[tuple[Any, ...]]]:
    """The handler that reads the cache's numbers (an event's function: Gradio reads its signature)."""

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

    return cache_view


def wire(tab: CacheTab, ui: Ui) -> None:
    view = viewer(ui)

    async def clear() -> tuple[Any, ...]:
        await clear_cache(ui.engine())
        return await view()

    tab.tab.select(guarded(view), outputs=tab.outputs, show_progress="minimal", **EVENT)
    tab.refresh.click(guarded(view), outputs=tab.outputs, show_progress="minimal", **EVENT)
    tab.clear.click(guarded(clear), outputs=tab.outputs, **EVENT)


def refresh_after(event: gr.events.Dependency, tab: CacheTab, ui: Ui) -> None:
    """Refresh the panel once ``event`` (a clone or an edit) has succeeded."""
    event.success(guarded(viewer(ui)), outputs=tab.outputs, show_progress="hidden", **EVENT)
