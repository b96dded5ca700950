"""Text that arrives while it is spoken: complete sentences cut into segments as the text grows.

A voice agent's text comes from an LLM a few tokens at a time. ``TextCutter`` holds what has come
and hands out segments as soon as they are final: every sentence once the next one has begun (a
bare final ``.`` may still turn out to be ``Dr.`` or ``3.14``, and a space after it proves
nothing), merged up to the segment bound as ``engine.segments.split_text`` merges them, and, for a text that
runs past the bound without a sentence end, every piece but the last as ``split_text`` cuts it.
``finish`` hands out the rest. Segments carry their offsets in the text given so far, so captions
point into what the client sent.

``SegmentFeed`` carries the segments from the event loop to the engine: the engine's submitter
thread iterates it (``StepAudioEngine.clone(text=...)``) and blocks until the next segment comes or
the feed is closed.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from engine.segments import Segment, split_sentences, split_text

_END = object()


class TextCutter:
    """Growing text in, final segments out (see the module docstring)."""

    def __init__(self, *, count_tokens: Callable[[str], int], max_tokens: int) -> None:
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.text = ""
        self._done = 0  # characters already handed out as segments

    def feed(self, delta: str) -> list[Segment]:
        """Add ``delta``; the segments that became final."""
        self.text += delta
        rest = self.text[self._done :]
        sentences = split_sentences(rest)
        # every sentence but the last is whole: the next one has begun after it
        complete = sentences[-2].end if len(sentences) >= 2 else 0
        if complete:
            return self._hand_out(rest[:complete], every=True)
        if self.count_tokens(rest) > self.max_tokens:  # no sentence end within the bound: cut as split_text does
            return self._hand_out(rest, every=False)
        return []

    def finish(self) -> list[Segment]:
        """Everything not handed out yet (the text is complete)."""
        return self._hand_out(self.text[self._done :], every=True)

    def _hand_out(self, text: str, *, every: bool) -> list[Segment]:
        segments = split_text(text, count_tokens=self.count_tokens, max_tokens=self.max_tokens)
        if not every:
            segments = segments[:-1]
        if not segments:
            return []
        base = self._done
        self._done = base + segments[-1].end
        return [Segment(s.text, base + s.start, base + s.end) for s in segments]


class SegmentFeed:
    """Segments handed from the event loop to the engine's thread, in order, until ``close``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()

    def put(self, segment: Segment) -> None:
        self._queue.put(segment)

    def close(self) -> None:
        """No more segments: the engine finishes those it has and ends the request."""
        self._queue.put(_END)

    def __iter__(self) -> Iterator[Segment]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            assert isinstance(item, Segment)
            yield item
