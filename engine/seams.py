"""How the audio of consecutive text segments is joined: a short pause, and no click at the seams.

Every seam is the same: the last ``FADE_SECONDS`` of the earlier segment fade out (a half cosine),
``pause_s`` of silence follows, and the first ``FADE_SECONDS`` of the later segment fade in. The
ends of the whole are left as they are, so a request of one segment is exactly what it was
before segmentation. Between sentences a speaker pauses anyway; the fades only make sure the
joint never jumps from a non-zero sample to silence (an audible click), whatever the vocoder left
at a segment's edge. ``join_segments`` joins whole segments; ``SeamWriter`` produces the same
samples while the segments stream, holding back only each segment's last fade (10 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from engine.types import AudioSink, SegmentSpan, StreamInfo

FADE_SECONDS = 0.01
DEFAULT_PAUSE_SECONDS = 0.25


def _ramp(n: int, *, rising: bool) -> np.ndarray:
    """A half-cosine ramp of ``n`` samples from 0 to 1 (or 1 to 0), excluding the silent end."""
    x = (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)
    up = 0.5 - 0.5 * np.cos(np.pi * x)
    return (up if rising else up[::-1]).astype(np.float32)


def fade_samples(sample_rate: int) -> int:
    return round(FADE_SECONDS * sample_rate)


def join_segments(
    audios: Sequence[np.ndarray], *, sample_rate: int, pause_s: float = DEFAULT_PAUSE_SECONDS
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The segments joined with the seam above, and each segment's (start, end) sample in the result.

    A ``SeamWriter`` fed each segment whole: the joined and the streamed samples are one code path.
    """
    kept = _Kept()
    writer = SeamWriter(kept, sample_rate=sample_rate, pause_s=pause_s)
    spans: list[tuple[int, int]] = []
    for k, audio in enumerate(audios):
        writer.begin(k)
        writer.put(audio)
        spans.append(writer.end(more=k < len(audios) - 1))
    joined = np.concatenate(kept.pieces) if kept.pieces else np.zeros(0, dtype=np.float32)
    return joined, spans


class _Kept:
    """The ``AudioSink`` that ``join_segments`` writes into: it keeps the pieces."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []

    def start(self, info: StreamInfo) -> None:
        pass

    def put(self, piece: np.ndarray) -> None:
        self.pieces.append(piece)

    def segment(self, span: SegmentSpan) -> None:
        pass


class SeamWriter:
    """An ``AudioSink`` in front of the request's sink that joins streamed segments as ``join_segments`` does.

    The engine calls ``begin(k)`` before segment k's audio and ``end(span, more)`` after it; the
    pieces in between are passed on, except the last fade's worth of samples, held back until
    it is known whether another segment follows (then they fade out and the pause follows).
    """

    def __init__(self, sink: AudioSink, *, sample_rate: int, pause_s: float = DEFAULT_PAUSE_SECONDS) -> None:
        self.sink = sink
        self.pause = np.zeros(round(pause_s * sample_rate), dtype=np.float32)
        self.n_fade = fade_samples(sample_rate)
        self.samples = 0  # samples passed on so far
        self.first_audio = threading.Event()  # set once audio has left (or the first segment ended without any)
        self._started = False
        self._held = np.zeros(0, dtype=np.float32)
        self._fade_in_left = 0  # samples of the current segment still to fade in
        self._segment_start = 0

    # --- AudioSink ----------------------------------------------------------------------
    def start(self, info: StreamInfo) -> None:
        if not self._started:  # every segment's chain announces itself; the client hears one stream
            self._started = True
            self.sink.start(info)

    def put(self, piece: np.ndarray) -> None:
        piece = np.asarray(piece, dtype=np.float32)
        if self._fade_in_left:
            piece = piece.copy()
            done = self.n_fade - self._fade_in_left
            n = min(self._fade_in_left, piece.size)
            piece[:n] *= _ramp(self.n_fade, rising=True)[done : done + n]
            self._fade_in_left -= n
        held = np.concatenate([self._held, piece])
        cut = max(held.size - self.n_fade, 0)
        self._emit(held[:cut])
        self._held = held[cut:]

    def segment(self, span: SegmentSpan) -> None:
        self.sink.segment(span)

    # --- the engine's calls ---------------------------------------------------------------
    def begin(self, index: int) -> None:
        """Segment ``index`` starts: after the first, the pause goes out and its head fades in."""
        if index > 0:
            self._emit(self.pause)
            self._fade_in_left = self.n_fade
        self._segment_start = self.samples

    def end(self, *, more: bool) -> tuple[int, int]:
        """The current segment's audio is complete; returns its (start, end) samples in the stream.

        ``more``: another segment follows (its held-back tail fades out); else it is sent as is.
        """
        tail = self._held  # the segment's last min(fade, length) samples
        if more and tail.size:
            tail = tail * _ramp(tail.size, rising=False)
        self._emit(tail)
        self._held = np.zeros(0, dtype=np.float32)
        self._fade_in_left = 0
        self.first_audio.set()
        return self._segment_start, self.samples

    def _emit(self, piece: np.ndarray) -> None:
        if piece.size:
            self.sink.put(piece)
            self.samples += piece.size
            self.first_audio.set()
