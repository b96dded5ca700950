"""Text normalization on request (``step_audio.normalize_text``): what the model then reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.build import build_engine
from engine.normalize import normalize_text
from engine.types import CloneRequest
from engine.voices import load_default_voice
from model_loader import ModelRegistry, resolve_bundle
from settings import Settings


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("It is 25 km away.", "twenty five kilometers"),
        ("We met at 3:30 pm.", "three thirty"),
        ("Born in 1999.", "nineteen ninety nine"),
        ("今天是2024年1月5日。", "二零二四年一月五日"),
        ("温度25°C。", "二十五摄氏度"),
    ],
)
def test_numbers_dates_and_units_become_words(text: str, spoken: str) -> None:
    out = normalize_text(text)
    assert spoken in out.lower() and not any(ch.isdigit() for ch in out)


def test_tags_and_plain_words_are_left_alone() -> None:
    assert normalize_text("Well [Laughter] that was 5 minutes.") == "Well [Laughter] that was five minutes."
    assert normalize_text("Nothing to change here.") == "Nothing to change here."


def test_a_normalized_clone_speaks_the_written_out_text(tiny_bundle: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(resolve_bundle(tiny_bundle), torch.device("cpu"), torch.float32)
    settings = Settings(model_path=tiny_bundle, cache_dir=tmp_path, device="cpu", torch_dtype="float32")
    engine = build_engine(settings, registry=registry, max_new_tokens=10)
    audio, transcript = load_default_voice()
    text = "It is 25 km away."
    asked = engine.clone(CloneRequest(audio, transcript, text, seed=4, normalize_text=True))
    by_hand = engine.clone(CloneRequest(audio, transcript, normalize_text(text), seed=4))
    plain = engine.clone(CloneRequest(audio, transcript, text, seed=4))
    np.testing.assert_array_equal(asked.audio, by_hand.audio)
    assert asked.segments[0].text == text  # the caption is what the client sent
    assert not np.array_equal(asked.audio, plain.audio)  # and without the flag the model reads the digits
