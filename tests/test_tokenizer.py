"""wav2token on a tiny generated tokenizer bundle, through the real loading and inference code."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from audio import AudioError, prepare_prompt, resample
from audio_codes import AUDIO_ID_OFFSET, VQ02_CODES
from bundles.tokenizer_bundle import FUNASR_MODEL_ID, write_tokenizer_bundle
from errors import InvalidInputError, ModelLoadError
from tests.conftest import REPO_ROOT, path_without
from tokenizer import (
    VQ06_PIECE_SAMPLES,
    AudioTokens,
    StepAudioTokenizer,
    preprocess_wav,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_bundle(tmp_path_factory.mktemp("tok-bundle"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> StepAudioTokenizer:
    return StepAudioTokenizer(tiny_tokenizer_dir)


def voiced(seconds: float, sr: int, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A speech-like test signal ``(1, n)``: harmonics with a gliding f0, syllable-rate envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.3 * np.sin(2 * np.pi * 0.7 * t))) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8) if k * f0 * 1.3 < sr / 2)
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) + 0.02 * rng.standard_normal(t.size)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)[None]


# ---------------------------------------------------------------------------------------------
# token forms


def test_audio_tokens_interleave_offsets_and_string():
    tokens = AudioTokens(np.array([1, 2, 3, 4, 5]), np.array([10, 11, 12, 13, 14, 15, 16]))
    assert tokens.n_groups == 2  # min(5 // 2, 7 // 3); trailing codes of either stream dropped
    assert tokens.prompt_codes.tolist() == [1, 2, 1034, 1035, 1036, 3, 4, 1037, 1038, 1039]
    assert tokens.speech_ids.tolist() == [65536 + c for c in tokens.prompt_codes.tolist()]
    assert tokens.token_str == "".join(f"<audio_{c}>" for c in tokens.prompt_codes.tolist())
    assert tokens.vq02.dtype == np.int64 and tokens.speech_ids.dtype == np.int64


def test_wav2token_streams_interleave_like_the_reference(tok):
    tokens = tok.wav2token(prepare_prompt(voiced(2.0, 16000), 16000), 16000)
    vq02, vq06 = tokens.vq02.tolist(), tokens.vq06.tolist()
    assert all(0 <= c < 1024 for c in vq02) and all(0 <= c < 4096 for c in vq06)
    # the reference's loop: 2 vq02 (+65536) then 3 vq06 (+65536+1024) per group
    expected = []
    for g in range(min(len(vq06) // 3, len(vq02) // 2)):
        expected += [c + AUDIO_ID_OFFSET for c in vq02[2 * g : 2 * g + 2]]
        expected += [c + AUDIO_ID_OFFSET + VQ02_CODES for c in vq06[3 * g : 3 * g + 3]]
    assert tokens.speech_ids.tolist() == expected
    assert (tokens.prompt_codes == tokens.speech_ids - AUDIO_ID_OFFSET).all()
    parsed = [int(n) for n in re.findall(r"<audio_(\d+)>", tokens.token_str)]
    assert re.fullmatch(r"(<audio_\d+>)+", tokens.token_str)
    assert parsed == tokens.prompt_codes.tolist()


# ---------------------------------------------------------------------------------------------
# rates, sample rates, determinism


def test_token_rates(tok):
    prompt = prepare_prompt(voiced(3.0, 16000), 16000)
    seconds = preprocess_wav(prompt, 16000).shape[-1] / 16000  # what the tokenizers see
    tokens = tok.wav2token(prompt, 16000)
    assert abs(len(tokens.vq06) - 25 * seconds) <= 2  # the reference's own check
    assert abs(len(tokens.vq02) - seconds / 0.06) <= 1.5  # 60 ms frames, 16.67 Hz
    assert tokens.n_groups == min(len(tokens.vq02) // 2, len(tokens.vq06) // 3)


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_sample_rates(tok, sr):
    tokens = tok.wav2token(prepare_prompt(voiced(2.0, sr), sr), sr)
    # 2 s of continuous voice: ceil(span/240)*240 + 4320 samples at 16 kHz, about 2.27 s
    assert abs(tokens.n_groups - 2.27 / 0.12) <= 2
    assert len(tokens.vq06) == pytest.approx(2.27 * 25, abs=3)


def test_stereo_is_the_channel_mean(tok):
    sr = 44100
    left, right = voiced(1.5, sr, f0=120.0, seed=1), voiced(1.5, sr, f0=190.0, seed=2)
    stereo = np.concatenate([left, right])
    prompt = prepare_prompt(stereo, sr)
    assert prompt.shape == (1, left.shape[1])
    tokens = tok.wav2token(prompt, sr)
    assert tokens.n_groups > 0
    same = tok.wav2token(prepare_prompt((left + right) / 2, sr), sr)
    np.testing.assert_array_equal(tokens.vq02, same.vq02)
    np.testing.assert_array_equal(tokens.vq06, same.vq06)


def test_deterministic_with_dither_zero(tok, tiny_tokenizer_dir):
    prompt = prepare_prompt(voiced(1.5, 22050, seed=3), 22050)
    first = tok.wav2token(prompt, 22050)
    again = tok.wav2token(prompt.clone(), 22050)
    other = StepAudioTokenizer(tiny_tokenizer_dir).wav2token(prompt.numpy(), 22050)
    for t in (again, other):
        np.testing.assert_array_equal(first.vq02, t.vq02)
        np.testing.assert_array_equal(first.vq06, t.vq06)


def test_dither_reaches_the_fbank(tok, tiny_tokenizer_dir):
    dithered = StepAudioTokenizer(tiny_tokenizer_dir, dither=1.0)
    assert dithered.fingerprint != tok.fingerprint
    audio = preprocess_wav(prepare_prompt(voiced(1.0, 16000), 16000), 16000)[0]
    plain = tok.vq02_encoder.encode(audio).features
    noisy = dithered.vq02_encoder.encode(audio).features
    assert plain.shape == noisy.shape
    assert not torch.equal(plain, noisy)


def test_layer_major_encoder_is_bit_identical_to_funasr_order(tok):
    audio = preprocess_wav(prepare_prompt(voiced(2.5, 16000, seed=6), 16000), 16000)[0]
    ours = tok.vq02_encoder.encode(audio)
    funasr_order = tok.vq02_encoder.encode(audio, layer_major=False)
    assert len(ours.chunk_frames) > 8  # enough chunks for the 4-chunk look-back to fill up
    assert torch.equal(ours.hidden, funasr_order.hidden)
    assert ours.chunk_frames == funasr_order.chunk_frames


def test_vq06_pieces_of_30_seconds(tok):
    # 30 s + 1000 samples: two pieces; 30 s + 300: the short tail (< 480 samples) is dropped
    n_frames = VQ06_PIECE_SAMPLES // 160
    long_mels = tok.vq06_tokenizer.mels(torch.zeros(VQ06_PIECE_SAMPLES + 1000))
    assert [m.shape for m in long_mels] == [(128, n_frames), (128, 1000 // 160)]
    assert len(tok.vq06_tokenizer.mels(torch.zeros(VQ06_PIECE_SAMPLES + 300))) == 1


def test_onnx_signature_and_length_input(tiny_tokenizer_dir):
    session = ort.InferenceSession(str(tiny_tokenizer_dir / "speech_tokenizer_v1.onnx"))
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert [(i.name, i.type) for i in inputs] == [("feats", "tensor(float)"), ("feats_length", "tensor(int32)")]
    assert inputs[0].shape[:2] == [1, 128]
    assert outputs[0].type == "tensor(int64)"
    rng = np.random.default_rng(0)
    for t in (1, 4, 7, 301, 3000):
        feats = rng.standard_normal((1, 128, t)).astype(np.float32)
        out = session.run(None, {"feats": feats, "feats_length": np.array([t], np.int32)})[0]
        assert out.shape == (1, math.ceil(math.ceil(t / 2) / 2))
        assert out.min() >= 0 and out.max() < 4096
    feats = rng.standard_normal((1, 128, 200)).astype(np.float32)
    full = session.run(None, {"feats": feats, "feats_length": np.array([200], np.int32)})[0]
    half = session.run(None, {"feats": feats, "feats_length": np.array([100], np.int32)})[0]
    assert not np.array_equal(full, half)  # the length input is really part of the graph


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("wav", "sr", "match"),
    [
        (np.zeros((1, 0), np.float32), 16000, "empty"),
        (np.zeros((1, 16000), np.float32), 16000, "silent"),
        (np.full((1, 16000), 1e-4, np.float32), 16000, "silent"),
        (voiced(0.05, 16000), 16000, "too short"),
        (np.where(np.arange(16000) == 5, np.nan, 0.1).astype(np.float32)[None], 16000, "non-finite"),
        (np.where(np.arange(16000) == 5, np.inf, 0.1).astype(np.float32)[None], 16000, "non-finite"),
        (voiced(1.0, 16000), 0, "sample rate"),
        (voiced(1.0, 16000), -16000, "sample rate"),
    ],
    ids=["empty", "zeros", "near-silence", "too-short", "nan", "inf", "rate-0", "rate-negative"],
)
def test_clear_errors(tok, wav, sr, match):
    with pytest.raises(AudioError, match=match) as info:
        tok.wav2token(wav, sr)
    assert isinstance(info.value, InvalidInputError)


def test_shortest_accepted_prompt_gives_a_group(tok):
    tokens = tok.wav2token(voiced(0.12, 8000), 8000)
    assert tokens.n_groups >= 1


# ---------------------------------------------------------------------------------------------
# loading


def test_only_the_encoder_is_loaded(tok, tiny_tokenizer_dir):
    ckpt = torch.load(tiny_tokenizer_dir / FUNASR_MODEL_ID / "model.pt", weights_only=True)
    assert any(k.startswith("decoder.") for k in ckpt) and any(k.startswith("predictor.") for k in ckpt)
    encoder_keys = {k.removeprefix("encoder.") for k in ckpt if k.startswith("encoder.")}
    assert set(tok.vq02_encoder.encoder.state_dict()) == encoder_keys  # loaded strictly
    assert not hasattr(tok.vq02_encoder, "decoder") and not hasattr(tok.vq02_encoder, "predictor")


def test_missing_and_mismatched_files_fail_clearly(tiny_tokenizer_dir, tmp_path):
    broken = tmp_path / "Step-Audio-Tokenizer"
    shutil.copytree(tiny_tokenizer_dir, broken)
    (broken / "speech_tokenizer_v1.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"speech_tokenizer_v1\.onnx"):
        StepAudioTokenizer(broken)
    shutil.copy(tiny_tokenizer_dir / "speech_tokenizer_v1.onnx", broken)
    np.save(broken / "linguistic_tokenizer.npy", np.zeros((1024, 7), np.float32))
    with pytest.raises(ModelLoadError, match="codebook"):
        StepAudioTokenizer(broken)
    config = broken / FUNASR_MODEL_ID / "config.yaml"
    config.write_text(config.read_text().replace("linear_units: 64", "linear_units: 96", 1))
    with pytest.raises(ModelLoadError, match="does not fit"):
        StepAudioTokenizer(broken)


def test_fingerprint_covers_files_and_settings(tok, tiny_tokenizer_dir, tmp_path):
    assert tok.fingerprint == tokenizer_fingerprint(tiny_tokenizer_dir)
    assert tokenizer_fingerprint(tiny_tokenizer_dir, dither=1.0) != tok.fingerprint
    copy = tmp_path / "Step-Audio-Tokenizer"
    shutil.copytree(tiny_tokenizer_dir, copy)
    mvn = copy / FUNASR_MODEL_ID / "am.mvn"
    mvn.write_text(mvn.read_text().replace("<Rescale>", "<Rescale> ", 1))
    assert tokenizer_fingerprint(copy) != tok.fingerprint


def test_bundle_is_seeded(tiny_tokenizer_dir, tmp_path):
    again = write_tokenizer_bundle(tmp_path / "same", size="tiny", seed=0)
    other = write_tokenizer_bundle(tmp_path / "other", size="tiny", seed=1)
    np.testing.assert_array_equal(
        np.load(again / "linguistic_tokenizer.npy"), np.load(tiny_tokenizer_dir / "linguistic_tokenizer.npy")
    )
    a, b, c = (
        torch.load(d / FUNASR_MODEL_ID / "model.pt", weights_only=True) for d in (tiny_tokenizer_dir, again, other)
    )
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# logging and fingerprint (caching itself is the engine's: tests/test_engine.py)


def test_wav2token_logs_its_encoding_time_and_is_deterministic(tok, caplog):
    caplog.set_level(logging.INFO, logger="tokenizer")
    prompt = prepare_prompt(voiced(1.2, 24000, seed=4), 24000)
    first = tok.wav2token(prompt, 24000)
    assert re.search(r"\[FunASR Encoding\] time=\d+\.\d{3}s", caplog.text)
    second = tok.wav2token(prompt, 24000)
    np.testing.assert_array_equal(first.speech_ids, second.speech_ids)  # dither 0: cacheable


def test_fingerprint_follows_the_settings(tiny_tokenizer_dir, tok):
    assert tokenizer_fingerprint(tiny_tokenizer_dir) == tok.fingerprint
    assert tokenizer_fingerprint(tiny_tokenizer_dir, dither=1.0) != tok.fingerprint


def test_resampled_input_sees_the_same_signal(tok):
    # 48 kHz -> 16 kHz in preprocessing equals tokenizing the 16 kHz version of the same audio
    x48 = prepare_prompt(voiced(1.5, 48000, seed=5), 48000)
    x16 = resample(x48, 48000, 16000)
    a, b = tok.wav2token(x48, 48000), tok.wav2token(x16, 16000)
    np.testing.assert_array_equal(a.vq06, b.vq06)
    np.testing.assert_array_equal(a.vq02, b.vq02)


FUNASR_NOTICE = "ffmpeg"  # funasr's import notice and pydub's warning both name it


def _run_python(code: str, path: str) -> str:
    """stdout + stderr of a fresh interpreter (the import happens once per process) with ``path`` as PATH."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "PATH": path},
    )
    return done.stdout + done.stderr


@pytest.mark.slow
def test_loading_and_running_the_tokenizer_prints_no_funasr_notice(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    no_ffmpeg = path_without({"ffmpeg", "ffprobe", "avconv", "avprobe"}, tmp_path / "bin")  # the notice's condition
    bare = _run_python("import funasr", no_ffmpeg)
    if FUNASR_NOTICE not in bare.lower():
        pytest.skip("this funasr/pydub prints no ffmpeg notice on import: nothing to silence")
    ours = _run_python(
        "import numpy as np\n"
        "from tokenizer import StepAudioTokenizer\n"
        f"tok = StepAudioTokenizer({str(tiny_tokenizer_dir)!r})\n"
        "tok.wav2token(np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32), 16000)\n",
        no_ffmpeg,
    )
    assert FUNASR_NOTICE not in ours.lower(), ours
