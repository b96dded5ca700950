"""An ``AudioSink`` for engine tests: keeps what a streamed request gives it (and can cancel it)."""

from __future__ import annotations

import numpy as np

from engine.types import CancelToken, SegmentSpan, StreamInfo


class Collect:
    """Keeps the stream's info, its pieces and its segments' captions; with ``cancel_after_first``
    it sets that token once the first piece has come (a client that leaves mid-stream)."""

    def __init__(self, cancel_after_first: CancelToken | None = None) -> None:
        self.info: StreamInfo | None = None
        self.pieces: list[np.ndarray] = []
        self.spans: list[SegmentSpan] = []
        self._cancel = cancel_after_first

    def start(self, info: StreamInfo) -> None:
        assert self.info is None, "start is called once"
        self.info = info

    def put(self, piece: np.ndarray) -> None:
        assert self.info is not None, "audio before start"
        self.pieces.append(piece)
        if self._cancel is not None:
            self._cancel.set()

    def segment(self, span: SegmentSpan) -> None:
        self.spans.append(span)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)
