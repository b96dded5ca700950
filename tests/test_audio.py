"""The shared audio path: decode, mono, peak limit, reference-compatible resampling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import AudioError, decode_audio, limit_peak, prepare_prompt, resample, to_mono
from tests.conftest import load_reference


def _wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.fixtures
@pytest.mark.parametrize(("case", "name"), [("a", "a_piper_en_22k.wav"), ("b", "b_synth_48k_stereo.wav")])
def test_prompt_and_resample_match_reference(reference_dir, case, name):
    _, ref = load_reference(reference_dir, f"frontend/{case}")
    wav, sr = decode_audio((reference_dir / "inputs" / name).read_bytes())
    prompt = prepare_prompt(wav, sr)
    np.testing.assert_array_equal(prompt.numpy(), ref["prompt_wav"])
    for target in (24000, 16000):
        out = resample(prompt, sr, target).numpy()
        assert out.shape == ref[f"resampled_{target}"].shape
        assert np.abs(out - ref[f"resampled_{target}"]).max() <= 5e-5
        # the frontend's call builds its kernel in float32, like the reference's functional resample
        exact = resample(prompt, sr, target, kernel_dtype=torch.float32).numpy()
        np.testing.assert_array_equal(exact, ref[f"resampled_{target}"])


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_resample_keeps_a_tone(sr):
    t = np.arange(sr) / sr
    x = torch.tensor(np.sin(2 * np.pi * 440 * t), dtype=torch.float32)[None]
    y = resample(x, sr, 16000)[0].numpy()
    assert y.shape[0] == 16000
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    # away from the edges the band-limited interpolation is close to the true tone
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 2e-2


def test_decode_wav_flac_and_stereo_mean():
    stereo = np.stack([np.full(1600, 0.5), np.full(1600, -0.25)], axis=1).astype(np.float32)
    for fmt, subtype in [("WAV", "PCM_16"), ("FLAC", "PCM_16")]:
        wav, sr = decode_audio(_wav_bytes(stereo, 16000, fmt, subtype))
        assert sr == 16000 and wav.shape == (2, 1600)
        mono = to_mono(wav)
        assert mono.shape == (1, 1600)
        assert abs(float(mono.mean()) - 0.125) < 1e-3


def test_peak_limit_only_scales_down():
    loud = torch.tensor([[0.0, 1.2, -0.3]])
    assert float(limit_peak(loud).abs().max()) == pytest.approx(0.6)
    quiet = torch.tensor([[0.1, -0.2]])
    assert torch.equal(limit_peak(quiet), quiet)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"this is not audio at all" * 10, "not a readable audio")],
)
def test_decode_rejects_bad_bytes(data, message):
    with pytest.raises(AudioError, match=message):
        decode_audio(data)


def test_non_finite_audio_is_rejected():
    with pytest.raises(AudioError, match="non-finite"):
        prepare_prompt(np.array([[0.0, np.nan, 0.1]], dtype=np.float32), 16000)
