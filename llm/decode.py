"""The one decode loop: requests join and leave a running batch of Step1 at every step.

Every generation the server runs goes through ``DecodeLoop`` (one per loaded variant, driven by
``llm.scheduler.Scheduler``'s thread); ``generate`` drives the same loop synchronously for tests,
benchmarks and library callers. One step, on the loop's thread:

1. **decide** (``_decide``): which waiting requests join, in FIFO order while they fit
   (``max_batch_rows`` cache rows, and the KV budget for the worst case of the batch running to
   its limits), and which running ones leave because their caller cancelled them;
2. **run**: each joining request is prefilled alone and its cache rows join the batch
   (``llm.batching``); one id is sampled for every running request from its own logits with its
   own seed, temperature, top-k and intensity (``llm.sampling``);
3. **apply** (``_apply``): the ids are appended and published to the requests' handles;
   finished requests (stop id, ``max_new_tokens``, ``max_length``) leave at once;
4. **run**: one forward over the remaining rows gives the next step's logits.

A request's ids are those it would get alone: it is prefilled alone, the per-row arithmetic is
the same and the other rows are masked out. Fairness: admission is strictly FIFO, so a request
waiting for room is never overtaken by later ones, and every running request leaves within its
own budget of steps, so the wait of the head of the queue is bounded; inside the batch every
request gets one id per step. A request too big for the KV budget even alone runs alone rather
than never.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from errors import InvalidInputError, NotReadyError
from llm.batching import (
    LastLogits,
    RowKVCache,
    kv_bytes_per_token,
    model_device,
    num_layers,
    peak_kv_bytes,
    prefill,
    request_rows,
)
from llm.generation import Generation, GenerationHandle, Status
from llm.prompts import PromptPair
from llm.sampling import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    STOP_IDS,
    GenerationResult,
    SamplingSpec,
    check_generation_args,
    resolve_seed,
    sample_requests,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """One decode step: requests sampled (= ids produced), cache rows and width of its forward, seconds."""

    requests: int
    rows: int
    width: int
    seconds: float


class DecodeObserver(Protocol):
    """Metrics hooks (``api.metrics`` implements them with Prometheus); called on the loop's thread."""

    def on_admit(self, variant: str, queue_wait_s: float) -> None: ...

    def on_step(self, variant: str, stats: StepStats) -> None: ...


@dataclass(frozen=True)
class _Plan:
    """What one step changes in the batch before it samples."""

    admit: list[Generation]
    cancel: list[Generation]


