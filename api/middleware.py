"""Small ASGI middlewares that change every response of the app the same way."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeaderMiddleware:
    """Adds one header to every HTTP response (the demo notice)."""

    def __init__(self, app: ASGIApp, *, name: str, value: str) -> None:
        self.app = app
        self.header = (name.lower().encode("latin-1"), value.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class HeadAsGetMiddleware:
    """Serve HEAD wherever GET is served, as HTTP asks (Starlette's own routes do, FastAPI's do not):
    the route runs as for GET and the body is dropped, so the status and headers, Content-Length
    included, are the GET's. The web UI's paths (``skip_*``) keep their own HEAD handling."""

    def __init__(self, app: ASGIApp, *, skip_paths: frozenset[str], skip_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.skip_paths = skip_paths
        self.skip_prefixes = skip_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] != "HEAD"
            or path in self.skip_paths
            or (self.skip_prefixes and path.startswith(self.skip_prefixes))
        ):
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)
