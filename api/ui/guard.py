"""The one door in front of the mounted web UI: what reaches Gradio is only what the page itself sends.

Gradio's app serves much more than the page uses, some of its routes raise on malformed input,
and its input handling of a mounted app reads whatever server path a ``FileData`` names (it
checks the upload folder only for apps started with ``launch()``). So every request under
``/ui/`` is decided here before Gradio sees it:

1. only the routes the page uses (``api.ui.routes``) pass; any other path is a 404, another
   method a 405, a websocket is closed;
2. with ``--api-key`` every route but the login page, its static files and the login itself
   needs the login's session cookie (401): nothing that runs work is open without the key;
3. wrong keys at the login are throttled per client address (``api.ui.login``);
4. a ``queue/join`` body must be one the page's controls could send, and every file it names an
   upload of the page, checked with ``stat`` before anything opens it (``api.ui.join``);
5. what Gradio answers with an error status, or an exception escaping it, becomes the API's
   envelope (``api.ui.envelope``): no 500, no traceback, and the connection stays usable.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, response_for
from api.ui.envelope import Relay, forward
from api.ui.join import GradioApp, check_join
from api.ui.login import LoginThrottle
from api.ui.routes import FILE, JOIN, LOGIN, QUEUE_DATA, PageRoute, match
from api.ui.uploads import UploadedFiles
from errors import StepAudioError


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
        route = self._decide(path, scope)
        if isinstance(route, Response):  # refused
            await route(scope, receive, send)
            return
        if route.template == JOIN:
            await self._join(scope, receive, send)
        elif route.template == LOGIN and self.login:
            await self._login(scope, receive, send)
        else:
            await forward(self.app, scope, receive, send)

    def _decide(self, path: str, scope: Scope) -> PageRoute | Response:
        """The page's route for this request, or its refusal: no such route or method, no login, a bad query."""
        method = scope["method"]
        routes, route = match(path, method)
        if not routes:
            return error_response(404, "the web UI has no such route", code="not_found")
        if route is None:
            allowed = sorted({m for r in routes for m in r.methods})
            return error_response(
                405, f"{method} is not allowed here", code="method_not_allowed", headers={"Allow": ", ".join(allowed)}
            )
        if route.login and self.login and not self._logged_in(scope):
            return error_response(
                401, "log in to the web UI first (the API key is the password)", code="login_required"
            )
        return self._check_request(route, path, scope) or route

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
        elif route.template == FILE:
            # the URL form makes the server fetch the URL: the UI is no way around --allow-audio-urls
            target = path[len("/gradio_api/file=") :].lower().lstrip("/")
            if target.startswith(("http:", "https:")):
                return error_response(403, "the web UI serves only its own files", code="forbidden")
        elif route.template == QUEUE_DATA:
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
            check_join(self.gradio, self.files, body)
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

        await forward(self.app, scope, replay, send)

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
        relay: Relay | None = None
        try:
            relay = await forward(self.app, scope, receive, send)
        finally:
            self.throttle.done(client, ok=relay is not None and relay.status == 200)
