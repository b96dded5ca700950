"""Flow and token2wav against the reference fixtures (docs/model.md §4, §8); skipped without them.

The fixture bundle's ``cosyvoice.yaml`` is read by our reader, ``flow.pt``/``hift.pt`` load
strictly, the flow mel matches given the recorded inputs and start noise, and the whole chain from
codes (bf16 hand-over included) lands inside the end-to-end sanity bound of docs/model.md §8 with the
recorded noise and HiFT draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_reference
from vocoder.config import build_from_yaml, load_cosyvoice
from vocoder.flow import reshape_mixed_codes
from vocoder.hift import HiftDraws
from vocoder.token2wav import Token2Wav

pytestmark = pytest.mark.fixtures

FLOW_MEL_TOL = 1e-4  # docs/model.md §8: flow mel given identical flow_* inputs and noise (floor 8.9e-6)
END_TO_END_REL_TOL = 1e-2  # docs/model.md §8: speech from codes, injected noise and draws, x max|speech|


@pytest.fixture(scope="module")
def vocoder_dir(reference_dir: Path) -> Path:
    return reference_dir / "bundle" / "Step-Audio-EditX" / "CosyVoice-300M-25Hz"


@pytest.fixture(scope="module")
def t2w(vocoder_dir: Path) -> Token2Wav:
    torch.set_num_threads(2)
    return Token2Wav.from_dir(vocoder_dir)


def test_reader_builds_the_fixture_yaml_with_its_dimensions(vocoder_dir: Path) -> None:
    mel_conf, flow, hift = build_from_yaml(vocoder_dir / "cosyvoice.yaml")
    assert mel_conf.n_fft == 1920 and mel_conf.hop_size == 480 and mel_conf.fmax == 8000
    assert flow.input_embedding.embedding.weight.shape == (5121, 32)
    assert flow.encoder.encoders[0].self_attn.h == 2
    assert len(flow.encoder.encoders) == 2 and len(flow.encoder.up_encoders) == 2
    assert len(flow.decoder.estimator.blocks) == 2
    assert hift.upsample_scale == 480


def test_checkpoints_load_strictly(vocoder_dir: Path) -> None:
    parts = load_cosyvoice(vocoder_dir)
    flow_sd = torch.load(vocoder_dir / "flow.pt", weights_only=True)
    assert set(parts.flow.state_dict()) == set(flow_sd)
    assert all(torch.equal(parts.flow.state_dict()[k], v) for k, v in flow_sd.items())
    assert set(parts.hift.state_dict()) == set(torch.load(vocoder_dir / "hift.pt", weights_only=True))


@pytest.mark.parametrize("case", ["t2w_bf16", "t2w_nobf16"])
def test_reshape_reproduces_the_reference_flow_tokens(reference_dir: Path, case: str) -> None:
    _, ref = load_reference(reference_dir, f"token2wav/{case}")
    assert torch.equal(reshape_mixed_codes(ref["token_codes"]).unsqueeze(0), torch.from_numpy(ref["flow_token"]))
    assert torch.equal(
        reshape_mixed_codes(ref["prompt_codes"]).unsqueeze(0), torch.from_numpy(ref["flow_prompt_token"])
    )


@pytest.mark.parametrize("case", ["t2w_bf16", "t2w_nobf16"])
def test_flow_mel_matches_given_the_recorded_inputs_and_noise(reference_dir: Path, t2w: Token2Wav, case: str) -> None:
    _, ref = load_reference(reference_dir, f"token2wav/{case}")
    noise = np.load(reference_dir / "token2wav" / "flow_noise.npy")
    assert np.array_equal(noise, ref["flow_noise_used"])
    mel = t2w.flow.inference(
        torch.from_numpy(ref["flow_token"]),
        torch.from_numpy(ref["flow_prompt_token"]),
        prompt_feat=torch.from_numpy(ref["flow_prompt_feat"]),
        embedding=torch.from_numpy(ref["flow_embedding"]),
        noise=torch.from_numpy(noise),
    )
    assert mel.shape == ref["mel"].shape
    assert float((mel - torch.from_numpy(ref["mel"])).abs().max()) <= FLOW_MEL_TOL


@pytest.mark.parametrize(("case", "bf16"), [("t2w_bf16", True), ("t2w_nobf16", False)])
def test_speech_from_codes_is_within_the_sanity_bound(
    reference_dir: Path, vocoder_dir: Path, t2w: Token2Wav, case: str, bf16: bool
) -> None:
    _, ref = load_reference(reference_dir, f"token2wav/{case}")
    _, frontend = load_reference(reference_dir, "frontend/a")
    runner = Token2Wav(t2w.flow, t2w.hift, bf16_prompt_roundtrip=bf16)
    draws = HiftDraws(*(torch.from_numpy(ref[k]) for k in ("hift_rand_ini", "hift_sine_noise", "hift_source_noise")))
    speech = runner.token2wav(
        ref["token_codes"],
        ref["prompt_codes"],
        frontend["speech_feat"],
        frontend["speech_embedding"],
        noise=ref["flow_noise_used"],
        hift_draws=draws,
    )
    expected = torch.from_numpy(ref["speech"])
    assert speech.shape == expected.shape
    bound = END_TO_END_REL_TOL * float(expected.abs().max())
    assert float((speech - expected).abs().max()) <= bound


def test_the_bf16_hand_over_matters_as_the_readme_says(reference_dir: Path) -> None:
    """Guards the cast itself: the two reference variants really differ, so the bf16 test is not vacuous."""
    _, with_cast = load_reference(reference_dir, "token2wav/t2w_bf16")
    _, without = load_reference(reference_dir, "token2wav/t2w_nobf16")
    assert float(np.abs(with_cast["speech"] - without["speech"]).max()) > 0.1
