"""Long text in the engine on the tiny bundle: segments generated side by side, delivered in order.

The bound is set low (12 text tokens) so that a few sentences make several segments; every stage
is the real one. What is checked: a long request is exactly its segments requested one by one
(seed + k) joined by ``engine.seams``, whole and streamed; captions locate each segment; at most
``segments_in_flight`` segments generate at once; a cancel stops every segment.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.build import build_engine
from engine.seams import FADE_SECONDS, SeamWriter, join_segments
from engine.tts import StepAudioEngine
from engine.types import AudioInput, CancelToken, CloneRequest, StreamInfo
from engine.voices import load_default_voice
from errors import RequestCancelledError
from llm.decode import StepStats
from model_loader import ModelRegistry, resolve_bundle
from settings import Settings
from tests.sinks import Collect

TEXT = (
    "The first sentence is short. Here comes a second one, a little longer than the first. "
    "A third sentence follows it. And the fourth one closes the paragraph."
)
SR = 24000


class Steps:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def on_admit(self, variant: str, queue_wait_s: float) -> None:
        pass

    def on_step(self, variant: str, stats: StepStats) -> None:
        self.steps.append(stats)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> StepAudioEngine:
    registry = ModelRegistry(resolve_bundle(tiny_bundle), torch.device("cpu"), torch.float32)
    settings = Settings(
        model_path=tiny_bundle,
        cache_dir=tmp_path_factory.mktemp("long-text-cache"),
        device="cpu",
        torch_dtype="float32",
        segment_max_tokens=12,
        segments_in_flight=2,
    )
    return build_engine(settings, registry=registry, max_new_tokens=20)


@pytest.fixture(scope="module")
def voice() -> tuple[AudioInput, str]:
    return load_default_voice()


def request(voice: tuple[AudioInput, str], text: str, seed: int, **kwargs: object) -> CloneRequest:
    audio, transcript = voice
    return CloneRequest(prompt_audio=audio, prompt_text=transcript, text=text, seed=seed, **kwargs)  # type: ignore[arg-type]


def test_a_long_clone_is_its_segments_one_by_one_joined(engine: StepAudioEngine, voice) -> None:
    segments = engine.segments(TEXT)
    assert len(segments) >= 3
    result = engine.clone(request(voice, TEXT, seed=40))
    alone = [engine.clone(request(voice, s.text, seed=40 + k)).audio for k, s in enumerate(segments)]
    joined, spans = join_segments(alone, sample_rate=SR, pause_s=engine.pause_s)
    np.testing.assert_array_equal(result.audio, joined)
    assert [(s.start, s.end) for s in result.segments] == spans
    assert [s.text for s in result.segments] == [s.text for s in segments]
    assert [s.seed for s in result.segments] == [40 + k for k in range(len(segments))]
    assert [s.chars for s in result.segments] == [(s.start, s.end) for s in segments]
    assert [label.segment for label in result.labels] == list(range(len(segments)))
    assert result.n_audio_tokens > 0 and len(result.iterations) == len(segments)
    # the tiny bundle's random LLM rarely stops by itself: segments that hit the cap say so
    assert result.cut_short == any(s.cut_short for s in result.segments) is True


def test_a_streamed_long_clone_is_the_streamed_segments_joined(engine: StepAudioEngine, voice) -> None:
    segments = engine.segments(TEXT)
    sink = Collect()
    result = engine.clone(request(voice, TEXT, seed=7), sink=sink)
    assert sink.info is not None and sink.info.segments == len(segments)
    streamed_alone = []
    for k, s in enumerate(segments):
        one = Collect()
        engine.clone(request(voice, s.text, seed=7 + k), sink=one)
        streamed_alone.append(one.audio)
    joined, spans = join_segments(streamed_alone, sample_rate=SR, pause_s=engine.pause_s)
    np.testing.assert_array_equal(sink.audio, joined)
    np.testing.assert_array_equal(result.audio, joined)
    assert [(s.start, s.end) for s in sink.spans] == spans == [(s.start, s.end) for s in result.segments]
    assert [s.index for s in sink.spans] == list(range(len(segments)))


def test_at_most_the_configured_segments_generate_at_once(engine: StepAudioEngine, voice) -> None:
    steps = Steps()
    scheduler = engine.synthesizer.schedulers["base"]
    scheduler.observer = steps
    try:
        engine.clone(request(voice, TEXT, seed=3))
    finally:
        scheduler.observer = None
    sizes = [s.requests for s in steps.steps]
    assert max(sizes) == engine.segments_in_flight == 2  # side by side, and never more


def test_cancelling_a_long_clone_stops_every_segment(engine: StepAudioEngine, voice) -> None:
    cancel = CancelToken()
    sink = Collect(cancel_after_first=cancel)
    scheduler = engine.synthesizer.schedulers["base"]
    with pytest.raises(RequestCancelledError):
        engine.clone(request(voice, TEXT, seed=5), sink=sink, cancel=cancel)
    deadline = time.monotonic() + 30
    while scheduler.running or scheduler.queued:
        assert time.monotonic() < deadline, "a segment kept generating after the cancel"
        time.sleep(0.01)
    assert len(sink.spans) == 0  # no segment was finished after the first piece left


def test_seams_fade_and_pause_and_the_writer_matches_the_join() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.uniform(0.5, 1.0, n).astype(np.float32) for n in (1000, 100, 3000)]
    joined, spans = join_segments(parts, sample_rate=SR, pause_s=0.1)
    fade = round(FADE_SECONDS * SR)
    assert spans[1][0] - spans[0][1] == spans[2][0] - spans[1][1] == round(0.1 * SR)
    assert np.all(joined[spans[0][1] : spans[1][0]] == 0)  # the pause is silence
    assert abs(joined[spans[0][1] - 1]) < 0.05 and abs(joined[spans[2][0]]) < 0.05  # no jump into or out of it
    np.testing.assert_array_equal(joined[: spans[0][1] - fade], parts[0][:-fade])  # away from seams, untouched
    np.testing.assert_array_equal(joined[spans[2][0] + fade :], parts[2][fade:])
    sink = Collect()
    writer = SeamWriter(sink, sample_rate=SR, pause_s=0.1)
    writer.start(StreamInfo(0, 1.0, SR, 1))
    for k, part in enumerate(parts):
        writer.begin(k)
        for piece in np.array_split(part, 7):  # any split into pieces gives the same samples
            writer.put(piece)
        assert writer.end(more=k < len(parts) - 1) == spans[k]
    np.testing.assert_array_equal(sink.audio, joined)
    one, _ = join_segments(parts[:1], sample_rate=SR)
    np.testing.assert_array_equal(one, parts[0])  # a single segment is left as it is


def test_a_chain_after_a_long_clone_edits_each_segment_with_its_own_text(engine: StepAudioEngine, voice) -> None:
    """clone + emotion over a long text = per segment k: clone(seed + k), then its edit (seed + k + 1) of that
    clone's audio heard as that segment's text; the segments' edited audio joined."""
    from audio import VOCODER_SR
    from engine.synthesizer import pcm16_round_trip
    from engine.types import EditRequest, EditStep

    segments = engine.segments(TEXT)
    edits = (EditStep("emotion", "happy"),)
    result = engine.clone(request(voice, TEXT, seed=60, edits=edits))
    assert [(label.segment, label.step) for label in result.labels] == [
        (k, step) for k in range(len(segments)) for step in (0, 1)
    ]
    by_hand = []
    for k, s in enumerate(segments):
        cloned = engine.clone(request(voice, s.text, seed=60 + k))
        edited = engine.edit(
            EditRequest(
                AudioInput(pcm16_round_trip(cloned.audio)[None], VOCODER_SR),
                s.text,
                "emotion",
                "happy",
                seed=60 + k + 1,
            )
        )
        by_hand.append(edited.audio)
    joined, _ = join_segments(by_hand, sample_rate=SR, pause_s=engine.pause_s)
    np.testing.assert_array_equal(result.audio, joined)
