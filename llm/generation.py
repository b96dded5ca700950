"""One generation request's state, and the handle its caller holds (``llm.decode`` runs it).

A request's state is one ``Status``; the loop's thread writes it and the ids, under the
request's condition, and the handle reads them from any thread: ``ids()`` streams them as they
are sampled, ``result()`` waits for the end.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from llm.sampling import REPETITION_WINDOW, Ending, GenerationResult, SamplingSpec, postprocess


class Status(enum.Enum):
    """Where a request is: waiting for room, in the batch, or ended (and why)."""

    WAITING = "waiting"
    RUNNING = "running"
    STOPPED = "stopped"  # its stop id
    LIMIT = "limit"  # max_new_tokens or max_length: its audio is cut short
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


_ENDINGS = {Status.STOPPED: Ending.STOP, Status.LIMIT: Ending.LIMIT, Status.CANCELLED: Ending.CANCELLED}


@dataclass(eq=False)
class Generation:
    """One request in the loop. Written by the loop's thread; read by its handle on any thread."""

    spec: SamplingSpec
    seed: int
    budget: int  # ids it may generate: min(max_new_tokens, max_length - prompt)
    rows: list[list[int]]
    status: Status = Status.WAITING
    cancel_requested: bool = False  # set by its caller; the loop ends it at the next step boundary
    error: BaseException | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    progress: threading.Condition = field(default_factory=threading.Condition)  # wakes readers of ``generated``

    @property
    def history(self) -> list[int]:
        """The last ids of the conditional row (prompt, then generated), for the repetition rule.

        Only the tails are joined, so reading it costs no copy of the whole row per step.
        """
        return (self.rows[0][-REPETITION_WINDOW:] + self.generated[-REPETITION_WINDOW:])[-REPETITION_WINDOW:]

    def longest_row(self) -> int:
        return max(len(r) for r in self.rows) + len(self.generated)

    def append(self, token: int) -> None:
        with self.progress:
            self.generated.append(token)
            self.progress.notify_all()

    def end(self, status: Status, error: BaseException | None = None) -> None:
        with self.progress:
            self.status, self.error = status, error
            self.progress.notify_all()


class GenerationHandle:
    """A submitted request: its ids as they come, its result, and a way to stop it."""

    def __init__(self, generation: Generation, cancel: Callable[[Generation], None]) -> None:
        self._gen = generation
        self._cancel = cancel

    @property
    def seed(self) -> int:
        return self._gen.seed

    @property
    def steps_run(self) -> int:
        """Decode steps this request took part in (= ids sampled for it)."""
        return len(self._gen.generated)

    @property
    def status(self) -> Status:
        return self._gen.status

    def done(self) -> bool:
        return self._gen.status.ended

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue, a running one before its next step."""
        self._cancel(self._gen)

    def ids(self, timeout: float | None = None) -> Iterator[int]:
        """The request's ids as they are sampled, final stop id included, for a reader on another thread.

        Ends when the request has ended; raises what failed it, or TimeoutError when no id comes
        for ``timeout`` seconds.
        """
        gen, sent = self._gen, 0
        while True:
            with gen.progress:
                while len(gen.generated) == sent and not gen.status.ended:
                    if not gen.progress.wait(timeout):
                        raise TimeoutError(f"no id within {timeout}s")
                new, ended = gen.generated[sent:], gen.status.ended
            yield from new
            sent += len(new)
            if ended and sent == len(gen.generated):
                break
        if gen.error is not None:
            raise gen.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The request's outcome (``ending`` says what ended it); raises what failed it.

        TimeoutError when it has not ended within ``timeout`` seconds.
        """
        gen = self._gen
        with gen.progress:
            if not gen.progress.wait_for(lambda: gen.status.ended, timeout):
                raise TimeoutError(f"generation not done within {timeout}s")
        if gen.error is not None:
            raise gen.error
        return GenerationResult(
            token_ids=np.asarray(gen.generated, dtype=np.int64),
            codes=postprocess(gen.generated),
            seed=gen.seed,
            ending=_ENDINGS[gen.status],
        )
