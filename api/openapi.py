"""The OpenAPI document, made to tell the truth about the answers the server gives.

FastAPI declares a 422 (``HTTPValidationError``) on every route with parameters; this server
answers validation errors with 400 in OpenAI's envelope (``api.errors``), so the 422 and its
schemas are dropped. A route that reads its JSON body itself (``api.json_body``, to parse it off
the event loop) declares the body's model with ``@json_body(Model)``: the document shows it as
FastAPI would have. Everything else the routes declare themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_REF = "#/components/schemas/{model}"

F = TypeVar("F", bound=Callable[..., Any])


def json_body(model: type[BaseModel]) -> Callable[[F], F]:
    """Mark a route that reads a JSON body of ``model`` itself, so the document still declares it."""

    def mark(endpoint: F) -> F:
        endpoint.json_body_model = model  # type: ignore[attr-defined]
        return endpoint

    return mark


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
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in _FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)
        _declare_json_bodies(app, doc, schemas)
        app.openapi_schema = doc
    return app.openapi_schema


def _declare_json_bodies(app: FastAPI, doc: dict[str, Any], schemas: dict[str, Any]) -> None:
    for route in iter_route_contexts(app.routes):
        model = getattr(route.endpoint, "json_body_model", None)
        if model is None or route.path_format is None or not getattr(route, "include_in_schema", True):
            continue
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        body = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
        for method in route.methods or ():
            operation = doc["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                operation["requestBody"] = body
