"""Health, readiness, models, edit tags, cache and metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.errors import ERROR_RESPONSES, error_response
from api.schemas import MODEL_ID, ModelCard, ModelList
from api.state import ReadyEngine, State

health_router = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], responses=ERROR_RESPONSES)  # the API key: api.admission


def model_id(variant: str) -> str:
    """``step-audio-editx`` for base, ``step-audio-editx-awq`` / ``-bnb`` for the others."""
    return MODEL_ID if variant == "base" else f"{MODEL_ID}-{variant}"


@health_router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process serves (never waits on models or inference)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "models still loading or failed"}})
async def readyz(state: State) -> JSONResponse:
    if state.engine is not None:
        return JSONResponse({"status": "ready", "variants": list(state.engine.variants)})
    if state.load_error is not None:
        return error_response(503, f"the models failed to load: {state.load_error}", code="model_load_failed")
    return error_response(503, f"loading ({state.loading_stage})", code="not_ready")


@router.get("/v1/models")
async def list_models(state: State, engine: ReadyEngine) -> ModelList:
    created = int(state.ready_at or time.time())
    return ModelList(data=[ModelCard(id=model_id(v), created=created) for v in engine.variants])


@router.get("/v1/tags")
async def list_tags(engine: ReadyEngine) -> dict[str, list[str]]:
    """Edit options per mode (``step_audio.edit_info``); paralinguistic lists its inline tags."""
    return engine.tags()


@router.get("/v1/cache/stats")
async def cache_stats(engine: ReadyEngine) -> dict[str, Any]:
    return await run_in_threadpool(engine.cache_stats)


@router.delete("/v1/cache")
async def clear_cache(engine: ReadyEngine) -> dict[str, Any]:
    await run_in_threadpool(engine.clear_cache)
    return {"cleared": True, "stats": await run_in_threadpool(engine.cache_stats)}


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    data = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
