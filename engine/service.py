"""The request queue between the async HTTP layer and the blocking engine.

Inference never runs on the event loop: ``InferenceService.submit`` puts a job in a bounded
queue and awaits its future while worker threads run jobs under ``torch.inference_mode()``.

- A full queue answers at once with ``BusyError`` (429 + Retry-After), never by waiting;
  ``refuse_if_full`` lets the HTTP layer answer so before it reads the request's body.
- Retry-After is the queue ahead drained by the workers at the measured job time: an average
  over finished jobs, the first one replacing any prior; before any job has finished, the
  longest-running job's elapsed time stands in (a measured lower bound, never a guess).
- A caller that goes away (its task is cancelled, e.g. the client disconnected) frees its place:
  a queued job is removed; a running job is told through its ``cancel`` event (the engine then
  stops within one decode step) and its result is dropped.
- Jobs carry a ``kind`` and a ``request``; a worker takes jobs through ``_take_batch`` and runs
  them through ``_run_batch``. Today a batch is one job; batching several compatible requests
  into one generation only has to change those two methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from engine.types import CancelToken
from errors import BusyError, NotReadyError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_JOB_TIME_WEIGHT = 0.2  # weight of the newest finished job in the running average of job time


@dataclass
class Job(Generic[T]):
    """One unit of work: ``run()`` computes the result in a worker thread."""

    kind: str
    run: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    request: Any = None  # the engine request, for a future batching worker
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    cancelled: bool = False
    cancel: CancelToken | None = None  # set when the caller goes away, for a running job to see


@dataclass(frozen=True)
class JobTiming:
    queue_wait_s: float
    run_s: float


class InferenceService:
    """Bounded queue + ``workers`` threads running blocking jobs under ``torch.inference_mode``."""

    def __init__(self, queue_size: int, workers: int = 1) -> None:
        if queue_size < 1 or workers < 1:
            raise ValueError("queue_size and workers must be >= 1")
        self.queue_size = queue_size
        self.workers = workers
        self._queue: deque[Job[Any]] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._stopping = False
        self._avg_job_s: float | None = None  # measured; None until a job has finished
        self._started: dict[int, float] = {}  # id(job) -> start time, of the jobs running now
        self.completed = 0
        self.rejected = 0

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            self._threads = [
                threading.Thread(target=self._worker, name=f"inference-{i}", daemon=True) for i in range(self.workers)
            ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse queued jobs, let running ones end, join the workers."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            self._resolve(job, error=NotReadyError("the server is shutting down"))
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    # --- state -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def job_seconds(self) -> float:
        """The measured time of one job: the running average, or before any has finished the
        elapsed time of the longest-running job (0 when idle)."""
        with self._cond:
            if self._avg_job_s is not None:
                return self._avg_job_s
            now = time.perf_counter()
            return max((now - t for t in self._started.values()), default=0.0)

    def retry_after(self) -> float:
        """Seconds until the queue ahead is likely drained by the workers (at least 1)."""
        ahead = len(self._queue) + self._running
        return max(1.0, self.job_seconds() * ahead / self.workers)

    def refuse_if_full(self) -> None:
        """``BusyError`` with its Retry-After when no place is left in the queue."""
        with self._cond:
            if len(self._queue) < self.queue_size:
                return
            self.rejected += 1
        raise BusyError(
            f"the request queue is full ({self.queue_size} waiting); retry later", retry_after=self.retry_after()
        )

    # --- submission ---------------------------------------------------------------------
    async def submit(
        self, kind: str, run: Callable[[], T], request: Any = None, cancel: CancelToken | None = None
    ) -> tuple[T, JobTiming]:
        """Queue ``run`` and await its result; raises ``BusyError`` at once when full.

        Cancelling the awaiting task (client gone) removes a job that has not started, and sets
        ``cancel`` so a running one can stop early.
        """
        loop = asyncio.get_running_loop()
        job: Job[T] = Job(kind=kind, run=run, loop=loop, future=loop.create_future(), request=request, cancel=cancel)
        with self._cond:
            if self._stopping or not self._threads:
                raise NotReadyError("the inference workers are not running")
            self.refuse_if_full()
            self._queue.append(job)
            self._cond.notify()
        try:
            result = await job.future
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        assert job.started_at is not None
        done = time.perf_counter()
        return result, JobTiming(queue_wait_s=job.started_at - job.enqueued_at, run_s=done - job.started_at)

    def _cancel(self, job: Job[Any]) -> None:
        with self._cond:
            job.cancelled = True
            if job.cancel is not None:
                job.cancel.set()
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
                logger.info("dropped a queued %s job: its client went away", job.kind)

    # --- workers -------------------------------------------------------------------------
    def _take_batch(self) -> list[Job[Any]] | None:
        """Block for the next job(s); None when stopping. The place to group compatible jobs."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.started_at = time.perf_counter()
            self._started[id(job)] = job.started_at
            self._running += 1
            return [job]

    def _run_batch(self, batch: list[Job[Any]]) -> None:
        for job in batch:
            if job.cancelled:
                continue
            try:
                with torch.inference_mode():
                    result = job.run()
            except BaseException as exc:  # delivered to the awaiting request, which maps it
                self._resolve(job, error=exc)
            else:
                self._resolve(job, result=result)

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            t0 = time.perf_counter()
            try:
                self._run_batch(batch)
            finally:
                elapsed = time.perf_counter() - t0
                per_job = elapsed / max(1, len(batch))
                with self._cond:
                    self._running -= len(batch)
                    self.completed += len(batch)
                    for job in batch:
                        self._started.pop(id(job), None)
                    if self._avg_job_s is None:
                        self._avg_job_s = per_job
                    else:
                        self._avg_job_s += _JOB_TIME_WEIGHT * (per_job - self._avg_job_s)

    @staticmethod
    def _resolve(job: Job[Any], *, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        if job.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between; nobody waits any more
            job.loop.call_soon_threadsafe(settle)
