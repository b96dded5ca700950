"""The app factory: ``create_app(settings)`` binds at once and loads the models in the background.

``/healthz`` answers as soon as the process serves; ``/readyz`` (and every route that needs
the engine) answers 503 until the loader thread has built the engine. In demo mode the loader
first writes the tiny random-weight bundle under ``<cache_dir>/demo-bundle`` and every
response carries ``X-Step-Audio-Demo`` saying the audio is noise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from api.admission import OPEN_PATHS, AdmissionMiddleware
from api.demo import DEMO_HEADER, DEMO_NOTICE, demo_settings
from api.errors import install_error_handlers
from api.limits import body_limit
from api.metrics import Metrics
from api.middleware import HeadAsGetMiddleware, HeaderMiddleware
from api.openapi import contract_openapi
from api.routes import audio_voices, speech, speech_stream, system, voices
from api.state import AppState, Engine
from engine.service import InferenceService
from engine.voices import DEFAULT_VOICE_NAME, Voice, VoiceStore
from fsutil import probe_writable
from object_store import ObjectStore, StoreError, open_store
from settings import Settings

logger = logging.getLogger(__name__)


EngineFactory = Callable[[Settings], Engine]


def create_app(settings: Settings, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """A new app around ``settings``; ``engine_factory`` defaults to ``engine.build.build_engine``."""
    voices_dir = settings.voices_dir or settings.cache_dir / "voices"
    check_storage(settings, voices_dir)
    voice_store = open_voice_store(settings, voices_dir)
    service = InferenceService(queue_size=settings.queue_size, workers=settings.inference_workers)
    state = AppState(
        settings=settings,
        service=service,
        voices=VoiceStore(voice_store),
        metrics=Metrics(lambda: live_values(state)),
        started_at=time.time(),
    )
    # with an API key the schema is served behind it (below) and the browser UIs are off
    hidden: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None} if settings.api_key else {}
    app = FastAPI(
        title="Step-Audio-EditX speech server",
        version="1.0",
        description="OpenAI-compatible voice cloning and speech editing with Step-Audio-EditX.",
        lifespan=_lifespan(state, engine_factory),
        **hidden,
    )
    app.state.step_audio = state
    install_error_handlers(app)
    routers = (system.health_router, system.router, speech.router, speech_stream.router, voices.router)
    for router in (*routers, audio_voices.router):
        app.include_router(router)
    app.openapi = lambda: contract_openapi(app)  # type: ignore[method-assign]
    ui_open: tuple[frozenset[str], tuple[str, ...]] = (frozenset(), ())
    if settings.ui:
        from api.ui import mount_ui  # Gradio loads only when the UI is on

        ui_open = mount_ui(app, state)
    if settings.api_key:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

    _add_middlewares(app, state, ui_open)
    return app


def _lifespan(state: AppState, factory: EngineFactory | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Workers up and the models loading in the background at start; at stop the decode loops end
    first (running generations fail at once), then the workers are joined."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.service.start()
        loader = threading.Thread(target=_load_engine, args=(state, factory), name="model-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            if state.engine is not None:
                state.engine.close()
            state.service.stop()

    return lifespan


def _add_middlewares(app: FastAPI, state: AppState, ui_open: tuple[frozenset[str], tuple[str, ...]]) -> None:
    """Admission (key, queue room, body size) in front of every route; HEAD as GET inside it."""
    settings = state.settings
    queued = frozenset(
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        if route.path is not None and getattr(route.endpoint, "queues_a_job", False)
        for method in route.methods or ()
    )
    # innermost: the key, the queue and the body limits are decided on the request as it came
    app.add_middleware(HeadAsGetMiddleware, skip_paths=ui_open[0], skip_prefixes=ui_open[1])
    app.add_middleware(
        AdmissionMiddleware,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        # the web UI cannot send a Bearer header: with a key it asks for it on its own login page
        open_paths=OPEN_PATHS | ui_open[0],
        open_prefixes=ui_open[1],
        service=state.service,
        queued_routes=queued,
        # the largest valid request fits (one base64 clip, every text at its limit); more is refused unread
        max_body_bytes=body_limit(settings),
        max_file_bytes=settings.max_upload_bytes,
    )
    if settings.demo:
        app.add_middleware(HeaderMiddleware, name=DEMO_HEADER, value=DEMO_NOTICE)


def live_values(state: AppState) -> dict[str, Any]:
    """The gauges read when Prometheus scrapes: queue, running jobs, readiness, the cache's totals."""
    service = state.service
    values: dict[str, Any] = {
        "step_audio_queue_depth": ("Requests waiting for a worker.", service.queued),
        "step_audio_requests_running": ("Requests being computed.", service.running),
        "step_audio_ready": ("1 once the models are loaded.", int(state.engine is not None)),
    }
    if state.engine is not None:
        try:
            stats = state.engine.cache_stats()
        except Exception:  # scraping never fails on the engine's bookkeeping
            stats = {}
        hits, misses = int(stats.get("hits", 0)), int(stats.get("misses", 0))
        values["step_audio_cache_hits"] = ("Token-cache hits since start.", hits)
        values["step_audio_cache_misses"] = ("Token-cache misses since start.", misses)
        values["step_audio_cache_hit_ratio"] = (
            "Token-cache hits / lookups since start.",
            hits / (hits + misses) if hits + misses else 0.0,
        )
        shared = stats.get("shared")
        if isinstance(shared, dict):  # --store-url: the level every replica shares (shared_cache)
            values["step_audio_cache_shared_hits"] = ("Prompt-cache hits in the shared store.", shared["hits"])
            values["step_audio_cache_shared_errors"] = ("Shared-store failures (skipped).", shared["errors"])
    return values


