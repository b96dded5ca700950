"""The OpenAPI document, made to tell the truth about the answers the server gives.

FastAPI declares a 422 (``HTTPValidationError``) on every route with parameters; this server
answers validation errors with 400 in OpenAI's envelope (``api.errors``), so the 422 and its
schemas are dropped. Everything else the routes declare themselves.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def contract_openapi(app: FastAPI) -> dict[str, Any]:
    """``app.openapi`` replacement: FastAPI's document without the 422 that never comes (cached)."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for name in _FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema
