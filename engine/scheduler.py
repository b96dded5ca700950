"""Continuous batching of one loaded LLM variant: one decode loop thread, requests joining and leaving per step.

``Scheduler.submit`` queues a request and returns a ``GenerationHandle`` at once. The loop thread,
at every step boundary:

1. admits waiting requests in FIFO order while they fit (``max_batch_rows`` rows, and the KV budget
   for the worst case of the batch running to its limits); each admitted request is prefilled alone
   and its cache rows join the batch;
2. samples one id for every running request from its own logits, with its own seed, temperature,
   top-k and intensity (a guided request's cond and uncond rows travel together), and hands it to
   the request's ``on_ids`` callback;
3. lets finished (stop id, ``max_new_tokens``, ``max_length``) and cancelled requests leave at once;
4. runs one forward over the remaining rows.

A request's ids are those it would get alone (``llm.generate``): the per-row arithmetic is the
same, the extra rows are masked out (see ``llm.batching``). Fairness: admission is strictly FIFO,
so a request waiting for room is never overtaken by later ones, and every running request leaves
within its own ``max_new_tokens`` steps, so the wait of the head of the queue is bounded; inside
the batch every request gets one id per step. A request too big for the KV budget even alone runs
alone rather than never.

Callbacks (``on_ids``, the observer) run on the loop thread between steps: they must be cheap
(hand the ids to another thread); one that raises fails its own request only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from errors import NotReadyError
from llm.batching import (
    RowKVCache,
    SamplingSpec,
    kv_bytes_per_token,
    num_layers,
    peak_kv_bytes,
    prefill,
    request_rows,
    sample_requests,
)
from llm.generate import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    REPETITION_WINDOW,
    STOP_IDS,
    GenerationResult,
    LastLogits,
    check_generation_args,
    model_device,
    postprocess,
    resolve_seeds,
)
from llm.prompts import PromptPair

logger = logging.getLogger(__name__)

IdsCallback = Callable[[Sequence[int]], None]


@dataclass(frozen=True)
class StepStats:
    """One decode step: requests sampled (= ids produced), cache rows and width of its forward, seconds."""

    requests: int
    rows: int
    width: int
    seconds: float


class SchedulerObserver(Protocol):
    """Metrics hooks (``api.metrics`` implements them with Prometheus); called on the loop thread."""

    def on_admit(self, variant: str, queue_wait_s: float) -> None: ...

    def on_step(self, variant: str, stats: StepStats) -> None: ...


@dataclass(eq=False)
class _Request:
    prompt: PromptPair
    spec: SamplingSpec
    seed: int
    budget: int  # ids it may generate: min(max_new_tokens, max_length - prompt)
    on_ids: IdsCallback | None
    rows: list[list[int]]
    enqueued_at: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)  # last ids of the conditional row, for the repetition rule
    generator: torch.Generator | None = None
    stopped: bool = False
    cancel_requested: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    result: GenerationResult | None = None
    done: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)  # wakes ``GenerationHandle.ids``

    def longest_row(self) -> int:
        return max(len(r) for r in self.rows) + len(self.generated)

    def finish(self) -> None:
        self.result = GenerationResult(
            token_ids=np.asarray(self.generated, dtype=np.int64),
            codes=postprocess(self.generated),
            stopped=self.stopped,
            seed=self.seed,
            cancelled=self.cancelled,
        )
        self.end()

    def end(self) -> None:
        self.done.set()
        self.publish()

    def publish(self) -> None:
        with self.progress:
            self.progress.notify_all()


class GenerationHandle:
    """A submitted request: wait for its result, cancel it, see how many decode steps it took part in."""

    def __init__(self, request: _Request, scheduler: Scheduler) -> None:
        self._request = request
        self._scheduler = scheduler

    @property
    def steps_run(self) -> int:
        """Decode steps this request took part in (= ids sampled for it)."""
        return len(self._request.generated)

    @property
    def seed(self) -> int:
        return self._request.seed

    def done(self) -> bool:
        return self._request.done.is_set()

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue, a running one leaves before its next step."""
        self._scheduler._cancel(self._request)

    def ids(self, timeout: float | None = None) -> Iterator[int]:
        """The request's ids as they are sampled, for a consumer on another thread (the callback's pull twin).

        Ends when the request is done (after its stop id, limit or cancellation); raises what failed
        it, or TimeoutError when no id comes for ``timeout`` seconds.
        """
        request, sent = self._request, 0
        while True:
            with request.progress:
                while len(request.generated) == sent and not request.done.is_set():
                    if not request.progress.wait(timeout):
                        raise TimeoutError(f"no id within {timeout}s")
                new, finished = request.generated[sent:], request.done.is_set()
            yield from new
            sent += len(new)
            if finished and sent == len(request.generated):
                break
        if request.error is not None:
            raise request.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The request's GenerationResult (``cancelled`` set when it was cancelled); raises what failed it.

        TimeoutError when it is not done within ``timeout`` seconds.
        """
        if not self._request.done.wait(timeout):
            raise TimeoutError(f"generation not done within {timeout}s")
        if self._request.error is not None:
            raise self._request.error
        assert self._request.result is not None
        return self._request.result


class Scheduler:
    """The decode loop of one LLM variant (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_rows: int = 16,
        kv_budget_bytes: int = 4 * 2**30,
        variant: str = "base",
        observer: SchedulerObserver | None = None,
    ) -> None:
        if max_batch_rows < 2:
            raise ValueError("max_batch_rows must be >= 2 (a guided request takes two rows)")
        self.model = model
        self.variant = variant
        self.max_batch_rows = max_batch_rows
        self.kv_budget_bytes = kv_budget_bytes
        self.observer = observer
        self.bytes_per_token = kv_bytes_per_token(model)
        self.device = model_device(model)
        self.steps = 0  # decode steps run since start (forwards after prefill)
        self._forward = LastLogits(model)
        self._vocab = getattr(model.config, "vocab_size", None)
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cache = RowKVCache(num_layers(model), 0)
        self._logits: torch.Tensor | None = None  # (rows, vocab) next-token logits of the running rows
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"llm-scheduler-{variant}", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------------------
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
        on_ids: IdsCallback | None = None,
    ) -> GenerationHandle:
        """Queue one prompt; arguments as ``llm.generate.generate`` (bad ones raise InvalidInputError here).

        on_ids(ids): called on the loop thread with each step's new ids (one per step, the final stop
        id included), in order; together they are exactly the result's ``token_ids``.
        """
        check_generation_args(
            [prompt],
            intensity=intensity,
            temperature=temperature,
            top_k=top_k,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            vocab_size=self._vocab,
        )
        budget = max_length - len(prompt.cond)
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        spec = SamplingSpec(float(intensity), float(temperature), top_k, bool(do_sample))
        request = _Request(
            prompt=prompt,
            spec=spec,
            seed=resolve_seeds(seed, 1)[0],
            budget=budget,
            on_ids=on_ids,
            rows=request_rows(prompt, spec.intensity != 1.0),
        )
        request.history = list(prompt.cond[-REPETITION_WINDOW:])
        with self._cond:
            if self._closed:
                raise NotReadyError("the generation scheduler is closed")
            self._pending.append(request)
            self._cond.notify_all()
        return GenerationHandle(request, self)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def kv_cache_bytes(self) -> int:
        """Bytes the running batch's KV cache holds now."""
        return self._cache.nbytes()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; waiting and running requests end with NotReadyError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- loop ---------------------------------------------------------------------------
    def _cancel(self, request: _Request) -> None:
        with self._cond:
            request.cancel_requested = True
            if request in self._pending:
                self._pending.remove(request)
                request.cancelled = True
                request.finish()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._running or self._closed):
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as exc:  # a failed forward fails the requests in it; the loop goes on
                    logger.exception("decode step failed; failing %d request(s)", len(self._running))
                    self._fail(self._running, exc)
                    self._running, self._logits = [], None
                    self._cache = RowKVCache(num_layers(self.model), 0)
        closed = NotReadyError("the generation scheduler was closed")
        with self._cond:
            self._fail([*self._pending, *self._running], closed)
            self._pending.clear()
        self._running = []

    @staticmethod
    def _fail(requests: Sequence[_Request], error: BaseException) -> None:
        for request in requests:
            request.error = error
            request.end()

    def _fits(self, request: _Request) -> bool:
        if not self._running:
            return True  # alone it always runs, even past the budget: never starve it
        if self._cache.rows + len(request.rows) > self.max_batch_rows:
            return False
        plan = [(len(r.rows), r.longest_row(), r.budget - len(r.generated)) for r in (*self._running, request)]
        return peak_kv_bytes(plan, self.bytes_per_token) <= self.kv_budget_bytes

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._pending or not self._fits(self._pending[0]):
                    return
                request = self._pending.popleft()
            if self.observer is not None:
                self.observer.on_admit(self.variant, time.perf_counter() - request.enqueued_at)
            try:
                request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
                logits, cache = prefill(self.model, self._forward, request.rows)
            except Exception as exc:
                logger.exception("prefill failed")
                self._fail([request], exc)
                continue
            try:
                self._cache.join(cache)
                self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
            except Exception as exc:  # out of memory while merging: the batch is reset by the loop
                self._fail([request], exc)
                raise
            self._running.append(request)

    def _first_rows(self) -> list[int]:
        firsts, row = [], 0
        for request in self._running:
            firsts.append(row)
            row += len(request.rows)
        return firsts

    def _leave(self, leaving: set[int]) -> None:
        """Drop the running requests at positions ``leaving`` (their rows and logits) and finish them."""
        if not leaving:
            return
        firsts = self._first_rows()
        keep_rows = [
            firsts[j] + k
            for j, request in enumerate(self._running)
            if j not in leaving
            for k in range(len(request.rows))
        ]
        for j in sorted(leaving):
            request = self._running[j]
            if request.error is not None:
                request.end()
            else:
                request.finish()
            how = "cancelled" if request.cancelled else "stop id" if request.stopped else "limit"
            logger.info(
                "generated %d ids on %s in %.2fs (%s; %d request(s) in the batch)",
                len(request.generated),
                self.variant,
                time.perf_counter() - request.enqueued_at,
                how,
                len(self._running),
            )
        self._running = [r for j, r in enumerate(self._running) if j not in leaving]
        self._cache.leave(keep_rows)
        if self._logits is not None:
            self._logits = self._logits[torch.tensor(keep_rows, dtype=torch.long, device=self._logits.device)]

    def _step(self) -> None:
        begin = time.perf_counter()
        cancelled = {j for j, r in enumerate(self._running) if r.cancel_requested}
        for j in cancelled:
            self._running[j].cancelled = True
        self._leave(cancelled)
        if not self._running:
            return
        assert self._logits is not None
        requests = len(self._running)
        ids = sample_requests(
            self._logits,
            self._first_rows(),
            [r.spec for r in self._running],
            [r.history for r in self._running],
            [r.generator for r in self._running if r.generator is not None],  # set at admission
        )
        leaving = set()
        for j, (request, token) in enumerate(zip(self._running, ids, strict=True)):
            request.generated.append(token)
            request.publish()
            request.history = [*request.history[1 - REPETITION_WINDOW :], token]
            if request.on_ids is not None:
                try:
                    request.on_ids([token])
                except Exception as exc:
                    logger.exception("on_ids callback failed; ending its request")
                    request.error = exc
            if token in STOP_IDS:
                request.stopped = True
            elif request.cancel_requested:
                request.cancelled = True
            if request.stopped or request.cancelled or request.error or len(request.generated) >= request.budget:
                leaving.add(j)
        kept_ids = [token for j, token in enumerate(ids) if j not in leaving]
        self._leave(leaving)
        rows, width = self._cache.rows, self._cache.width
        if self._running:
            feed = [token for r, token in zip(self._running, kept_ids, strict=True) for _ in r.rows]
            mask = self._cache.mask(1)
            inputs = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]
            self._logits = self._forward(inputs, mask, self._cache)
            self.steps += 1
        else:
            self._logits = None
        if self.observer is not None:
            self.observer.on_step(self.variant, StepStats(requests, rows, width + 1, time.perf_counter() - begin))
