"""Prompt frontend: 24 kHz log-mel, Kaldi fbank + CAM++ embedding, the campplus stand-in, caching.

Fixture parity (skipped without the reference fixtures) is checked stage by stage (from the reference's
resampled audio) and end to end from the prepared prompt wav, with the tolerances of docs/model.md §8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from audio import AudioError, resample
from bundles.campplus_stub import write_campplus_onnx
from errors import ModelLoadError
from tests.conftest import load_reference
from vocoder.frontend import (
    DEFAULT_MEL_CONF,
    MelConfig,
    SpeakerEncoder,
    campplus_features,
    frontend_fingerprint,
    kaldi_fbank,
    log_mel,
    prompt_features,
    prompt_mel,
)

VOCODER_REL = Path("bundle/Step-Audio-EditX/CosyVoice-300M-25Hz")
MEL_TOL = 2e-4  # speech_feat
FBANK_TOL = 2e-3  # campplus_input
EMBED_TOL = 1e-4  # speech_embedding


def synthetic_prompt(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """A voiced-ish test prompt (1, n): two harmonics with vibrato plus a little noise, peak 0.6."""
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    f0 = 140 + 20 * torch.sin(2 * torch.pi * 3 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / sr
    wav = torch.sin(phase) + 0.4 * torch.sin(2 * phase)
    wav = wav + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (wav / wav.abs().max() * 0.6).float()[None]


@pytest.fixture(scope="module")
def stub_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_campplus_onnx(tmp_path_factory.mktemp("campplus") / "campplus.onnx", seed=0)


@pytest.fixture(scope="module")
def encoder(stub_onnx: Path) -> SpeakerEncoder:
    return SpeakerEncoder(stub_onnx)


# ---- shapes and errors on generated audio ---------------------------------------------------


@pytest.mark.parametrize(("sr", "seconds"), [(24000, 1.0), (22050, 0.73), (16000, 2.0), (48000, 0.5)])
def test_prompt_mel_is_50_hz_with_80_bins(sr: int, seconds: float) -> None:
    wav = synthetic_prompt(seconds, sr)
    mel = prompt_mel(wav, sr)
    n24 = resample(wav, sr, 24000).shape[-1]
    assert mel.shape == (1, n24 // 480, 80)
    assert mel.dtype == torch.float32
    assert torch.isfinite(mel).all()
    assert mel.min() >= np.log(1e-5) - 1e-6


def test_mel_peaks_in_the_band_of_a_tone() -> None:
    import librosa

    t = torch.arange(24000) / 24000
    mel = log_mel(0.5 * torch.sin(2 * torch.pi * 1000 * t)[None])[0]  # (80, T)
    loudest = int(mel.mean(dim=1).argmax())
    basis = librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000)
    assert basis[loudest, 1000 * 1920 // 24000] > 0  # that band's filter covers 1 kHz
    assert float(mel[loudest].mean() - mel[-1].mean()) > 5  # and it is far above the top band


def test_kaldi_fbank_frames_and_mean_subtraction() -> None:
    wav = synthetic_prompt(1.0, 16000)
    fb = kaldi_fbank(wav[0])
    assert fb.shape == (1 + (16000 - 400) // 160, 80)
    feats = campplus_features(wav, 16000)
    assert feats.shape == (1, fb.shape[0], 80)
    torch.testing.assert_close(feats.mean(dim=1), torch.zeros(1, 80), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[0], fb - fb.mean(dim=0, keepdim=True))
    # the waveform is NOT scaled by 32768: scaling it shifts every log energy by log(32768²)
    scaled = kaldi_fbank(wav[0] * 32768)
    assert float((scaled - fb).mean()) == pytest.approx(2 * np.log(32768), abs=0.05)


def test_too_short_or_misshaped_prompts_raise_audio_errors(encoder: SpeakerEncoder) -> None:
    with pytest.raises(AudioError, match="too short for a mel frame"):
        prompt_mel(torch.zeros(1, 500), 24000)
    with pytest.raises(AudioError, match="too short for a speaker embedding"):
        encoder.embed(torch.zeros(1, 300), 16000)
    with pytest.raises(AudioError, match=r"shaped \(1, samples\)"):
        prompt_mel(torch.zeros(2, 24000), 24000)
    with pytest.raises(AudioError, match="sample rate"):
        prompt_mel(torch.zeros(1, 24000), 0)


def test_mel_config_reads_the_yaml_block() -> None:
    conf = MelConfig.from_mapping(
        {
            "num_mels": 80,
            "n_fft": 1920,
            "hop_size": 480,
            "win_size": 1920,
            "sampling_rate": 24000,
            "fmin": 0,
            "fmax": 8000,
        }
    )
    assert conf == DEFAULT_MEL_CONF
    with pytest.raises(ModelLoadError, match="unknown keys"):
        MelConfig.from_mapping({"num_mels": 80, "center": True})


# ---- the campplus.onnx stand-in and the speaker encoder ------------------------------------------


def test_campplus_stub_has_the_real_signature(stub_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(stub_onnx)
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "output"
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim]
    assert in_dims[0] == 1 and isinstance(in_dims[1], str) and in_dims[2] == 80
    assert out_dims == [1, 192]
    assert stub_onnx.read_bytes() == write_campplus_onnx(tmp_path / "same.onnx", seed=0).read_bytes()
    assert stub_onnx.read_bytes() != write_campplus_onnx(tmp_path / "other.onnx", seed=1).read_bytes()


def test_speaker_embedding_shape_and_dependence_on_the_voice(encoder: SpeakerEncoder) -> None:
    a = encoder.embed(synthetic_prompt(1.0, 22050, seed=1), 22050)
    a_again = encoder.embed(synthetic_prompt(1.0, 22050, seed=1), 22050)
    longer = encoder.embed(synthetic_prompt(2.5, 22050, seed=1), 22050)
    other = encoder.embed(synthetic_prompt(1.0, 22050, seed=2) * torch.linspace(0.1, 1, 22050), 22050)
    assert a.shape == longer.shape == (1, 192)
    assert a.dtype == torch.float32
    assert torch.equal(a, a_again)
    assert (a - other).abs().max() > 1e-3


def test_speaker_encoder_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        SpeakerEncoder(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load"):
        SpeakerEncoder(tmp_path / "bad.onnx")


# ---- prompt features and their fingerprint ---------------------------------------------------


def test_prompt_features_and_what_decides_them(encoder: SpeakerEncoder, stub_onnx: Path, tmp_path: Path) -> None:
    wav = synthetic_prompt(1.2, 22050)
    features = prompt_features(wav, 22050, encoder)
    assert torch.equal(features.prompt_mel, prompt_mel(wav, 22050))
    assert torch.equal(features.spk_emb, encoder.embed(wav, 22050))
    # cached features from another speaker model or mel config must not be served: both are fingerprinted
    fp = frontend_fingerprint(encoder)
    assert fp == frontend_fingerprint(SpeakerEncoder(stub_onnx))
    other = SpeakerEncoder(write_campplus_onnx(tmp_path / "other.onnx", seed=3))
    assert frontend_fingerprint(other) != fp
    assert not torch.equal(prompt_features(wav, 22050, other).spk_emb, features.spk_emb)
    assert frontend_fingerprint(encoder, MelConfig(fmax=7600)) != fp


# ---- fixture parity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_encoder(reference_dir: Path) -> SpeakerEncoder:
    return SpeakerEncoder(reference_dir / VOCODER_REL / "campplus.onnx")


def _fixture(reference_dir: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    return load_reference(reference_dir, f"frontend/{name}")


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float((a - torch.from_numpy(b)).abs().max())


@pytest.mark.fixtures
def test_fixture_mel_conf_is_ours(reference_dir: Path) -> None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!new:", lambda loader, _s, node: loader.construct_mapping(node, deep=True))
    conf = yaml.load((reference_dir / VOCODER_REL / "cosyvoice.yaml").read_text(), Loader=Loader)["mel_conf"]
    assert MelConfig.from_mapping(conf) == DEFAULT_MEL_CONF


@pytest.mark.fixtures
@pytest.mark.parametrize("name", ["a", "b"])
def test_stages_match_the_reference(reference_dir: Path, fixture_encoder: SpeakerEncoder, name: str) -> None:
    """Each stage from the reference's own input (the resampled audio, the CAM++ input)."""
    _, ref = _fixture(reference_dir, name)
    mel = log_mel(torch.from_numpy(ref["resampled_24000"])).transpose(1, 2)
    assert _max_abs(mel, ref["speech_feat"]) <= MEL_TOL
    fb = kaldi_fbank(torch.from_numpy(ref["resampled_16000"])[0])
    assert _max_abs((fb - fb.mean(dim=0, keepdim=True))[None], ref["campplus_input"]) <= FBANK_TOL
    out = fixture_encoder.session.run(None, {fixture_encoder.input_name: ref["campplus_input"]})[0]
    assert np.abs(out - ref["speech_embedding"]).max() <= EMBED_TOL


@pytest.mark.fixtures
@pytest.mark.parametrize("name", ["a", "b"])
def test_prompt_wav_to_features_matches_the_reference(
    reference_dir: Path, fixture_encoder: SpeakerEncoder, name: str
) -> None:
    """End to end from the prepared prompt wav: resample, mel, fbank, CAM++."""
    meta, ref = _fixture(reference_dir, name)
    sr = int(meta["wav_sr"])
    wav = torch.from_numpy(ref["prompt_wav"])
    for target in (24000, 16000):  # the frontend's float32-kernel resampling is the reference's, bit for bit
        assert _max_abs(resample(wav, sr, target, kernel_dtype=torch.float32), ref[f"resampled_{target}"]) == 0.0
    mel = prompt_mel(wav, sr)
    feats = campplus_features(wav, sr)
    emb = fixture_encoder.embed(wav, sr)
    errors = {
        "mel": _max_abs(mel, ref["speech_feat"]),
        "fbank": _max_abs(feats, ref["campplus_input"]),
        "embedding": _max_abs(emb, ref["speech_embedding"]),
    }
    within = errors["mel"] <= MEL_TOL and errors["fbank"] <= FBANK_TOL and errors["embedding"] <= EMBED_TOL
    assert within, errors
