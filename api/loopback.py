"""The real server in the caller's process: ``api.create_app`` under uvicorn on a free loopback port, in a thread.

For code that drives the HTTP API end to end and also needs the process itself: the tests (which
read the app's state) and the GPU check (``bench.gpu_check``, which reads this process's GPU
memory counters while the server computes).
"""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from api.app import EngineFactory, create_app
from api.uvicorn_options import HTTP, LOOP
from settings import Settings

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 240.0
START_TIMEOUT_S = 30.0


class LoopbackServer:
    """``with LoopbackServer(settings) as server: server.url`` (ready: /readyz answered 200).

    ``engine_factory`` goes to ``create_app`` (default: the real ``engine.build.build_engine``).
    With ``wait_ready=False`` the block starts once the port is bound; ``until_ready`` waits.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory | None = None,
        wait_ready: bool = True,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, engine_factory=engine_factory)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=LOOPBACK,
                port=0,
                log_level="warning",
                timeout_graceful_shutdown=5,
                loop=LOOP,
                http=HTTP,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-loopback", daemon=True)
        self.wait_ready = wait_ready
        self.ready_timeout_s = ready_timeout_s
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        if self.wait_ready:
            try:
                self.until_ready(self.ready_timeout_s)
            except BaseException:  # no server left running behind a failed start
                self.__exit__(None, None, None)
                raise
        return self

    def until_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll /readyz until 200; a load failure or the timeout raises RuntimeError with the reason."""
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
