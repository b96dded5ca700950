"""``POST /v1/audio/speech`` (JSON) and ``POST /v1/audio/speech/upload`` (multipart).

Both build one ``SpeechRequest`` and go through ``synthesize``: ``api.speech_requests`` validates
it and builds the engine request, ``api.pipeline`` runs it through the service queue, and
``api.responses`` encodes the answer (whole, chunked audio, SSE, or JSON with every iteration).
The JSON body is read as bytes and parsed in a worker thread (``api.json_body``), not by FastAPI
on the event loop.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.admission import queues_a_job
from api.audio_io import CONTENT_TYPES
from api.errors import ERROR_RESPONSES, ErrorResponse
from api.json_body import parse_json, read_json
from api.openapi import json_body
from api.responses import respond
from api.schemas import IterationsResponse, SpeechRequest
from api.speech_requests import build_counted
from api.state import AppState, Engine, ReadyEngine, State

router = APIRouter(tags=["speech"], responses=ERROR_RESPONSES)  # the API key and body limits: api.admission

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The audio in `response_format` (whole, or chunked with `stream_format: audio`); "
        "`stream_format: sse` sends `speech.audio.delta` / `speech.audio.done` events; "
        "`step_audio.return_iterations` answers JSON with every edit iteration.",
        "model": IterationsResponse,  # application/json
        "content": {
            **{ct: _BINARY for ct in sorted(set(CONTENT_TYPES.values()))},
            "text/event-stream": {"schema": {"type": "string", "description": "Server-sent events."}},
        },
    },
}


@router.post(
    "/v1/audio/speech",
    response_class=Response,
    responses={**_AUDIO_RESPONSES, 415: {"model": ErrorResponse, "description": "The body is not declared as JSON."}},
)
@queues_a_job
@json_body(SpeechRequest)
async def create_speech(request: Request, state: State, engine: ReadyEngine) -> Response:
    """OpenAI's speech endpoint: clone (default) or edit, audio given as base64, URL or voice."""
    body = await read_json(request, SpeechRequest)
    return await synthesize(request, state, engine, body, {})


@router.post("/v1/audio/speech/upload", response_class=Response, responses=_AUDIO_RESPONSES)
@queues_a_job
async def create_speech_upload(
    *,
    request: Request,
    state: State,
    engine: ReadyEngine,
    payload: Annotated[str, Form(description="The JSON body of /v1/audio/speech.")],
    prompt_audio_file: Annotated[UploadFile | None, File(description="Clone reference clip.")] = None,
    input_audio_file: Annotated[UploadFile | None, File(description="Audio to edit.")] = None,
) -> Response:
    """The same request as multipart: ``payload`` JSON plus the audio as files."""
    # the payload's bytes were checked for UTF-8 as they arrived (api.admission)
    body = await run_in_threadpool(parse_json, payload, SpeechRequest, what="payload", param="payload")
    uploads = {  # each file's size was bounded while the body streamed in (api.admission)
        name: await f.read()
        for name, f in (("prompt_audio", prompt_audio_file), ("input_audio", input_audio_file))
        if f is not None
    }
    return await synthesize(request, state, engine, body, uploads)


async def synthesize(
    request: Request, state: AppState, engine: Engine, body: SpeechRequest, uploads: dict[str, bytes]
) -> Response:
    """Build the engine request (every check before any decoding or queueing), then answer it."""
    t0 = time.perf_counter()
    job = await build_counted(state, engine, body, uploads)
    return await respond(
        request,
        state,
        engine,
        job,
        fmt=body.response_format or state.settings.default_response_format,
        stream_format=body.stream_format,
        return_iterations=body.step_audio.return_iterations,
        t0=t0,
    )