class DecodeLoop:
    """The running batch of one model and its waiting queue (see the module docstring).

    ``submit`` and ``cancel`` are safe from any thread; ``step`` runs on one thread at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_rows: int = 16,
        kv_budget_bytes: int = 4 * 2**30,
        variant: str = "base",
        observer: DecodeObserver | None = None,
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
        self.batch: list[Generation] = []  # the running requests, in the order of their cache rows
        self.logits: torch.Tensor | None = None  # (rows, vocab) next-token logits of the running rows
        self.changed = threading.Condition()  # guards ``_waiting`` and ``closed``; notified when work arrives
        self.closed = False
        self._waiting: deque[Generation] = deque()
        self._forward = LastLogits(model)
        self._vocab = getattr(model.config, "vocab_size", None)
        self._cache = RowKVCache(num_layers(model), 0)

    # --- any thread ---------------------------------------------------------------------
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
        """Queue one prompt; bad arguments raise InvalidInputError here, before any compute.

        ``seed`` None draws a fresh one (``handle.seed``). ``max_length`` counts the prompt.
        NotReadyError once the loop is closed.
        """
        # checked as given: float() first would turn a wrong type into a bare TypeError or ValueError
        check_generation_args(
            prompt,
            SamplingSpec(intensity, temperature, top_k, bool(do_sample)),
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            vocab_size=self._vocab,
        )
        spec = SamplingSpec(float(intensity), float(temperature), top_k, bool(do_sample))
        budget = max_length - len(prompt.cond)
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        gen = Generation(
            spec=spec,
            seed=resolve_seed(seed),
            budget=budget,
            rows=request_rows(prompt, spec.guided),
        )
        with self.changed:
            if self.closed:
                raise NotReadyError("the generation scheduler is closed")
            self._waiting.append(gen)
            self.changed.notify_all()
        return GenerationHandle(gen, self.cancel)

    def cancel(self, gen: Generation) -> None:
        with self.changed:
            gen.cancel_requested = True
            if gen in self._waiting:  # never ran: it ends now, with no ids
                self._waiting.remove(gen)
                gen.end(Status.CANCELLED)
            self.changed.notify_all()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.batch)

    def kv_cache_bytes(self) -> int:
        """Bytes the running batch's KV cache holds now."""
        return self._cache.nbytes()

    def close(self) -> None:
        """Refuse new requests from now on; whoever drives the loop then calls ``fail_all``."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """End every waiting and running request with ``error`` (the loop is closing)."""
        with self.changed:
            waiting, self._waiting = list(self._waiting), deque()
        for gen in (*waiting, *self.batch):
            gen.end(Status.FAILED, error)
        self._reset()

    # --- the loop's thread ----------------------------------------------------------------
    def admit(self) -> None:
        """The step boundary: cancelled requests leave, waiting ones that fit are prefilled and join.

        ``step`` starts with it; a caller that wants to look at the logits a step will sample
        from (tests) calls it first.
        """
        plan = self._decide()
        self._leave(plan.cancel, Status.CANCELLED)
        for gen in plan.admit:
            self._join(gen)

    def step(self) -> None:
        """One step: ``admit``, then sample one id per running request, apply them, one forward."""
        begin = time.perf_counter()
        self.admit()
        if not self.batch:
            return
        requests, rows, width = len(self.batch), self._cache.rows, self._cache.width
        try:
            ids = self._sample()
            ended = self._apply(ids)
            kept = [token for gen, token in zip(self.batch, ids, strict=True) if gen not in ended]
            self._leave(ended)
            self._run_forward(kept)
        except Exception as exc:  # a failed step fails the requests in it; the loop goes on
            logger.exception("decode step failed; failing %d request(s)", len(self.batch))
            for gen in self.batch:
                gen.end(Status.FAILED, exc)
            self._reset()
        stats = StepStats(requests, rows, width + 1, time.perf_counter() - begin)
        if self.observer is not None:
            try:
                self.observer.on_step(self.variant, stats)
            except Exception:  # metrics never fail a generation
                logger.exception("the decode observer failed")

    def _decide(self) -> _Plan:
        """Cancelled running requests leave; waiting ones join in FIFO order while they fit."""
        cancel = [gen for gen in self.batch if gen.cancel_requested]
        staying = [gen for gen in self.batch if not gen.cancel_requested]
        admit: list[Generation] = []
        with self.changed:
            while self._waiting and self._fits(self._waiting[0], [*staying, *admit]):
                admit.append(self._waiting.popleft())
        return _Plan(admit=admit, cancel=cancel)

    def _fits(self, gen: Generation, batch: Sequence[Generation]) -> bool:
        if not batch:
            return True  # alone it always runs, even past the budget: never starve it
        if sum(len(g.rows) for g in batch) + len(gen.rows) > self.max_batch_rows:
            return False
        plan = [(len(g.rows), g.longest_row(), g.budget - len(g.generated)) for g in (*batch, gen)]
        return peak_kv_bytes(plan, self.bytes_per_token) <= self.kv_budget_bytes

    def _join(self, gen: Generation) -> None:
        """Prefill ``gen`` alone and add its rows and logits to the batch (a failure ends it alone)."""
        if self.observer is not None:
            try:
                self.observer.on_admit(self.variant, time.perf_counter() - gen.enqueued_at)
            except Exception:
                logger.exception("the decode observer failed")
        try:
            gen.generator = torch.Generator(device=self.device).manual_seed(gen.seed)
            logits, cache = prefill(self.model, self._forward, gen.rows)
            self._cache.join(cache)
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        except Exception as exc:
            logger.exception("prefill failed")
            gen.end(Status.FAILED, exc)
            if self._cache.rows != sum(len(g.rows) for g in self.batch):  # failed mid-merge: start over
                for other in self.batch:
                    other.end(Status.FAILED, exc)
                self._reset()
            return
        gen.status = Status.RUNNING
        self.batch.append(gen)

    def first_rows(self) -> list[int]:
        """The cache row of each running request's conditional ids (its unconditional row follows)."""
        firsts, row = [], 0
        for gen in self.batch:
            firsts.append(row)
            row += len(gen.rows)
        return firsts

    def _sample(self) -> list[int]:
        assert self.logits is not None
        return sample_requests(
            self.logits,
            self.first_rows(),
            [g.spec for g in self.batch],
            [g.history for g in self.batch],
            [g.generator for g in self.batch if g.generator is not None],  # set when it joined
        )

    def _apply(self, ids: Sequence[int]) -> list[Generation]:
        """Append each request's id and say which requests end with it (stop id, budget, cancel)."""
        ended = []
        for gen, token in zip(self.batch, ids, strict=True):
            gen.append(token)
            if token in STOP_IDS:
                gen.status = Status.STOPPED
            elif gen.cancel_requested:
                gen.status = Status.CANCELLED
            elif len(gen.generated) >= gen.budget:
                gen.status = Status.LIMIT
            else:
                continue
            ended.append(gen)
        return ended

    def _leave(self, leaving: Sequence[Generation], status: Status | None = None) -> None:
        """Drop ``leaving`` (their rows and logits) from the batch and end them (with ``status`` if given)."""
        if not leaving:
            return
        firsts = self.first_rows()
        keep_rows = [
            firsts[j] + k for j, gen in enumerate(self.batch) if gen not in leaving for k in range(len(gen.rows))
        ]
        for gen in leaving:
            gen.end(status or gen.status)
            logger.info(
                "generated %d ids on %s in %.2fs (%s; %d request(s) in the batch)",
                len(gen.generated),
                self.variant,
                time.perf_counter() - gen.enqueued_at,
                gen.status.value,
                len(self.batch),
            )
        self.batch = [gen for gen in self.batch if gen not in leaving]
        self._cache.leave(keep_rows)
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(keep_rows, dtype=torch.long, device=self.logits.device)]

    def _run_forward(self, ids: Sequence[int]) -> None:
        """One forward of the running rows, each fed its request's new id; its logits are the next step's."""
        if not self.batch:
            self.logits = None
            return
        feed = [token for gen, token in zip(self.batch, ids, strict=True) for _ in gen.rows]
        inputs = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]
        self.logits = self._forward(inputs, self._cache.mask(1), self._cache)
        self.steps += 1

    def _reset(self) -> None:
        self.batch, self.logits = [], None
        self._cache = RowKVCache(num_layers(self.model), 0)


