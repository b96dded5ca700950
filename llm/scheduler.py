"""Continuous batching for the server: one thread per loaded variant runs its ``DecodeLoop``.

``Scheduler.submit`` queues a request and returns a ``GenerationHandle`` at once; the thread runs
step after step while any request waits or runs, and sleeps otherwise. What a step does, and why
a request's ids do not depend on the batch it shares, is in ``llm.decode``. The observer's hooks
run on this thread between steps: they must be cheap.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from errors import NotReadyError
from llm.decode import DecodeLoop, DecodeObserver
from llm.generation import GenerationHandle
from llm.prompts import PromptPair
from llm.sampling import DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_K

logger = logging.getLogger(__name__)


class Scheduler:
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
        self.loop = DecodeLoop(
            model, max_batch_rows=max_batch_rows, kv_budget_bytes=kv_budget_bytes, variant=variant, observer=observer
        )
        self._thread = threading.Thread(target=self._run, name=f"llm-scheduler-{variant}", daemon=True)
        self._thread.start()

    @property
    def observer(self) -> DecodeObserver | None:
        return self.loop.observer

    @observer.setter
    def observer(self, observer: DecodeObserver | None) -> None:
        self.loop.observer = observer

    def submit(
        self,
        prompt: PromptPair,
        *,
        seed: int | None = None,
        intensity: float = 1.0,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int | None = DEFAULT_TOP_K,
        max_new_tokens: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        do_sample: bool = True,
    ) -> GenerationHandle:
        """Queue one prompt (arguments as ``DecodeLoop.submit``); NotReadyError once closed."""
        return self.loop.submit(
            prompt,
            seed=seed,
            intensity=intensity,
            temperature=temperature,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            do_sample=do_sample,
        )

    @property
    def queued(self) -> int:
        return self.loop.queued

    @property
    def running(self) -> int:
        return len(self.loop.running)

    @property
    def steps(self) -> int:
        return self.loop.steps

    def kv_cache_bytes(self) -> int:
        return self.loop.kv_cache_bytes()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; waiting and running requests end with NotReadyError."""
        self.loop.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        loop = self.loop
        try:
            with torch.inference_mode():
                while True:
                    with loop.changed:
                        loop.changed.wait_for(lambda: loop.busy or loop.closed)
                        if loop.closed:
                            break
                    loop.step()
        finally:
            loop.fail_all(NotReadyError("the generation scheduler was closed"))
