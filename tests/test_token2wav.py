"""token2wav on the tiny generated vocoder bundle: lengths, seeds, injected noise, bundle writer, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bundles.vocoder_bundle import VOCODER_DIR, write_vocoder_bundle
from errors import InvalidInputError, TooLargeError
from vocoder.config import load_cosyvoice
from vocoder.hift import draw_hift_noise
from vocoder.token2wav import Token2Wav, bf16_round_trip

SAMPLES_PER_MEL_FRAME = 480  # 24 kHz / 50 Hz
MEL_FRAMES_PER_TOKEN_FRAME = 2  # 25 Hz dual-codebook frames -> 50 Hz mel


def mixed_codes(groups: int, seed: int) -> np.ndarray:
    """``groups`` LLM groups of 2 vq02 (0..1023) + 3 vq06 (1024..5119) codes."""
    rng = np.random.default_rng(seed)
    out = [np.concatenate([rng.integers(0, 1024, 2), rng.integers(1024, 5120, 3)]) for _ in range(groups)]
    return np.concatenate(out).astype(np.int64)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocoder_bundle(tmp_path_factory.mktemp("editx"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def t2w(bundle_dir: Path) -> Token2Wav:
    torch.set_num_threads(2)
    return Token2Wav.from_dir(bundle_dir)


@pytest.fixture(scope="module")
def prompt() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "prompt_codes": mixed_codes(4, seed=1),  # 12 token frames -> 24 mel frames
        "prompt_mel": (rng.normal(size=(1, 27, 80)) - 5.0).astype(np.float32),  # untrimmed: longer
        "spk_emb": rng.normal(size=(1, 192)).astype(np.float32),
    }


def test_bundle_has_the_official_files_and_is_reproducible(bundle_dir: Path, tmp_path: Path) -> None:
    assert bundle_dir.name == VOCODER_DIR
    assert {p.name for p in bundle_dir.iterdir()} >= {"cosyvoice.yaml", "flow.pt", "hift.pt", "campplus.onnx"}
    hift_keys = torch.load(bundle_dir / "hift.pt", weights_only=True)
    assert any(k.endswith("parametrizations.weight.original0") for k in hift_keys)
    again = write_vocoder_bundle(tmp_path / "a", size="tiny", seed=0)
    other = write_vocoder_bundle(tmp_path / "b", size="tiny", seed=1)
    for name in ("flow.pt", "hift.pt"):
        ref = torch.load(bundle_dir / name, weights_only=True)
        same = torch.load(again / name, weights_only=True)
        diff = torch.load(other / name, weights_only=True)
        assert all(torch.equal(ref[k], same[k]) for k in ref)
        assert any(not torch.equal(ref[k], diff[k]) for k in ref)


def test_load_cosyvoice_reports_a_missing_file(bundle_dir: Path, tmp_path: Path) -> None:
    from errors import ModelLoadError

    (tmp_path / "cosyvoice.yaml").write_bytes((bundle_dir / "cosyvoice.yaml").read_bytes())
    with pytest.raises(ModelLoadError, match=r"lacks flow\.pt"):
        load_cosyvoice(tmp_path)
    parts = load_cosyvoice(bundle_dir)
    assert parts.campplus_path.is_file()
    assert not parts.flow.training and not parts.hift.training


@pytest.mark.parametrize("n_codes", [5, 7, 13, 30])
def test_output_length_is_two_mel_frames_per_token_frame_and_480_samples_each(
    t2w: Token2Wav, prompt: dict[str, np.ndarray], n_codes: int
) -> None:
    codes = mixed_codes(7, seed=n_codes)[:n_codes]
    token_frames = 3 * -(-n_codes // 5)  # a partial group is padded to a whole one
    wav = t2w.token2wav(codes, **prompt, seed=0)
    mel_frames = token_frames * MEL_FRAMES_PER_TOKEN_FRAME
    assert t2w.mel_frames(n_codes) == mel_frames
    assert wav.shape == (1, mel_frames * SAMPLES_PER_MEL_FRAME)
    assert wav.dtype == torch.float32 and wav.device.type == "cpu"
    assert bool(torch.isfinite(wav).all()) and float(wav.abs().max()) <= 0.99 + 1e-6
    assert float(wav.std()) > 0


def test_a_seed_reproduces_the_audio_and_another_seed_changes_it(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = mixed_codes(3, seed=11)
    a = t2w.token2wav(codes, **prompt, seed=123)
    b = t2w.token2wav(codes, **prompt, seed=123)
    c = t2w.token2wav(codes, **prompt, seed=124)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3


def test_injected_noise_and_draws_replace_the_seeded_ones(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = mixed_codes(2, seed=5)
    n_prompt = 2 * 12
    n_target = 2 * 6
    generator = torch.Generator().manual_seed(99)
    noise = torch.randn(1, 80, n_prompt + n_target, generator=generator)
    draws = draw_hift_noise(1, n_target * SAMPLES_PER_MEL_FRAME, 9, generator)
    seeded = t2w.token2wav(codes, **prompt, seed=99)
    injected = t2w.token2wav(codes, **prompt, seed=1, noise=noise, hift_draws=draws)
    assert torch.equal(seeded, injected)  # the seed draws flow noise first, then the HiFT draws
    other = t2w.token2wav(codes, **prompt, noise=noise + 0.5, hift_draws=draws)
    assert float((other - seeded).abs().max()) > 1e-4


def test_prompt_mel_and_embedding_go_through_bf16_by_default(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = mixed_codes(2, seed=8)
    rounded = {
        **prompt,
        "prompt_mel": bf16_round_trip(torch.from_numpy(prompt["prompt_mel"])),
        "spk_emb": bf16_round_trip(torch.from_numpy(prompt["spk_emb"])),
    }
    assert torch.equal(t2w.token2wav(codes, **prompt, seed=3), t2w.token2wav(codes, **rounded, seed=3))
    exact = Token2Wav(t2w.flow, t2w.hift, bf16_prompt_roundtrip=False)
    assert not torch.equal(exact.token2wav(codes, **prompt, seed=3), t2w.token2wav(codes, **prompt, seed=3))


def test_accepts_unbatched_prompt_arrays_and_lists(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = mixed_codes(1, seed=2)
    batched = t2w.token2wav(codes, **prompt, seed=4)
    flat = t2w.token2wav(
        codes.tolist(),
        prompt["prompt_codes"].tolist(),
        prompt["prompt_mel"][0],
        torch.from_numpy(prompt["spk_emb"][0]),
        seed=4,
    )
    assert torch.equal(batched, flat)


def test_bad_inputs_raise_typed_errors(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = mixed_codes(1, seed=2)
    bad_calls = {
        "codes": [
            dict(codes=np.array([], dtype=np.int64)),
            dict(codes=np.array([1, 5120])),
            dict(codes=np.array([-1, 3])),
            dict(codes=np.array([1.5, 2.0])),
            dict(codes=np.zeros((2, 3))),
        ],
        "prompt_codes": [
            dict(prompt_codes=np.array([7000])),
            dict(prompt_codes=["a", "b"]),
            dict(prompt_codes=[2**70]),
        ],
        "prompt_mel": [
            dict(prompt_mel=np.zeros((1, 10, 81), np.float32)),
            dict(prompt_mel=np.zeros((1, 0, 80))),
            dict(prompt_mel=np.full((1, 10, 80), np.nan, np.float32)),
            dict(prompt_mel=np.zeros((1, 10, 80), np.int64)),
        ],
        "spk_emb": [dict(spk_emb=np.zeros((1, 191), np.float32))],
        "noise": [dict(noise=torch.zeros(1, 80, 5))],
    }
    for param, calls in bad_calls.items():
        for override in calls:
            args = {"codes": codes, **prompt, **override}
            with pytest.raises(InvalidInputError) as info:
                t2w.token2wav(**args, seed=0)
            assert info.value.param == param


def test_overlong_requests_are_refused_before_any_work(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    with pytest.raises(TooLargeError):
        t2w.token2wav(np.zeros(25_005, dtype=np.int64), **prompt, seed=0)
