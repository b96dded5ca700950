"""JSON request bodies: parsed off the event loop, and held to UTF-8.

FastAPI parses a declared body on the event loop (``json.loads``, then validation); a body near
the limit (``api.limits``) keeps the loop busy long enough to stall every other request,
``/healthz`` included. The JSON route therefore reads the bytes (counted by ``api.admission``) and
parses them in a worker thread here.

JSON must be UTF-8 (RFC 8259 §8.1), but ``json.loads`` given bytes guesses UTF-16 or UTF-32 from
the first bytes and accepts them. A body that is not UTF-8 is decoded with each bad byte as a lone
surrogate (``surrogateescape``), so the validator every text field has (``api.schemas.unicode_text``)
names the field that holds it; bad bytes where no text field is (a key, an ignored field) fail the
body as a whole.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.errors import InvalidJSONError, UnsupportedMediaTypeError

M = TypeVar("M", bound=BaseModel)

_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json`` (parameters such as charset ignored)."""
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def read_json(request: Request, model: type[M]) -> M:
    """The request's body as ``model``: a JSON Content-Type is required, the parse runs in a thread."""
    content_type = request.headers.get("content-type", "")
    if not is_json_media_type(content_type):
        raise UnsupportedMediaTypeError(
            f"the body must be JSON sent as Content-Type: application/json (got {content_type or 'none'!r})"
        )
    data = await request.body()
    return await run_in_threadpool(parse_json, data, model)


def parse_json(data: bytes | str, model: type[M], *, what: str = "the request body", param: str | None = None) -> M:
    """``data`` as ``model``; ``InvalidJSONError`` (naming ``param``) when it is not UTF-8 JSON, pydantic's
    ``ValidationError`` (naming the field) when a value is wrong. Blocking: call it in a thread."""
    if isinstance(data, bytes):
        # RFC 4627 §3: how UTF-16/32 JSON begins (a BOM, or NULs beside the first ASCII characters,
        # which UTF-8 decoding would accept); UTF-8 JSON never starts with a NUL
        if data.startswith(_UTF16_32_BOMS) or b"\x00" in data[:4]:
            raise InvalidJSONError(f"{what} is UTF-16 or UTF-32; send JSON encoded as UTF-8", param=param)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            _parse_not_utf8(data, exc, model, what=what, param=param)
    else:
        text = data
    return model.model_validate(_loads(text, what=what, param=param))


def _loads(text: str, *, what: str, param: str | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJSONError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos})", param=param) from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's stack
        raise InvalidJSONError(f"{what} is nested too deeply", param=param) from None


def _parse_not_utf8(
    data: bytes, error: UnicodeDecodeError, model: type[BaseModel], *, what: str, param: str | None
) -> NoReturn:
    value = _loads(data.decode("utf-8", "surrogateescape"), what=what, param=param)
    model.model_validate(value)  # raises naming the text field that holds the bad bytes
    raise InvalidJSONError(f"{what} is not valid UTF-8 (byte {error.start})", param=param)
