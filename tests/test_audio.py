"""The shared audio path: decode, mono, peak limit, reference-compatible resampling."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
from audio import AudioError, decode_audio, limit_peak, prepare_prompt, resample, to_mono
from errors import TooLargeError
from tests.conftest import REPO_ROOT, load_reference


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


# A fresh interpreter resamples 0.5 s clips at rates that share no factor with 16/24 kHz (the three
# calls a request makes) under an address-space cap, and reports its peak RSS growth. A dense
# polyphase kernel for 4001 -> 16000 alone is 16000 x 4015 float64 taps (half a gigabyte).
_ODD_RATES_CHILD = """
import json, resource, sys, torch
from audio import resample

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def vm_bytes():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))

resample(torch.zeros(1, 1600), 16000, 8000)
cap = vm_bytes() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
base = peak_mb()
growth = {}
for rate in map(int, sys.argv[1:]):
    x = torch.sin(torch.arange(rate // 2, dtype=torch.float32) * 0.05)[None] * 0.3
    for target, dtype in ((16000, torch.float64), (24000, torch.float32), (16000, torch.float32)):
        y = resample(x, rate, target, kernel_dtype=dtype)
        assert y.shape[-1] == -(-target * x.shape[-1] // rate) and bool(torch.isfinite(y).all())
    growth[rate] = peak_mb() - base
print(json.dumps(growth))
"""


def test_odd_sample_rates_cost_memory_bounded_by_the_audio(tmp_path: Path) -> None:
    rates = ["4001", "8001", "48001"]
    proc = subprocess.run(
        [sys.executable, "-c", _ODD_RATES_CHILD, *rates],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"resampling odd rates under a 1 GiB cap failed: {proc.stderr[-400:]}"
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    # 0.5 s of audio is kilobytes; allow generous scratch, far below any per-rate-pair table
    assert max(growth.values()) < 64, growth


@pytest.mark.parametrize(("orig_sr", "new_sr"), [(44100, 16000), (22050, 24000), (8000, 24000), (48000, 16000)])
def test_direct_evaluation_equals_the_dense_kernel(orig_sr: int, new_sr: int) -> None:
    """The bounded path for odd rates computes the same interpolation as the reference's dense kernel."""
    x = torch.randn(2, orig_sr // 3, generator=torch.Generator().manual_seed(0)) * 0.3
    g = math.gcd(orig_sr, new_sr)
    direct = audio._resample_direct(x, orig_sr // g, new_sr // g)
    dense = resample(x, orig_sr, new_sr)
    assert direct.shape == dense.shape
    assert (direct - dense).abs().max() < 1e-6


def test_odd_rate_keeps_a_tone() -> None:
    sr = 8001
    x = torch.tensor(np.sin(2 * np.pi * 440 * np.arange(sr) / sr), dtype=torch.float32)[None]
    y = resample(x, sr, 16000)[0].numpy()
    ref = np.sin(2 * np.pi * 440 * np.arange(y.shape[0]) / 16000)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 2e-2


def test_kernel_cache_is_bounded_by_bytes() -> None:
    cache = audio._KernelCache(max_bytes=1 << 20)
    for orig in range(150, 170):  # 20 distinct kernels of ~0.1-0.2 MB each
        kernel, _ = cache.get(orig, 160, torch.float64)
        assert kernel.shape[0] == 160
    assert 0 < cache.nbytes <= 1 << 20


def flac_bomb(hours: float = 2.0, sr: int = 8000, *, state_length: bool = True) -> bytes:
    """Hours of silence as FLAC (~90 KB per hour); ``state_length=False`` zeroes STREAMINFO's total
    (what a streamed FLAC carries), so only decoding can tell its length."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(sr * 60, dtype=np.int16)
        for _ in range(round(hours * 60)):
            f.write(minute)
    data = bytearray(buf.getvalue())
    if not state_length:
        # "fLaC", a 4-byte block header, then STREAMINFO whose bytes 13-17 end in the 36-bit total
        data[8 + 13] &= 0xF0
        data[8 + 14 : 8 + 18] = bytes(4)
    return bytes(data)


def _peak_allocation(fn) -> tuple[BaseException | None, int]:
    """Run ``fn``; return what it raised and the peak bytes Python and numpy allocated meanwhile."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except Exception as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"stated": flac_bomb(), "unstated": flac_bomb(state_length=False)}


@pytest.mark.parametrize("kind", ["stated", "unstated"])
@pytest.mark.parametrize("decoder", ["soundfile", "ffmpeg"])
def test_a_flac_bomb_is_refused_without_decoding_it(bombs: dict[str, bytes], kind: str, decoder: str) -> None:
    data = bombs[kind]
    assert len(data) < 400_000  # two hours: 57.6 M samples, 230 MB as float32
    decode = decode_audio if decoder == "soundfile" else audio._decode_with_av
    raised, peak = _peak_allocation(lambda: decode(data, max_seconds=60.0))
    assert isinstance(raised, TooLargeError), raised
    assert "the limit is 60 s" in str(raised)
    # at most the limit's worth of float32 samples (60 s x 8 kHz = 1.9 MB) and scratch
    assert peak < 8 << 20, peak


def test_audio_within_the_limit_decodes_whole() -> None:
    x = (0.1 * np.sin(np.arange(8000 * 3) * 0.05)).astype(np.float32)
    data = _wav_bytes(x, 8000, "FLAC")
    for decode in (decode_audio, audio._decode_with_av):
        wav, sr = decode(data, max_seconds=3.0)
        assert sr == 8000 and wav.shape == (1, 8000 * 3)
        with pytest.raises(TooLargeError, match=r"lasts 3\.0 s"):
            decode(data, max_seconds=2.5)


def test_a_flac_without_a_stated_length_decodes_whole() -> None:
    """A streamed FLAC (no total in STREAMINFO) is read block by block, with or without a limit."""
    data = flac_bomb(hours=1 / 60, state_length=False)  # one minute
    for limit in (None, 61.0):
        wav, sr = decode_audio(data, max_seconds=limit)
        assert sr == 8000 and wav.shape == (1, 8000 * 60)
