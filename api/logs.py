"""The server's log line format, and a bounded in-memory copy of its recent lines for the web UI.

The web UI's log panel shows what an operator would otherwise read with ``docker logs``
(``[FunASR Cache HIT]``, timings, warnings) while a request runs, without a file or a second
process: a handler on the root logger keeps the last lines in a ring buffer.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_MAX_LINES = 500


class RecentLogHandler(logging.Handler):
    """Keeps the last ``max_lines`` formatted records; ``version`` changes whenever one arrives.

    ``version`` lets a poller skip redrawing when nothing was logged since its last look.
    """

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._guard = threading.Lock()
        self.version = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad format argument must not break the caller's logging
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)
            self.version += 1

    def lines(self) -> list[str]:
        """The kept lines, oldest first (newest last, as a terminal shows them)."""
        with self._guard:
            return list(self._lines)

    def attach(self, logger: logging.Logger | None = None) -> None:
        """Listen on ``logger`` (the root logger by default); its level decides what arrives."""
        (logger or logging.getLogger()).addHandler(self)

    def detach(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger()).removeHandler(self)
