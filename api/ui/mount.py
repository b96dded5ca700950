"""Mounting the page at ``/ui`` inside the API app, behind its guard, with the API key as its login.

The UI lives and dies with the app: its log handler is attached for the app's lifespan, its
private output folder removed at the end.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import tempfile
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.routing import Mount

from api.logs import RecentLogHandler
from api.state import AppState
from api.ui.guard import UiGuard
from api.ui.join import GradioApp
from api.ui.page import build_blocks
from api.ui.session import Ui
from api.ui.uploads import UploadedFiles

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
_JOIN_OVERHEAD_BYTES = 1 << 20  # an event's JSON beyond its texts: file references, numbers, choices
_JOIN_BYTES_PER_CHAR = 24  # a text field's character as JSON at worst (an escaped surrogate pair), a few fields


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
    blocks = build_blocks(Ui(state=state, logs=logs, out_dir=out_dir, files=files, live=live))
    key = settings.api_key.get_secret_value() if settings.api_key else None
    _mount_gradio(app, blocks, key, settings.max_upload_bytes)
    gradio_app = typing.cast(GradioApp, next(r.app for r in app.routes if isinstance(r, Mount) and r.path == UI_PATH))
    app.add_middleware(
        UiGuard,
        prefix=UI_PATH,
        gradio=gradio_app,
        files=files,
        max_join_bytes=_JOIN_OVERHEAD_BYTES + _JOIN_BYTES_PER_CHAR * settings.max_input_chars,
        login=key is not None,
    )

    @app.get("/", include_in_schema=False)
    async def to_ui() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")

    _live_with_app(app, logs, out_dir)
    return frozenset({"/", UI_PATH}), (f"{UI_PATH}/",)


def _mount_gradio(app: FastAPI, blocks: gr.Blocks, key: str | None, max_upload_bytes: int) -> None:
    """Gradio's app at ``UI_PATH``, offline, private, with the key as the login's password."""

    def check_key(_user: str, password: str) -> bool:
        return key is not None and hmac.compare_digest(password.encode(), key.encode())

    gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        auth=check_key if key else None,
        auth_message="This server has an API key: enter it as the password (any user name).",
        allowed_paths=[],
        max_file_size=max_upload_bytes,
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,  # only our own messages (gr.Error) reach the page, never an exception's text
    )
    # A mounted app never "launches", and Gradio checks that inputs come from its upload folder only
    # for launched ones: turn its own check on too (the guard and read_clip check before it).
    blocks.has_launched = True


def _live_with_app(app: FastAPI, logs: RecentLogHandler, out_dir: Path) -> None:
    """Attach the log ring for the app's lifespan; remove the output folder when it ends."""
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
