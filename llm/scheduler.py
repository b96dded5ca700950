"""Continuous batching for the server: a ``DecodeLoop`` driven by a thread of its own, one per loaded variant.

Requests are submitted from any thread (``submit`` returns a ``GenerationHandle`` at once); the
thread runs step after step while any request waits or runs, and sleeps otherwise. What a step
does, and why a request's ids do not depend on the batch it shares, is in ``llm.decode``. The
observer's hooks run on this thread between steps: they must be cheap.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from errors import NotReadyError
from llm.decode import DecodeLoop, DecodeObserver

logger = logging.getLogger(__name__)


class Scheduler(DecodeLoop):
    """The decode thread of one LLM variant (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_rows: int = 16,
        kv_budget_bytes: int = 4 * 2**30,
        variant: str = "base",
        observer: DecodeObserver | None = None,
    ) -> None:
        super().__init__(
            model, max_batch_rows=max_batch_rows, kv_budget_bytes=kv_budget_bytes, variant=variant, observer=observer
        )
        self._thread = threading.Thread(target=self._run, name=f"llm-scheduler-{variant}", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; waiting and running requests end with NotReadyError."""
        super().close()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.changed:
                        self.changed.wait_for(lambda: self.busy or self.closed)
                        if self.closed:
                            break
                    self.step()
        finally:
            self.fail_all(NotReadyError("the generation scheduler was closed"))
