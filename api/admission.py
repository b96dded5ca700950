"""What is decided about a request before its body is read: key, queue room, size.

One ASGI middleware answers, in this order and without reading a byte of the body:

1. 401 when the server has an API key and the request does not carry it (every path but
   ``OPEN_PATHS``), so a stranger's upload is never received and a malformed body cannot
   turn the 401 into a 400;
2. 429 + ``Retry-After`` on a route that queues a job (``@queues_a_job``) while the queue is
   full, so a refused request costs no JSON parsing or audio decoding;
3. 413 when ``Content-Length`` passes the body limit.

Then the body is counted while the route reads it: past the body limit (a chunked body has no
``Content-Length``), or past the per-file limit inside one multipart file part, the read fails
with 413 at once instead of spooling the rest. A multipart text part (``payload``, a voice's
``name`` and ``transcript``) that is not UTF-8 fails the read with 400 naming the part: the form
parser would otherwise decode it as Latin-1 and hand the route mojibake that looks like text.
"""

from __future__ import annotations

import codecs
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import UnauthorizedError, error_response, response_for
from engine.service import InferenceService
from errors import BusyError

OPEN_PATHS = frozenset({"/healthz"})  # liveness answers without the key (orchestrators probe it)

F = TypeVar("F", bound=Callable[..., Any])


def queues_a_job(endpoint: F) -> F:
    """Mark a route whose request waits in the inference queue: a full queue refuses it before its body."""
    endpoint.queues_a_job = True  # type: ignore[attr-defined]
    return endpoint


def has_api_key(authorization: str, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class BodyRefusedError(HTTPException):
    """Raised from ``receive`` while a route reads its body; FastAPI passes HTTP errors through.

    ``code`` and ``param`` go into the envelope (``api.errors``)."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(status, message)
        self.code = code
        self.param = param


def body_too_large(message: str, param: str | None = None) -> BodyRefusedError:
    return BodyRefusedError(413, message, code="too_large", param=param)


class AdmissionMiddleware:
    """Refuse what can be refused before the body is read; count the body that is read."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        service: InferenceService,
        queued_routes: frozenset[tuple[str, str]],
        max_body_bytes: int,
        max_file_bytes: int,
        open_paths: frozenset[str] = OPEN_PATHS,
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes  # paths under these answer without the key (a login of their own)
        self.service = service
        self.queued_routes = queued_routes
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if (
            self.api_key is not None
            and scope["path"] not in self.open_paths
            and not scope["path"].startswith(self.open_prefixes)
            and not has_api_key(headers.get("authorization", ""), self.api_key)
        ):
            error = UnauthorizedError("a valid API key is required (Authorization: Bearer <key>)")
            await response_for(error)(scope, receive, send)
            return
        if (scope["method"], scope["path"]) in self.queued_routes:
            try:
                self.service.refuse_if_full()
            except BusyError as exc:
                await response_for(exc)(scope, receive, send)
                return
        message = f"the request body is larger than {self.max_body_bytes} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await error_response(413, message, code="too_large")(scope, receive, send)
            return
        parts = _FilePartLimit.for_content_type(headers.get("content-type", ""), self.max_file_bytes)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                chunk = msg.get("body", b"")
                seen += len(chunk)
                if seen > self.max_body_bytes:
                    raise body_too_large(message)
                if parts is not None:
                    parts.feed(chunk)
            return msg

        await self.app(scope, counting_receive, send)


class _FilePartLimit:
    """Follows a multipart body as it streams in: stops it when one file part passes the limit, or
    when a text part holds bytes that are not UTF-8 (overlong forms such as ``C0 80`` included).

    Only parts with a ``filename`` count towards the file limit (the uploads); text fields are
    bounded by the body limit. A body the parser cannot follow is left to the form parser of the
    route, which reports it.
    """

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._field = b""
        self._value = b""
        self._name: str | None = None
        self._is_file = False
        self._size = 0
        self._text: codecs.IncrementalDecoder | None = None
        self._parser: MultipartParser | None = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    @classmethod
    def for_content_type(cls, content_type: str, max_bytes: int) -> _FilePartLimit | None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        return cls(boundary, max_bytes) if kind == b"multipart/form-data" and boundary else None

    def feed(self, chunk: bytes) -> None:
        if self._parser is None or not chunk:
            return
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            self._parser = None

    def _begin(self) -> None:
        self._name, self._is_file, self._size, self._text = None, False, 0, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            _, params = parse_options_header(self._value)
            self._name = params.get(b"name", b"").decode("utf-8", "replace") or None
            self._is_file = b"filename" in params
            self._text = None if self._is_file else codecs.getincrementaldecoder("utf-8")()
        self._field, self._value = b"", b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._text is not None:
            self._check_text(data[start:end], final=False)
        self._size += end - start
        if self._is_file and self._size > self.max_bytes:
            name = self._name or "file"
            raise body_too_large(f"{name}: the upload is larger than {self.max_bytes} bytes", param=name)

    def _end(self) -> None:
        self._check_text(b"", final=True)

    def _check_text(self, data: bytes, *, final: bool) -> None:
        if self._text is None:
            return
        held = len(self._text.getstate()[0])  # the tail of a sequence that the last chunk split
        try:
            self._text.decode(data, final=final)
        except UnicodeDecodeError as exc:
            name = self._name or "field"
            at = self._size - held + exc.start
            raise BodyRefusedError(
                400,
                f"{name} is not valid UTF-8 text (byte {max(at, 0)} of the field)",
                code="invalid_value",
                param=name,
            ) from None
