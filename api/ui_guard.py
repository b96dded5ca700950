"""The one door in front of the mounted web UI: what reaches Gradio is only what the page itself sends.

Gradio's app serves much more than the page uses (its programmatic API and API docs, a URL
proxy, monitoring, ...); some of its routes raise on malformed input (a 500 with a traceback,
after which uvicorn drops the keep-alive connection); and its input handling of a mounted app
reads whatever server path a ``FileData`` names (it checks the upload folder only for apps
started with ``launch()``). So every request under ``/ui/`` is decided here before Gradio sees it:

1. only the routes the page uses (``PAGE_ROUTES``, read off a real browser session) pass; any
   other path is a 404, another method a 405, a websocket is closed;
2. with ``--api-key`` every route but the login page, its static files and the login itself
   needs the login's session cookie (401): nothing that runs work is open without the key;
3. wrong keys at the login are throttled per client address (``LoginThrottle``);
4. a ``queue/join`` body (how the page runs an event) must name an event of the page with as
   many inputs as it takes, each a value its component can hold (the page's own controls never
   send another: a number within its slider, one of a dropdown's current choices, ...), and every
   file it names must be a regular file inside Gradio's upload directory within the upload limit
   (``UploadedFiles``), checked with ``stat`` before anything opens it. What Gradio would fail on
   later, in the event, with a traceback in the log, is a 400 here;
5. what Gradio answers with an error status becomes the API's envelope (422 -> 400), and an
   exception escaping Gradio becomes a 400 logged on one line: no 500, no traceback, and the
   connection stays usable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, response_for, validation_message
from errors import InvalidInputError, StepAudioError, TooLargeError

logger = logging.getLogger(__name__)

_ERROR_BODY_BYTES = 64 * 1024  # Gradio's error bodies are a sentence; more is not kept for the message
_MESSAGE_CHARS = 300
_SESSION_CHARS = 128
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


@dataclass(frozen=True)
class PageRoute:
    """A route the page uses, as an OpenAPI-style template under the mount (``{name:path}`` spans slashes)."""

    methods: frozenset[str]
    template: str
    login: bool = True  # with --api-key, only a logged-in page may call it
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        kinds = {"path": ".+", "int": "[0-9]+"}
        regex = ""
        for literal, name in re.findall(r"([^{]*)(\{[^}]*\})?", self.template):
            regex += re.escape(literal)
            if name:
                kind = name[1:-1].partition(":")[2]
                regex += kinds.get(kind, "[^/]+")
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))


def _route(methods: str, template: str, *, login: bool = True) -> PageRoute:
    return PageRoute(frozenset(methods.split()), template, login)


# Every request a browser session makes (open, log in, clone, upload, edit, live playback, voices,
# cache, log panel, cancel), and nothing else. The page's static files and the login form are open.
PAGE_ROUTES: tuple[PageRoute, ...] = (
    _route("GET HEAD", "/", login=False),
    _route("GET HEAD", "/assets/{path:path}", login=False),
    _route("GET HEAD", "/static/{path:path}", login=False),
    _route("GET HEAD", "/theme.css", login=False),
    _route("POST", "/login", login=False),
    _route("GET", "/logout", login=False),
    _route("GET", "/config"),
    _route("POST", "/gradio_api/queue/join"),
    _route("GET", "/gradio_api/queue/data"),
    _route("GET", "/gradio_api/heartbeat/{session_hash}"),
    _route("POST", "/gradio_api/upload"),
    _route("GET", "/gradio_api/upload_progress"),
    _route("GET HEAD", "/gradio_api/file={path:path}"),
    _route("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id:int}/{segment}"),
    _route("POST", "/gradio_api/cancel"),
    _route("POST", "/gradio_api/reset"),
)


class _Fn(Protocol):
    fn: object
    inputs: list[Any]


class GradioApp(Protocol):
    """What the guard reads of Gradio's mounted app (its login tokens, its event table, its queue, its sessions)."""

    tokens: dict[str, str]
    cookie_id: str
    uploaded_file_dir: str
    state_holder: Any

    def get_blocks(self) -> Any: ...


