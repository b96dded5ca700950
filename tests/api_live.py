"""A real server for API tests: ``api.create_app`` under uvicorn on a free loopback port, in a thread.

The engine is the real one (``engine.tts.build_engine``) on the tiny bundle that
``bundles.write_bundle`` generates; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from api.app import create_app
from settings import Settings

READY_TIMEOUT_S = 240.0
MAX_NEW_TOKENS = 25  # five groups of 5 codes: 0.6 s of audio per generation
LOOPBACK = "127.0.0.1"


def test_settings(bundle: Path, cache_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: the tiny bundle, a private cache, loopback only."""
    values: dict[str, Any] = {
        "model_path": bundle,
        "cache_dir": cache_dir,
        "api_host": LOOPBACK,
        "device": "cpu",
        "enable_auto_transcribe": True,
        "whisper_model": "tiny.en",
        **overrides,
    }
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class LiveServer:
    """``with LiveServer(settings) as server: server.url`` (ready: /readyz answered 200)."""

    def __init__(self, settings: Settings, *, wait_ready: bool = True, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        from engine.tts import build_engine

        self.settings = settings
        # the real engine; the cap keeps each random-weight generation short
        self.app = create_app(settings, engine_factory=partial(build_engine, max_new_tokens=max_new_tokens))
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host=LOOPBACK, port=0, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.wait_ready = wait_ready
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        if self.wait_ready:
            self.until_ready()
        return self

    def until_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        headers = self.auth_headers()
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while True:
                r = client.get("/readyz", headers=headers)
                if r.status_code == 200:
                    return
                if r.json()["error"]["code"] == "model_load_failed" or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not get ready: {r.text}")
                time.sleep(0.1)

    def auth_headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
