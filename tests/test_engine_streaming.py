"""Streaming clone/edit in the engine on the tiny bundle: the LLM samples while the streaming vocoder works.

What is checked: the streamed pieces are the streaming vocoder's output for exactly the codes the
LLM generated (the same bytes whatever the thread timing), the whole-request path is unchanged,
only the last edit iteration streams, and a cancelled request stops generating at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import synthesizer
from engine.build import build_engine
from engine.synthesizer import change_speed
from engine.tts import StepAudioEngine
from engine.types import AudioInput, CancelToken, CloneRequest, EditRequest
from engine.voices import load_default_voice
from errors import RequestCancelledError
from llm.decode import generate
from model_loader import ModelRegistry, resolve_bundle
from settings import Settings
from tests.sinks import Collect
from vocoder.stream import Token2WavStream

MAX_NEW_TOKENS = 120  # 24 groups: several streaming chunks (15, 24, 48 token frames ...)


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> StepAudioEngine:
    registry = ModelRegistry(resolve_bundle(tiny_bundle), torch.device("cpu"), torch.float32)
    settings = Settings(
        model_path=tiny_bundle, cache_dir=tmp_path_factory.mktemp("stream-cache"), device="cpu", torch_dtype="float32"
    )
    return build_engine(settings, registry=registry, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def voice() -> tuple[AudioInput, str]:
    return load_default_voice()


def _clone_request(voice: tuple[AudioInput, str], **kwargs: object) -> CloneRequest:
    audio, text = voice
    fields = {"prompt_audio": audio, "prompt_text": text, "text": "Streaming while generating.", "seed": 21}
    return CloneRequest(**(fields | kwargs))  # type: ignore[arg-type]


def _codes(engine: StepAudioEngine, request: CloneRequest) -> np.ndarray:
    """The codes the engine's LLM makes for ``request`` (same options and seed as the engine)."""
    prepared = engine.preparer.clone(request)
    synth = engine.synthesizer
    opts = synth.options
    (result,) = generate(
        synth.schedulers[request.variant].model,
        [prepared.pair],
        intensity=request.intensity,
        seed=request.seed,
        temperature=opts.temperature,
        top_k=opts.top_k,
        max_length=opts.max_length,
        max_new_tokens=opts.max_new_tokens,
    )
    return result.codes


def test_streamed_clone_is_the_streaming_vocoder_on_the_generated_codes(engine, voice) -> None:
    request = _clone_request(voice)
    sink = Collect()
    result = engine.clone(request, sink=sink)
    assert sink.info is not None and sink.info.seed == 21 and sink.info.iterations == 1
    assert len(sink.pieces) > 1, "a long generation streams in several pieces"
    np.testing.assert_array_equal(sink.audio, result.audio)
    codes = _codes(engine, request)
    assert result.n_audio_tokens == codes.size
    features = engine.preparer.clone(request).features
    with Token2WavStream(
        engine.synthesizer.token2wav,
        np.asarray(features.tokens.prompt_codes),
        features.prompt_mel,
        features.spk_emb,
        seed=21,
    ) as session:
        expected = np.concatenate([*session.feed(codes), *session.finish()])
    np.testing.assert_array_equal(result.audio, expected)
    first = result.timings.first_audio_ids
    assert first is not None and 0 < first <= (result.timings.streamed_ids or 0) >= codes.size


def test_streamed_audio_does_not_depend_on_thread_timing(engine, voice) -> None:
    runs = []
    for _ in range(3):
        sink = Collect()
        engine.clone(_clone_request(voice, seed=8), sink=sink)
        runs.append(sink.audio)
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


def test_whole_requests_are_unchanged_by_streaming(engine, voice) -> None:
    """Without a sink the whole-utterance vocoder runs (the reference output), as before."""
    request = _clone_request(voice, seed=3)
    whole = engine.clone(request)
    codes = _codes(engine, request)
    features = engine.preparer.clone(request).features
    with torch.inference_mode():
        expected = engine.synthesizer.token2wav.token2wav(
            torch.from_numpy(codes),
            torch.as_tensor(np.asarray(features.tokens.prompt_codes)),
            features.prompt_mel,
            features.spk_emb,
            seed=3,
        )
    np.testing.assert_array_equal(whole.audio, expected.reshape(-1).numpy())


def test_only_the_last_edit_iteration_streams(engine, voice) -> None:
    audio, text = voice
    request = EditRequest(audio=audio, audio_text=text, mode="emotion", edit_info="happy", n_edit_iter=2, seed=4)
    whole = engine.edit(request)
    sink = Collect()
    streamed = engine.edit(request, sink=sink)
    assert sink.info is not None and sink.info.iterations == 2
    np.testing.assert_array_equal(streamed.iterations[0], whole.iterations[0])  # the first ran whole
    np.testing.assert_array_equal(sink.audio, streamed.audio)
    assert not np.array_equal(streamed.audio, whole.audio)  # the last one is the streaming vocoder's


def test_a_streamed_request_at_another_speed_stretches_each_output_once(engine, voice, monkeypatch) -> None:
    """The streamed last output goes out stretched (a phase vocoder needs the whole signal); the
    result reuses those samples rather than stretching the same audio a second time."""
    stretched: list[int] = []

    def counting(wav: np.ndarray, speed: float) -> np.ndarray:
        stretched.append(wav.size)
        return change_speed(wav, speed)

    monkeypatch.setattr(synthesizer, "change_speed", counting)
    audio, text = voice
    request = EditRequest(
        audio=audio, audio_text=text, mode="emotion", edit_info="happy", n_edit_iter=2, seed=4, speed=1.5
    )
    sink = Collect()
    result = engine.edit(request, sink=sink)
    assert len(result.iterations) == 2 and all(wav.size for wav in result.iterations)
    np.testing.assert_array_equal(sink.audio, result.audio)  # what was heard is what is returned
    np.testing.assert_array_equal(result.iterations[-1], result.audio)
    assert len(stretched) == 2, "each of the two outputs is stretched once"


def test_cancel_mid_stream_stops_the_work(engine, voice) -> None:
    """Whether or not the LLM had finished (it is fast here), no audio is made after the cancel.

    That the generation itself stops early is shown through the server on a bundle that never
    stops by itself (tests/test_api_streaming.py).
    """
    cancel = CancelToken()
    sink = Collect(cancel_after_first=cancel)
    with pytest.raises(RequestCancelledError):
        engine.clone(_clone_request(voice, seed=5), sink=sink, cancel=cancel)
    assert len(sink.pieces) == 1


def test_cancel_before_generation_runs_no_step(engine, voice) -> None:
    cancel = CancelToken()
    cancel.set()
    scheduler = engine.synthesizer.schedulers["base"]
    deadline = time.monotonic() + 60
    while scheduler.running or scheduler.queued:  # a cancelled earlier request may still be leaving
        assert time.monotonic() < deadline
        time.sleep(0.01)
    steps = scheduler.steps
    with pytest.raises(RequestCancelledError):
        engine.clone(_clone_request(voice, seed=6), cancel=cancel)
    assert scheduler.steps == steps  # it left the queue: no decode step ran for it
