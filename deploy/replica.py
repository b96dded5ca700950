"""One Serve replica: the whole single-server app, with its own engine, behind Serve's proxy.

A replica is ``api.app.create_app(settings)`` unchanged: its own models on its GPU, its own
continuous batching, its own inference queue and 429, its own local cache level. What Serve
adds is the process around it: Serve starts the replica, routes requests to it, checks its
health and replaces it when it dies. This class adds only what being one of several needs:

* **ready only when loaded**: the app loads its models on a thread after binding; here its
  start-up (Serve runs the app's lifespan inside the replica) waits until the engine is there,
  so the replica stays STARTING, and gets no traffic, until it can answer; a failed load fails
  the start (Serve retries it) and a later ``load_error`` fails the health check;
* **which replica answered**: ``X-Step-Audio-Replica`` on every HTTP response;
* **its own metrics and probes** on a side port (``deploy.sideport``);
* **its own cache directory** when asked (``replica_cache_dirs``), as separate hosts have;
* for the web UI application, mounted by Serve at ``/ui``: the request's path is kept whole and
  Serve's ``root_path`` dropped, so the app routes exactly as it does alone (Gradio at ``/ui``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from api.middleware import HeaderMiddleware
from api.state import AppState
from deploy.options import AppArgs
from deploy.sideport import SidePort
from settings import Settings

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Step-Audio-Replica"
LOAD_POLL_S = 0.1


class WholePathMiddleware:
    """Routes as the app alone does: Serve strips nothing from the path but sets ``root_path`` to
    the application's route prefix, which Starlette would strip a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


@serve.deployment(name="StepAudio")
@serve.ingress()
class StepAudioReplica:
    """``args``: ``deploy.options.AppArgs`` as a dict (what a Serve config file's ``args`` hold)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        self.rank = context.rank
        self.state: AppState | None = None
        self.side: SidePort | None = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Called by Serve after ``__init__``: the app this replica serves."""
        options = self.args.replica
        settings = self.args.settings()
        if options.replica_cache_dirs:
            settings = settings.model_copy(update={"cache_dir": settings.cache_dir / f"replica-{self.rank.rank}"})
        app = _factory(options.app_factory)(settings)
        state: AppState = app.state.step_audio
        self.state = state
        if options.metrics_port:
            self.side = SidePort(state, self.replica, settings.api_host, options.metrics_port + self.rank.local_rank)
            self.side.start()
        _start_when_loaded(app, state, self.side)
        app.add_middleware(HeaderMiddleware, name=REPLICA_HEADER, value=self.replica)
        if settings.ui:
            app.add_middleware(WholePathMiddleware)
        elif self.args.ui_route:
            _redirect_root(app, self.args.ui_route)
        logger.info("replica %s (rank %s) built; loading the models", self.replica, self.rank.rank)
        return app

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine failed is replaced."""
        if self.state is not None and self.state.load_error is not None:
            raise RuntimeError(f"the models failed to load: {self.state.load_error}")


def _factory(path: str) -> Callable[[Settings], FastAPI]:
    module, _, name = path.partition(":")
    return cast(Callable[[Settings], FastAPI], getattr(importlib.import_module(module), name))


def _start_when_loaded(app: FastAPI, state: AppState, side: SidePort | None) -> None:
    """The app's start-up ends when its engine is loaded (Serve marks the replica RUNNING then)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as value:
            while state.engine is None:
                if state.load_error is not None:
                    raise RuntimeError(f"the models failed to load: {state.load_error}")
                await asyncio.sleep(LOAD_POLL_S)
            try:
                yield value
            finally:
                if side is not None:
                    side.stop()

    app.router.lifespan_context = lifespan


def _redirect_root(app: FastAPI, ui_route: str) -> None:
    """``/`` of the speech API sends a browser to the UI application, as the single server does."""

    @app.get("/", include_in_schema=False)
    async def to_ui() -> RedirectResponse:
        return RedirectResponse(f"{ui_route.rstrip('/')}/")