def generate(
    model: nn.Module,
    prompts: Sequence[PromptPair],
    *,
    seed: int | Sequence[int | None] | None = None,
    intensity: float = 1.0,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int | None = None,
    do_sample: bool = True,
) -> list[GenerationResult]:
    """Generate every prompt on this thread through ``DecodeLoop``, all in one batch; results in order.

    ``seed``: one int for all prompts, one per prompt, or None (fresh seeds, reported in the
    results). Each result is what the server's loop gives that prompt alone.
    """
    if isinstance(seed, Sequence):
        if len(seed) != len(prompts):
            raise InvalidInputError(f"got {len(seed)} seeds for {len(prompts)} prompts", param="seed")
        seeds = list(seed)
    else:
        seeds = [seed] * len(prompts)
    if not prompts:
        raise InvalidInputError("no prompts to generate from", param="input")
    loop = DecodeLoop(model, max_batch_rows=max(2, 2 * len(prompts)), kv_budget_bytes=sys.maxsize)
    handles = [
        loop.submit(
            prompt,
            seed=s,
            intensity=intensity,
            temperature=temperature,
            top_k=top_k,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
        )
        for prompt, s in zip(prompts, seeds, strict=True)
    ]
    with torch.inference_mode():
        while loop.busy:
            loop.step()
    return [h.result() for h in handles]
