"""Gradio's answers in the API's error envelope: no 500, no traceback, the connection kept.

Some of Gradio's routes raise on malformed input (a 500 with a traceback, after which uvicorn
drops the keep-alive connection) and its refusals come in several formats of its own. What it
answers with an error status is held back and answered in the envelope instead (422 -> 400), and
an exception escaping it becomes a 400 logged on one line.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, validation_message

logger = logging.getLogger(__name__)

_ERROR_BODY_BYTES = 64 * 1024  # Gradio's error bodies are a sentence; more is not kept for the message
_MESSAGE_CHARS = 300
_NOT_PROCESSED = "the web UI could not process this request"
_CODES = {
    400: "invalid_request",
    401: "login_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "too_many_login_attempts",
    503: "not_ready",
}


class Relay:
    """Passes Gradio's response on, except error statuses, which it holds and answers in the envelope."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope = scope
        self.send_on = send
        self.status: int | None = None
        self.started = False  # something was sent on
        self.finished = False
        self._held: Message | None = None
        self._body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and int(message["status"]) >= 400:
            self._held = message
            return
        if message["type"] == "http.response.body" and self._held is not None:
            if len(self._body) < _ERROR_BODY_BYTES:
                self._body += message.get("body", b"")
            if not message.get("more_body", False):
                held, self._held = self._held, None
                await self._answer(gradio_error(int(held["status"]), held.get("headers", []), bytes(self._body)))
            return
        await self._pass(message)

    async def fail(self) -> None:
        """Gradio raised: answer a clean 400, or end a response already under way."""
        if not self.started:
            await self._answer(error_response(400, _NOT_PROCESSED, code="invalid_request"))
        elif not self.finished:
            await self._pass({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer(self, response: Response) -> None:
        async def no_receive() -> Message:
            return {"type": "http.disconnect"}

        await response(self.scope, no_receive, self._pass)

    async def _pass(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        self.started = True
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.send_on(message)


async def forward(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> Relay:
    """Let Gradio answer through a ``Relay``; an exception it raises is logged on one line and answered."""
    relay = Relay(scope, send)
    try:
        await app(scope, receive, relay.send)
    except Exception as exc:
        logger.warning(
            "web UI: %s %s failed in Gradio (answered 400): %s: %s",
            scope["method"],
            scope["path"],
            type(exc).__name__,
            " ".join(str(exc).split())[:_MESSAGE_CHARS],
        )
        await relay.fail()
    return relay


def gradio_error(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    """Gradio's error answer in the envelope: its own sentence where it has one, the status otherwise."""
    if status >= 500 and status != 503:  # a traceback's 500: Gradio failed on what the request sent
        return error_response(400, _NOT_PROCESSED, code="invalid_request")
    status = 400 if status == 422 else status  # Gradio's request validation, the API's 400
    message: str | None = None
    if not any(k.lower() == b"content-encoding" for k, _ in headers):
        message = _message(body)
    if not message:
        try:
            message = HTTPStatus(status).phrase.lower()
        except ValueError:
            message = "the request was refused"
    return error_response(status, message, code=_CODES.get(status))


def _message(body: bytes) -> str | None:
    """The sentence in one of Gradio's error bodies (JSON ``detail`` or ``error``, a validation list, text)."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    detail = parsed.get("detail", parsed.get("error")) if isinstance(parsed, dict) else parsed
    if isinstance(detail, dict):
        detail = detail.get("error")
    if isinstance(detail, list) and all(isinstance(e, dict) for e in detail):
        detail = validation_message(detail)[0]
    return " ".join(detail.split())[:_MESSAGE_CHARS] if isinstance(detail, str) else None