class UploadedFiles:
    """The only server files the web UI reads: regular files in Gradio's upload directory, within the limit.

    Gradio stores every upload (and every output it hands the page, which the page may send back as
    an input) there. ``check`` decides from the path and ``stat`` alone, so a device, a FIFO or a
    path outside is refused before anything opens it; ``read`` checks again on the opened file
    (no symlink followed, non-blocking open) and never reads past the limit.
    """

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = os.path.realpath(root)
        self.max_bytes = max_bytes

    def check(self, path: object, param: str) -> str:
        """The resolved path of an acceptable upload; InvalidInputError or TooLargeError otherwise."""
        refused = InvalidInputError(f"{param}: the web UI reads only files uploaded through its page", param=param)
        if not isinstance(path, str) or not path or "\x00" in path or "://" in path or not os.path.isabs(path):
            raise refused
        real = os.path.realpath(path)
        if os.path.dirname(real) == real or os.path.commonpath([real, self.root]) != self.root or real == self.root:
            raise refused
        try:
            info = os.stat(real)
        except OSError:
            raise refused from None
        self._check_stat(info, param, refused)
        return real

    def read(self, path: str, param: str) -> bytes:
        """The file's bytes, after ``check`` and the same checks on the opened file."""
        real = self.check(path, param)
        refused = InvalidInputError(f"{param}: the web UI reads only files uploaded through its page", param=param)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise refused from None
        with os.fdopen(fd, "rb") as file:
            self._check_stat(os.fstat(fd), param, refused)
            data = file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise TooLargeError(f"{param}: the upload is larger than {self.max_bytes} bytes", param=param)
        return data

    def _check_stat(self, info: os.stat_result, param: str, refused: StepAudioError) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > self.max_bytes:
            raise TooLargeError(f"{param}: the upload is larger than {self.max_bytes} bytes", param=param)


def file_references(value: object) -> Iterator[dict[str, Any]]:
    """Every object in a JSON value that names a file (Gradio's ``FileData``: a ``path``, a ``url``, its meta)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            if "path" in item or "url" in item or (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"):
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


@dataclass
class _Attempts:
    failures: int = 0
    locked_until: float = 0.0
    busy: bool = False


class LoginThrottle:
    """Wrong keys at the login cost time, per client address.

    The first ``free`` wrong keys answer at once (a typo); after that each wrong key locks the
    address out for ``base_s`` doubling per further wrong key, up to ``max_s``; while locked out, or
    while one of its attempts is still being answered, the address gets 429 with ``Retry-After``
    without its key being checked. So concurrency buys nothing, and guessing runs at about one key
    per ``max_s`` seconds. A correct key clears the address's record. The table keeps at most
    ``max_clients`` addresses (the idle ones first make room).
    """

    def __init__(self, *, free: int = 3, base_s: float = 1.0, max_s: float = 60.0, max_clients: int = 4096) -> None:
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.max_clients = max_clients
        self._table: OrderedDict[str, _Attempts] = OrderedDict()

    def admit(self, client: str) -> float | None:
        """None: go on and check the key (``done`` must follow); else the seconds to wait."""
        now = time.monotonic()
        record = self._table.get(client)
        if record is not None and (record.busy or now < record.locked_until):
            return max(record.locked_until - now, 1.0)
        if record is None:
            self._make_room(now)
            record = self._table[client] = _Attempts()
        self._table.move_to_end(client)
        record.busy = True
        return None

    def done(self, client: str, *, ok: bool) -> None:
        record = self._table.get(client)
        if record is None:
            return
        record.busy = False
        if ok:
            del self._table[client]
            return
        record.failures += 1
        if record.failures >= self.free:
            delay = min(self.base_s * 2 ** (record.failures - self.free), self.max_s)
            record.locked_until = time.monotonic() + delay

    def _make_room(self, now: float) -> None:
        if len(self._table) < self.max_clients:
            return
        for client, record in list(self._table.items()):  # oldest first
            if not record.busy and record.locked_until <= now:
                del self._table[client]
                if len(self._table) < self.max_clients:
                    return
        self._table.popitem(last=False)


class _Relay:
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
                await self._answer(_gradio_error(int(held["status"]), held.get("headers", []), bytes(self._body)))
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


def _gradio_error(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    """Gradio's error answer in the envelope: its own sentence where it has one, the status otherwise."""
    if status >= 500 and status != 503:  # a traceback's 500: Gradio failed on what the request sent
        return error_response(400, _NOT_PROCESSED, code="invalid_request")
    status = 400 if status == 422 else status  # Gradio's request validation, the API's 400
    message: str | None = None
    if not any(k.lower() == b"content-encoding" for k, _ in headers):
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
        if isinstance(detail, str):
            message = " ".join(detail.split())[:_MESSAGE_CHARS]
    if not message:
        try:
            message = HTTPStatus(status).phrase.lower()
        except ValueError:
            message = "the request was refused"
    return error_response(status, message, code=_CODES.get(status))


