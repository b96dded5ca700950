"""Serving the app under uvicorn with a stop that always ends.

uvicorn's stop is cooperative: on SIGTERM it stops accepting, gives open connections
``grace_s`` seconds, cancels what is left, runs the app's shutdown and returns. All of that runs
on the event loop, so a request that holds the loop (a handler reading something endless, as the
web UI once could be made to) or a thread that never finishes keeps the process alive until
SIGKILL. So the first stop signal also arms a timer on its own thread: if the process is still
there ``hard_stop_s`` seconds later, it says so on stderr and exits at once. An orchestrator's
stop then takes at most ``hard_stop_s``, whatever a request is doing.
"""

from __future__ import annotations

import os
import sys
import threading
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from api.uvicorn_options import HTTP, LOOP

GRACE_S = 10  # open connections get this long to finish after a stop signal
HARD_STOP_S = 20.0  # ... and the process is gone this long after it, graceful or not
_STARTUP_FAILURE = 3  # uvicorn.run's exit status when the server could not start


class BoundedStopServer(uvicorn.Server):
    """``uvicorn.Server`` whose first stop signal also arms the hard stop."""

    def __init__(self, config: uvicorn.Config, *, hard_stop_s: float = HARD_STOP_S) -> None:
        super().__init__(config)
        self.hard_stop_s = hard_stop_s
        self._hard_stop: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._hard_stop is None:
            self._hard_stop = threading.Timer(self.hard_stop_s, _exit_now, args=(self.hard_stop_s,))
            self._hard_stop.daemon = True  # it never keeps a finished process alive
            self._hard_stop.start()
        super().handle_exit(sig, frame)


def _exit_now(after_s: float) -> None:
    # not through logging: the thread holding its lock may be the one that is stuck
    os.write(2, f"the server did not stop within {after_s:g} s of the stop signal; exiting now\n".encode())
    os._exit(1)


def serve(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    log_level: str,
    grace_s: int = GRACE_S,
    hard_stop_s: float = HARD_STOP_S,
) -> None:
    """``uvicorn.run`` for one process, with the hard stop (``sys.exit(3)`` if it could not start)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=grace_s,
        loop=LOOP,  # not uvloop/httptools even where the ray extra installed them
        http=HTTP,
    )
    server = BoundedStopServer(config, hard_stop_s=hard_stop_s)
    server.run()
    if not server.started:
        sys.exit(_STARTUP_FAILURE)
