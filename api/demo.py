"""Demo mode: the tiny random-weight bundle, and the notice every response and page carries."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings

logger = logging.getLogger(__name__)

DEMO_HEADER = "X-Step-Audio-Demo"
DEMO_NOTICE = "random-weight demo bundle: the audio is noise, not speech"
DEMO_BUNDLE_DIR = "demo-bundle"


def demo_settings(settings: Settings) -> Settings:
    """Write (once) the tiny random-weight bundle under the cache dir and point the settings at it."""
    from bundles import write_bundle

    root = write_bundle(settings.cache_dir / DEMO_BUNDLE_DIR, size="tiny")  # reused once written
    logger.warning("DEMO MODE: serving %s (%s)", root, DEMO_NOTICE)
    return settings.model_copy(update={"model_path": root, "tokenizer_model_id": "Step-Audio-Tokenizer"})


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
