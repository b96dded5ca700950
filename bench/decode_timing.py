"""Timing the server's decode loop: the helpers ``bench_llm``, ``bench_scheduler`` and ``gpu_check`` share.

Every figure comes from ``llm.scheduler.Scheduler`` (the decode loop the server runs, one thread
per variant) as its observer sees each step: ``StepRecorder`` keeps the steps and passes them on
to the observer already installed (the server's Prometheus metrics in ``gpu_check``), so timing a
running server changes nothing it reports. The first request holds the loop in its first step
until the others are queued, so the whole batch runs from the second step on.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from audio_codes import AUDIO_ID_OFFSET, N_MIXED_CODES
from llm.decode import DecodeObserver, StepStats
from llm.generation import GenerationHandle
from llm.prompts import PromptPair
from llm.sampling import SamplingSpec
from llm.scheduler import Scheduler

AUDIO_IDS = (AUDIO_ID_OFFSET, AUDIO_ID_OFFSET + N_MIXED_CODES)
HOLD_TIMEOUT_S = 600.0  # a held loop goes on by itself after this, whatever happened to its holder


class StepRecorder:
    """A ``DecodeObserver`` that keeps every step, passes it on, and can hold the loop in its first step."""

    def __init__(self, inner: DecodeObserver | None = None, *, hold: bool = False) -> None:
        self.inner = inner
        self.steps: list[StepStats] = []
        self.waits: list[float] = []  # each admission's queue wait
        self.holding = threading.Event()  # set while the loop waits in its first step
        self._release = threading.Event()
        if not hold:
            self._release.set()

    def release(self) -> None:
        self._release.set()

    def on_admit(self, variant: str, queue_wait_s: float) -> None:
        self.waits.append(queue_wait_s)
        if self.inner is not None:
            self.inner.on_admit(variant, queue_wait_s)

    def on_step(self, variant: str, stats: StepStats) -> None:
        self.steps.append(stats)
        if self.inner is not None:
            self.inner.on_step(variant, stats)
        if not self._release.is_set():
            self.holding.set()
            self._release.wait(HOLD_TIMEOUT_S)


@dataclass(frozen=True)
class DecodeTiming:
    """The steps of ``batch`` requests decoded together, and what they produced."""

    batch: int
    rows: int
    ids: int
    wall_s: float
    steps: list[StepStats]

    @property
    def full_batch_tokens_per_s(self) -> float:
        """Requests / median step seconds while the whole batch runs (skipping the first such step,
        which also prefilled the joiners): the rate of a full batch, robust on a shared machine."""
        full = [s.seconds for s in self.steps[1:] if s.requests == self.batch][1:]
        if not full:
            raise RuntimeError(f"no step ran all {self.batch} requests together")
        return self.batch / statistics.median(full)

    @property
    def all_steps_tokens_per_s(self) -> float:
        """Ids over the seconds of every step after the held one (prefills included)."""
        steps = self.steps[1:]
        return sum(s.requests for s in steps) / max(sum(s.seconds for s in steps), 1e-9)


def audio_prompts(batch: int, context: int, *, seed: int = 0) -> list[PromptPair]:
    """``batch`` audio-id prompts, prompt r shorter by 7r ids (as real requests differ); the
    unconditional row is the prompt's last half (for guided runs)."""
    gen = torch.Generator().manual_seed(batch * 1000 + context + seed)
    out = []
    for row in range(batch):
        ids = torch.randint(*AUDIO_IDS, (max(context - 7 * row, 8),), generator=gen).tolist()
        out.append(PromptPair(cond=ids, uncond=ids[len(ids) // 2 :]))
    return out


def time_decode(
    scheduler: Scheduler,
    prompts: Sequence[PromptPair],
    *,
    max_new_tokens: int,
    intensity: float = 1.0,
    do_sample: bool = False,
) -> DecodeTiming:
    """Decode ``prompts`` together on ``scheduler`` (each with seed = its index) and time its steps."""
    recorder = StepRecorder(scheduler.observer, hold=len(prompts) > 1)
    scheduler.observer = recorder

    def submit(index: int) -> GenerationHandle:
        return scheduler.submit(
            prompts[index], seed=index, max_new_tokens=max_new_tokens, intensity=intensity, do_sample=do_sample
        )

    try:
        start = time.perf_counter()
        handles = [submit(0)]
        if len(prompts) > 1:
            if not recorder.holding.wait(HOLD_TIMEOUT_S):
                raise RuntimeError("the decode loop never ran its first step")
            handles += [submit(i) for i in range(1, len(prompts))]
            recorder.release()
        ids = sum(len(h.result(HOLD_TIMEOUT_S).token_ids) for h in handles)
        wall = time.perf_counter() - start
    finally:
        recorder.release()
        scheduler.observer = recorder.inner
    rows = len(prompts) * (2 if SamplingSpec(intensity=intensity).guided else 1)
    return DecodeTiming(batch=len(prompts), rows=rows, ids=ids, wall_s=wall, steps=recorder.steps)
