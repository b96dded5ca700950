"""A clone's text segments generated side by side and delivered strictly in order.

One request, two threads:

* the **submitter** (a thread of its own) takes the segments as they become known (all at once
  for a request's text, one by one for text that arrives while it is spoken), builds each one's
  clone prompt from the voice prepared once, and submits its first generation to the variant's
  decode loop, where it joins the running batch beside the others;
* the request's **worker** thread takes the segments in order and finishes each: it streams or
  vocodes its generation (and runs its edit chain, if the request has one), so segment k+1's
  audio goes out right after segment k's, while later segments are still being generated.

At most ``segments_in_flight`` segments are submitted and not yet finished: a long request holds
that many rows of the batch at most, and the decode loop's FIFO admission lets other requests in
between (docs/long-text.md, "Fairness"). When the response streams, segment 1 and later are
submitted only once segment 0's first audio has left, so a long text's first audio comes as fast
as a short one's. Cancelling the request (its ``CancelToken``) stops every submitted segment.
Segment k's generations use seed + k (its edits seed + k + 1, ...), so the request is exactly its
segments requested one by one with those seeds, joined by ``engine.seams``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from audio import VOCODER_SR
from engine.chains import generation_seed, split_inline_tags
from engine.normalize import normalize_text
from engine.prompting import CloneVoice, PreparedPrompt, PromptPreparer
from engine.runs import ChainRun, RequestRun
from engine.seams import SeamWriter
from engine.segments import Segment
from engine.synthesizer import raise_if_cancelled
from engine.types import AudioSink, EditStep, SegmentSpan
from llm.generation import GenerationHandle

POLL_S = 0.05  # how often a waiting thread looks at the cancel token


@dataclass(frozen=True)
class SegmentChain:
    """One segment ready to finish: its text, its clone prompt, its submitted first generation, its edits."""

    index: int
    segment: Segment
    spoken: str  # the text the clone speaks (inline tags removed; a paralinguistic step puts them back)
    steps: tuple[EditStep, ...]
    seed: int
    prompt: PreparedPrompt
    handle: GenerationHandle


class ChainRunner(Protocol):
    """What the pipeline needs of the engine (``engine.tts.StepAudioEngine``)."""

    preparer: PromptPreparer
    segments_in_flight: int
    pause_s: float

    def check_steps(self, steps: Sequence[EditStep]) -> tuple[EditStep, ...]: ...

    def submit(self, run: RequestRun, prompt: PreparedPrompt, seed: int) -> GenerationHandle: ...

    def run_clone_chain(self, run: RequestRun, item: SegmentChain, sink: AudioSink | None) -> ChainRun: ...


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class _Submitter:
    """Submits the segments' first generations ahead of the worker, at most ``limit`` unfinished."""

    def __init__(
        self,
        engine: ChainRunner,
        run: RequestRun,
        voice: CloneVoice,
        text: Iterable[Segment],
        steps: tuple[EditStep, ...],
        *,
        hold_after_first: threading.Event | None,
    ) -> None:
        self.engine, self.run, self.voice, self.text, self.steps = engine, run, voice, text, steps
        self.ready: queue.Queue[object] = queue.Queue()
        self.handles: list[GenerationHandle] = []
        self.slots = threading.Semaphore(max(1, engine.segments_in_flight))
        self.stop = threading.Event()
        self.hold_after_first = hold_after_first  # set once the first audio has left
        self.thread = threading.Thread(target=self._submit_all, name="segment-submitter", daemon=True)

    def _wait(self, event: threading.Event | threading.Semaphore) -> bool:
        """Wait for ``event`` (or a free slot) unless the request is stopped or cancelled first."""
        while not self.stop.is_set():
            raise_if_cancelled(self.run.cancel)
            done = event.acquire(timeout=POLL_S) if isinstance(event, threading.Semaphore) else event.wait(POLL_S)
            if done:
                return True
        return False

    def _submit_all(self) -> None:
        try:
            for k, segment in enumerate(self.text):
                if not self._wait(self.slots):
                    return
                if k == 1 and self.hold_after_first is not None and not self._wait(self.hold_after_first):
                    return
                self.ready.put(self._submit(k, segment))
            self.ready.put(_END)
        except BaseException as exc:  # delivered to the worker, which raises it
            self.ready.put(_Failed(exc))

    def _submit(self, k: int, segment: Segment) -> SegmentChain:
        engine, steps = self.engine, self.steps
        text = normalize_text(segment.text) if self.run.request.normalize_text else segment.text
        inline = split_inline_tags(text)
        spoken = inline.spoken if inline is not None else text
        if inline is not None:  # the tags are realised by a paralinguistic edit of this segment
            steps = (*engine.check_steps([EditStep("paralinguistic", text=inline.tagged)]), *steps)
        seed = generation_seed(self.run.seed, k)
        prompt = engine.preparer.clone_prompt(self.voice, spoken)
        handle = engine.submit(self.run, prompt, seed)
        self.handles.append(handle)
        return SegmentChain(k, segment, spoken, steps, seed, prompt, handle)

    def next(self) -> SegmentChain | None:
        """The next segment in order (None after the last), raising what failed the submitter."""
        while True:
            raise_if_cancelled(self.run.cancel)
            try:
                item = self.ready.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, _Failed):
                raise item.error
            return item if isinstance(item, SegmentChain) else None

    def close(self) -> None:
        """Stop submitting and stop every generation still running (a no-op for finished ones)."""
        self.stop.set()
        for handle in self.handles:
            handle.cancel()
        self.thread.join(timeout=5.0)


def speak_segments(
    engine: ChainRunner,
    run: RequestRun,
    voice: CloneVoice,
    text: Iterable[Segment],
    steps: tuple[EditStep, ...],
) -> Sequence[tuple[Segment, ChainRun]]:
    """Every segment's chain, finished in order (see the module docstring)."""
    writer = SeamWriter(run.sink, sample_rate=VOCODER_SR, pause_s=engine.pause_s) if run.sink else None
    submitter = _Submitter(engine, run, voice, text, steps, hold_after_first=writer.first_audio if writer else None)
    submitter.thread.start()
    chains: list[tuple[Segment, ChainRun]] = []
    try:
        item = submitter.next()
        while item is not None:
            if writer is not None:
                writer.begin(item.index)
            chain = engine.run_clone_chain(run, item, writer)
            submitter.slots.release()
            following = submitter.next()
            if writer is not None:
                start, end = writer.end(more=following is not None)
                writer.segment(
                    SegmentSpan.of(item.index, item.segment, start, end, seed=item.seed, cut_short=chain.cut_short)
                )
            chains.append((item.segment, chain))
            item = following
    finally:
        submitter.close()
    return chains
