"""The one error path of the HTTP layer: typed errors to statuses, always in OpenAI's envelope.

Every response that is not a success looks like OpenAI's::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "too_large"}}

Statuses come from the error's class (never from its message text). Request validation
errors become 400, as OpenAI and vLLM answer them, except a value over a length bound the schema
states (pydantic's ``string_too_long`` / ``too_long``), which is a 413 like every other size
limit; anything unexpected is a logged 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import (
    BusyError,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    StepAudioError,
    StorageError,
    TooLargeError,
)

logger = logging.getLogger(__name__)


class UnauthorizedError(StepAudioError):
    """Missing or wrong API key (401)."""

    code = "invalid_api_key"


class InvalidJSONError(InvalidInputError):
    """A body (or the multipart ``payload``) that is not UTF-8 JSON (400)."""

    code = "invalid_json"


class UnsupportedMediaTypeError(StepAudioError):
    """A JSON route's body sent with another Content-Type (415): a browser may send text/plain
    across origins without asking first, so a JSON route reads only bodies declared as JSON."""

    code = "unsupported_media_type"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; routes declare it so the OpenAPI document shows it."""

    error: ErrorInfo


# Most specific class first: TooLargeError is an InvalidInputError.
_STATUS: tuple[tuple[type[StepAudioError], int], ...] = (
    (TooLargeError, 413),
    (InvalidInputError, 400),
    (UnauthorizedError, 401),
    (UnsupportedMediaTypeError, 415),
    (NotFoundError, 404),
    (BusyError, 429),
    (NotReadyError, 503),
    (ModelLoadError, 503),
    # a read-only or full disk: 503 rather than WebDAV's 507, which clients know less (docs/api.md)
    (StorageError, 503),
)

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}

_LOCATIONS = frozenset({"body", "query", "path", "header", "form"})
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# pydantic's error types for a value over a ``max_length`` the schema states
_TOO_LONG = frozenset({"string_too_long", "too_long", "bytes_too_long"})


def status_of(exc: StepAudioError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's envelope as a dict (also the payload of a failed stream's SSE ``error`` event)."""
    body = ErrorResponse(
        error=ErrorInfo(
            message=message,
            type=_TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            param=param,
            code=code,
        )
    )
    return body.model_dump()


def error_body_of(exc: Exception, *, name_param: Callable[[str | None], str | None] | None = None) -> dict[str, Any]:
    """The envelope for ``exc``: a domain error's status, message, code and field (renamed by
    ``name_param`` where the caller's fields have other names), anything else a 500 that says no more
    (its details are for the log, not the client)."""
    if isinstance(exc, StepAudioError):
        param = getattr(exc, "param", None)
        return error_body(status_of(exc), str(exc), code=exc.code, param=name_param(param) if name_param else param)
    return error_body(500, "internal server error", code="server_error")


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


def response_for(exc: StepAudioError) -> JSONResponse:
    """The envelope for one domain error (also used outside handlers, e.g. by middleware)."""
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, BusyError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, StorageError):  # OpenAI's clients retry every 5xx unless told; a full disk stays full
        headers["X-Should-Retry"] = "false"
    if status >= 500:
        logger.warning("%s: %s", exc.__class__.__name__, exc)
    return JSONResponse(error_body_of(exc), status_code=status, headers=headers or None)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'step_audio', 'edits', 0, 'mode') -> 'step_audio.edits[0].mode' (OpenAI names the field in `param`).

    Union members appear in pydantic's locations by their labels (``constrained-str``, ``VoiceRef``);
    field names here are snake_case, so any other part is such a label and is left out.
    """
    name = ""
    for part in loc:
        if isinstance(part, int):  # a list item: step_audio.edits[0], as the API's own errors name it
            name += f"[{part}]"
        elif _FIELD_NAME.fullmatch(str(part)) and part not in _LOCATIONS:
            name += f".{part}" if name else str(part)
    return name or None


def _by_relevance(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A union reports every member's failure; "not this type" says least, so it goes last."""
    return sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """The envelope for pydantic's errors: 413 when the first is a length bound, else 400."""
    errors = _by_relevance(errors)
    message, param = validation_message(errors)
    if errors and errors[0].get("type") in _TOO_LONG:
        return error_response(413, message, code="too_large", param=param)
    return error_response(400, message, code="invalid_value", param=param)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list, and the first offending field."""
    parts = []
    for err in errors[:5]:
        param = _loc_to_param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        parts.append(f"{param}: {msg}" if param else msg)
    first = _loc_to_param(tuple(errors[0].get("loc", ()))) if errors else None
    return "; ".join(parts) or "invalid request", first


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's 405 names only the first route's)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        pattern = getattr(route, "path_regex", None)
        if route.methods and pattern is not None and pattern.match(path):
            methods |= route.methods
    if "GET" in methods:  # served for every GET (api.app.HeadAsGetMiddleware)
        methods.add("HEAD")
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one handler per error family on ``app``."""

    @app.exception_handler(StepAudioError)
    async def _domain(_: Request, exc: StepAudioError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        return validation_response(errors)

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, exc: ValidationError) -> JSONResponse:
        # Raised by our own model_validate calls (the JSON bodies, the multipart `payload`).
        return validation_response([dict(error) for error in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code
        )
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(
            exc.status_code, str(exc.detail), code=code, param=getattr(exc, "param", None), headers=headers or None
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: %s", exc)
        return error_response(500, "internal server error", code="server_error")