def _input_problem(kind: str, block: Any, value: object) -> str | None:
    """Why ``value`` is not one the page's ``kind`` of control sends (None when it is, or the kind is not judged)."""
    if kind in ("Slider", "Number"):
        if value is None and kind == "Number":
            return None
        if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
            return "a finite number is required"
        low, high = getattr(block, "minimum", None), getattr(block, "maximum", None)
        if (low is not None and value < low) or (high is not None and value > high):
            return f"the number must be within {low} and {high}"
    elif kind == "Textbox" and value is not None and not isinstance(value, str):  # a hidden box sends null
        return "a string is required"
    elif kind in ("Dropdown", "Radio") and value is not None and not getattr(block, "allow_custom_value", False):
        choices = [choice for _, choice in getattr(block, "choices", [])]
        if isinstance(value, (dict, list)) or value not in choices:
            return "not one of the choices"
    elif kind == "Audio" and value is not None and not isinstance(value, dict):
        return "an uploaded file is required"
    return None


class UiGuard:
    """ASGI middleware on the API app that answers for everything under ``prefix`` before Gradio does."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        prefix: str,
        gradio: GradioApp,
        files: UploadedFiles,
        max_join_bytes: int,
        login: bool,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.gradio = gradio
        self.files = files
        self.max_join_bytes = max_join_bytes
        self.login = login
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(self.prefix + "/"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # the page uses none
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"][len(self.prefix) :]
        method = scope["method"]
        routes = [r for r in PAGE_ROUTES if r.pattern.match(path)]
        route = next((r for r in routes if method in r.methods), None)
        refusal: Response | None = None
        if not routes:
            refusal = error_response(404, "the web UI has no such route", code="not_found")
        elif route is None:
            allowed = sorted({m for r in routes for m in r.methods})
            refusal = error_response(
                405, f"{method} is not allowed here", code="method_not_allowed", headers={"Allow": ", ".join(allowed)}
            )
        elif route.login and self.login and not self._logged_in(scope):
            refusal = error_response(
                401, "log in to the web UI first (the API key is the password)", code="login_required"
            )
        else:
            refusal = self._check_request(route, path, scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        assert route is not None
        if route.template == "/gradio_api/queue/join":
            await self._join(scope, receive, send)
        elif route.template == "/login" and self.login:
            await self._login(scope, receive, send)
        else:
            await self._forward(scope, receive, send)

    def _logged_in(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", []) if k == b"cookie"), b"")
        cookies = cookie_parser(header.decode("latin-1"))
        names = (f"access-token-{self.gradio.cookie_id}", f"access-token-unsecure-{self.gradio.cookie_id}")
        return any(cookies.get(name) in self.gradio.tokens for name in names if cookies.get(name))

    def _check_request(self, route: PageRoute, path: str, scope: Scope) -> Response | None:
        """What Gradio would fail on or misuse, refused from the path and the query alone."""
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if route.template in ("/", "/config"):
            if query.get("page"):
                return error_response(404, "the web UI has one page", code="not_found", param="page")
            if query.get("deep_link"):
                return error_response(400, "the web UI has no deep links", code="invalid_value", param="deep_link")
        elif route.template == "/gradio_api/file={path:path}":
            # the URL form makes the server fetch the URL: the UI is no way around --allow-audio-urls
            target = path[len("/gradio_api/file=") :].lower().lstrip("/")
            if target.startswith(("http:", "https:")):
                return error_response(403, "the web UI serves only its own files", code="forbidden")
        elif route.template == "/gradio_api/queue/data":
            session = query.get("session_hash", "")
            if session not in self.gradio.get_blocks()._queue.pending_messages_per_session:
                return error_response(
                    404, "no event of this session is pending", code="not_found", param="session_hash"
                )
        return None

    async def _join(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the (small) body, check it, then hand Gradio the same bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_join_bytes:
                response = error_response(413, f"the request body is larger than {self.max_join_bytes} bytes")
                await response(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            self._check_join(body)
        except StepAudioError as exc:
            await response_for(exc)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._forward(scope, replay, send)

    def _check_join(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidInputError("the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise InvalidInputError("the request body must be a JSON object")
        fn_index = payload.get("fn_index")
        fns: dict[int, _Fn] = self.gradio.get_blocks().fns
        fn = fns.get(fn_index) if type(fn_index) is int else None
        if fn is None or fn.fn is None:
            raise InvalidInputError("fn_index: not an event of this page", param="fn_index")
        data = payload.get("data")
        if not isinstance(data, list) or len(data) != len(fn.inputs):
            raise InvalidInputError(f"data: this event takes a list of {len(fn.inputs)} inputs", param="data")
        session = payload.get("session_hash")
        if not isinstance(session, str) or not 0 < len(session) <= _SESSION_CHARS:
            raise InvalidInputError("session_hash: a string of 1 to 128 characters is required", param="session_hash")
        trigger = payload.get("trigger_id")
        if trigger is not None and type(trigger) is not int:
            raise InvalidInputError("trigger_id: an integer or null", param="trigger_id")
        if payload.get("batched") or payload.get("simple_format"):
            raise InvalidInputError("the page sends neither batched nor simple-format events")
        self._check_inputs(session, fn, data)
        for ref in file_references([data, payload.get("event_data")]):
            self.files.check(ref.get("path"), "data")
            if ref.get("is_stream"):
                raise InvalidInputError("data: the page sends no streamed inputs", param="data")

    def _check_inputs(self, session: str, fn: _Fn, data: list[Any]) -> None:
        """Each value one its component's control can send, judged on the session's copy (choices change)."""
        holder = self.gradio.state_holder
        state = holder[session] if session in holder else None  # noqa: SIM401  # no .get(); [] makes one
        for i, (block, value) in enumerate(zip(fn.inputs, data, strict=True)):
            if getattr(block, "stateful", False):
                continue  # the server's own value is used, whatever the page sends
            current = state.get(block._id, block) if state is not None else block
            problem = _input_problem(type(current).__name__, current, value)
            if problem:
                raise InvalidInputError(f"data[{i}]: {problem}", param=f"data[{i}]")

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = str((scope.get("client") or ("unknown",))[0])
        wait = self.throttle.admit(client)
        if wait is not None:
            seconds = math.ceil(wait)
            response = error_response(
                429,
                f"too many wrong keys from this address: retry in {seconds} s",
                code="too_many_login_attempts",
                headers={"Retry-After": str(seconds)},
            )
            await response(scope, receive, send)
            return
        relay: _Relay | None = None
        try:
            relay = await self._forward(scope, receive, send)
        finally:
            self.throttle.done(client, ok=relay is not None and relay.status == 200)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> _Relay:
        relay = _Relay(scope, send)
        try:
            await self.app(scope, receive, relay.send)
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