def check_storage(settings: Settings, voices_dir: Path) -> None:
    """Say at start, in one line per directory, which store cannot be written and what that means.

    A read-only or full disk is a state the server runs in (speech works, uncached), not a crash:
    the line names the directory and its setting, so the cause is found before the first 503.
    """
    voices_setting = "--voices-dir / STEP_AUDIO_VOICES_DIR" + (
        "" if settings.voices_dir else ", default <cache-dir>/voices"
    )
    checks = (
        (
            settings.cache_dir,
            "cache",
            "--cache-dir / STEP_AUDIO_CACHE_DIR",
            "speech works, but prompts are not cached and DELETE /v1/cache answers 503",
        ),
        (
            voices_dir,
            "voices",
            voices_setting,
            "the stored voices can be used, but POST and DELETE /v1/voices answer 503",
        ),
    )
    # with --store-url the voices live in the object store (open_voice_store), not in a directory
    for directory, store, setting, consequence in checks[:1] if settings.store_url else checks:
        reason = probe_writable(directory)
        if reason is not None:
            logger.warning(
                "the %s directory %s (%s) cannot be written (%s): %s", store, directory, setting, reason, consequence
            )


def open_voice_store(settings: Settings, voices_dir: Path) -> ObjectStore:
    """``--voices-dir``, or ``voices/`` in the object store of ``--store-url``; one start-up line says
    which, and whether the object store answers (a store that is down is a state the server runs in:
    speech in the default voice and clips with their transcripts work; registering answers 503)."""
    if not settings.store_url:
        return open_store(None, voices_dir)
    root = open_store(settings.store_url, voices_dir)
    store = root.child("voices")
    try:
        store.list_keys()
    except StoreError as exc:
        logger.warning(
            "the object store %s (--store-url / STEP_AUDIO_STORE_URL) is %s: speech in the default voice "
            "works, registered voices and POST /v1/voices answer 503 until it answers",
            exc.location,
            exc.reason,
        )
    else:
        logger.info("voices and the shared prompt cache live in %s", root.location)
    return store


def _load_engine(state: AppState, factory: EngineFactory | None) -> None:
    """Background loader: (demo bundle,) engine, default voice; failures land in /readyz."""
    settings = state.settings
    try:
        if settings.demo:
            state.loading_stage = "writing the demo bundle"
            settings = demo_settings(settings)
        state.loading_stage = "loading models"
        if factory is None:
            from engine.build import build_engine

            factory = build_engine
        begin = time.perf_counter()
        engine = factory(settings)
        engine.set_observer(state.metrics)  # batch size per decode step, LLM queue wait, tokens/s
        state.voices.default_voice = _default_voice(engine)
        state.engine = engine
        state.ready_at = time.time()
        state.loading_stage = "ready"
        logger.info("models loaded in %.1f s; variants: %s", time.perf_counter() - begin, ", ".join(engine.variants))
        if settings.demo:
            logger.warning("DEMO MODE: %s", DEMO_NOTICE)
    except Exception as exc:
        state.load_error = f"{exc.__class__.__name__}: {exc}"
        logger.exception("loading the models failed")


def _default_voice(engine: Engine) -> Voice | None:
    """The engine's shipped voice behind OpenAI's voice names (None when it cannot be read)."""
    try:
        audio, transcript = engine.default_voice()
    except (OSError, ValueError) as exc:
        logger.warning("the default voice could not be read (%s); OpenAI voice names will be refused", exc)
        return None
    return Voice(name=DEFAULT_VOICE_NAME, audio=audio, transcript=transcript, builtin=True)
