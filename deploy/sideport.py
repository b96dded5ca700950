"""Each replica's side port: its own metrics, liveness and readiness, addressable per replica.

Through Serve's proxy, ``/metrics`` and ``/readyz`` reach whichever replica the proxy picks, so a
scrape would see one random replica each time and a probe would say nothing about the pod it
runs on. Each replica therefore also serves its private Prometheus registry and both probes on
a port of its own, ``metrics_port + local rank`` (the rank of the replica among the deployment's
replicas on its node: one GPU replica per Kubernetes pod is always rank 0, so the port is fixed
and a PodMonitor can name it). A replacement replica takes over its rank, and so its port.

The port answers from the moment the replica starts loading: ``/healthz`` at once, ``/readyz``
503 until the models are loaded, as the app's own routes say.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.state import AppState
from api.uvicorn_options import HTTP, LOOP

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
INFO_HEADER = (
    b"# HELP step_audio_replica_info The Serve replica these metrics come from.\n# TYPE step_audio_replica_info gauge\n"
)


def side_app(state: AppState, replica: str) -> Starlette:
    info = f'step_audio_replica_info{{replica="{replica}"}} 1\n'.encode()

    async def metrics(_: Request) -> Response:
        body = generate_latest(state.metrics.registry)
        return Response(body + INFO_HEADER + info, media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "replica": replica})

    async def readyz(_: Request) -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ready", "replica": replica})
        reason = state.load_error or f"loading ({state.loading_stage})"
        return JSONResponse({"status": "not ready", "replica": replica, "reason": reason}, status_code=503)

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)])


class SidePort:
    """The side server on its own thread; ``stop()`` frees the port."""

    def __init__(self, state: AppState, replica: str, host: str, port: int) -> None:
        config = uvicorn.Config(
            side_app(state, replica), host=host, port=port, log_level="warning", loop=LOOP, http=HTTP
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="side-port", daemon=True)
        self.address = f"{host}:{port}"

    def start(self) -> bool:
        """True once it serves; False (logged, the replica goes on without it) when the port is taken."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                logger.warning("the side port %s could not be opened: this replica is not scraped", self.address)
                return False
            time.sleep(0.02)
        logger.info("metrics, /healthz and /readyz of this replica on %s", self.address)
        return True

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
