"""The engine's wiring against the reference: decoded file -> prompt ids and prompt features.

Runs the engine on the reference-fixture bundle (official layout, tiny random weights, the real
Step1 text tokenizer) and checks that what the engine builds from the fixture's input file equals
what the upstream ``tts.py`` built: the exact clone / emotion / paralinguistic prompt ids
(tokens from wav2token, the speaker id from the raw decoded wav, the instruction texts) and the
prompt mel and speaker embedding within the fixture tolerances (docs/model.md §8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audio import decode_audio
from engine.build import build_engine
from engine.prompting import PreparedPrompt
from engine.tts import StepAudioEngine
from engine.types import AudioInput, CloneRequest, EditRequest
from settings import Settings

pytestmark = pytest.mark.fixtures

PROMPT_MEL_TOL = 2e-4
SPEAKER_EMBEDDING_TOL = 1e-4


@pytest.fixture(scope="module")
def fixture_engine(reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StepAudioEngine:
    settings = Settings(
        model_path=reference_dir / "bundle",
        cache_dir=tmp_path_factory.mktemp("fidelity-cache"),
        device="cpu",
        torch_dtype="float32",
    )
    return build_engine(settings, max_new_tokens=5)


@pytest.fixture(scope="module")
def cases(reference_dir: Path) -> dict[str, dict]:
    data = json.loads((reference_dir / "prompt_ids" / "prompt_ids.json").read_text())
    return {case["name"]: case for case in data["cases"]}


@pytest.fixture(scope="module")
def input_a(reference_dir: Path) -> AudioInput:
    wav, sr = decode_audio((reference_dir / "inputs" / "a_piper_en_22k.wav").read_bytes())
    return AudioInput(wav, sr)


def check_features(prepared: PreparedPrompt, reference_dir: Path, name: str = "a") -> None:
    frontend = dict(np.load(reference_dir / "frontend" / f"{name}.npz"))
    tokens = dict(np.load(reference_dir / "wav2token" / f"{name}.npz"))
    np.testing.assert_array_equal(prepared.features.tokens.speech_ids, tokens["speech_tokens"])
    mel = prepared.features.prompt_mel.numpy()
    assert mel.shape == frontend["speech_feat"].shape
    assert np.abs(mel - frontend["speech_feat"]).max() <= PROMPT_MEL_TOL
    emb = prepared.features.spk_emb.numpy()
    assert np.abs(emb - frontend["speech_embedding"]).max() <= SPEAKER_EMBEDDING_TOL


def test_clone_prompt_matches_the_reference(
    fixture_engine: StepAudioEngine, cases: dict, input_a: AudioInput, reference_dir: Path
) -> None:
    case = cases["clone"]
    request = CloneRequest(prompt_audio=input_a, prompt_text=case["prompt_text"], text=case["target_text"])
    prepared = fixture_engine.preparer.clone(request)
    assert prepared.pair.cond == case["token_ids"]
    check_features(prepared, reference_dir)
    # a second build comes from the cache, with the same result
    again = fixture_engine.preparer.clone(request)
    assert again.pair.cond == case["token_ids"]
    np.testing.assert_array_equal(again.features.prompt_mel.numpy(), prepared.features.prompt_mel.numpy())


@pytest.mark.parametrize("name", ["emotion_happy", "paralinguistic"])
def test_edit_prompts_match_the_reference(
    fixture_engine: StepAudioEngine, cases: dict, input_a: AudioInput, reference_dir: Path, name: str
) -> None:
    case = cases[name]
    request = EditRequest(
        audio=input_a, audio_text=case["audio_text"], mode=case["mode"], edit_info=case["edit_info"], text=case["text"]
    )
    prepared = fixture_engine.preparer.first_edit(request, fixture_engine.check_steps([request.first_step]))
    assert prepared.pair.cond == case["token_ids"]
    check_features(prepared, reference_dir)


def test_stereo_48k_prompt_features_match_the_reference(fixture_engine: StepAudioEngine, reference_dir: Path) -> None:
    wav, sr = decode_audio((reference_dir / "inputs" / "b_synth_48k_stereo.wav").read_bytes())
    assert wav.shape[0] == 2 and sr == 48000
    request = CloneRequest(prompt_audio=AudioInput(wav, sr), prompt_text="a synthetic test signal", text="Hello.")
    check_features(fixture_engine.preparer.clone(request), reference_dir, "b")


def test_a_clone_runs_end_to_end_on_the_reference_bundle(
    fixture_engine: StepAudioEngine, cases: dict, input_a: AudioInput
) -> None:
    case = cases["clone"]
    result = fixture_engine.clone(
        CloneRequest(prompt_audio=input_a, prompt_text=case["prompt_text"], text=case["target_text"], seed=0)
    )
    assert result.sample_rate == 24000 and np.isfinite(result.audio).all()
    assert result.audio.shape[0] == -(-result.n_audio_tokens // 5) * 2880
