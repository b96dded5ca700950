"""The real HTTP server for benchmarks: ``api.create_app`` under uvicorn on a loopback port, in a thread.

Benchmarks measure what a client sees, so they go through the same app, routes, queue and
encoder as production; only the engine's generation cap is set per benchmark.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import httpx
import uvicorn

from api.app import create_app
from settings import Settings

LOOPBACK = "127.0.0.1"


class BenchServer:
    """``with BenchServer(settings, max_new_tokens=...) as server: server.url`` (ready when entered)."""

    def __init__(self, settings: Settings, *, max_new_tokens: int | None = None, ready_timeout_s: float = 1800) -> None:
        from engine.tts import build_engine

        self.app = create_app(settings, engine_factory=partial(build_engine, max_new_tokens=max_new_tokens))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=LOOPBACK, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-bench", daemon=True)
        self.ready_timeout_s = ready_timeout_s
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> BenchServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while (r := client.get("/readyz")).status_code != 200:
                if r.json()["error"]["code"] == "model_load_failed" or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not get ready: {r.text}")
                time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def bench_settings(**values: Any) -> Settings:
    """Settings for a benchmark server on loopback (no API key, no auto-transcription)."""
    return Settings(api_host=LOOPBACK, **values)
