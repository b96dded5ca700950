"""HiFT against the reference fixtures, stage by stage (docs/model.md §4.5, §8).

Each stage is fed the reference's output of the previous one: mel -> f0, f0 + recorded draws ->
source, (mel, source) -> waveform; then the whole generator with the recorded draws, and with
the seed the runner used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import load_reference
from vocoder.hift import ConvRNNF0Predictor, HiftDraws, HiFTGenerator, draw_hift_noise, load_hift_state_dict

pytestmark = pytest.mark.fixtures

VOCODER_REL = Path("bundle/Step-Audio-EditX/CosyVoice-300M-25Hz")
CASES = ["token2wav/t2w_bf16", "token2wav/t2w_nobf16"]
F0_TOL = 5e-4  # Hz
SOURCE_TOL = 1e-3
DECODE_TOL = 1e-4
WHOLE_REL_TOL = 1e-2  # × max|speech|: a sanity bound (the NSF phase amplifies fp32 noise)


def read_hift_block(vocoder_dir: Path) -> dict[str, Any]:
    """The yaml's ``hift:`` block as plain data (each ``!new:`` node read as its argument mapping)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!new:", lambda loader, _suffix, node: loader.construct_mapping(node, deep=True))
    return dict(yaml.load((vocoder_dir / "cosyvoice.yaml").read_text(), Loader=Loader)["hift"])


def build_hift(vocoder_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> HiFTGenerator:
    block = read_hift_block(vocoder_dir)
    f0_predictor = ConvRNNF0Predictor(**block.pop("f0_predictor"))
    model = HiFTGenerator(**block, f0_predictor=f0_predictor)
    load_hift_state_dict(model, state_dict if state_dict is not None else vocoder_dir / "hift.pt")
    return model.eval()


@pytest.fixture(scope="module")
def vocoder_dir(reference_dir: Path) -> Path:
    return reference_dir / VOCODER_REL


@pytest.fixture(scope="module")
def hift(vocoder_dir: Path) -> HiFTGenerator:
    return build_hift(vocoder_dir)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest, reference_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta, arrays = load_reference(reference_dir, request.param)
    return meta, {k: torch.from_numpy(v) for k, v in arrays.items()}


def recorded_draws(ref: dict[str, torch.Tensor]) -> HiftDraws:
    return HiftDraws(ref["hift_rand_ini"], ref["hift_sine_noise"], ref["hift_source_noise"])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_checkpoint_loads_strictly_with_official_names(vocoder_dir: Path, hift: HiFTGenerator) -> None:
    stored = torch.load(vocoder_dir / "hift.pt", map_location="cpu", weights_only=True)
    assert set(stored) == set(hift.state_dict())
    for key, value in hift.state_dict().items():
        assert torch.equal(value, stored[key]), key


def test_f0_from_reference_mel(hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]) -> None:
    _, ref = case
    with torch.no_grad():
        f0 = hift.predict_f0(ref["mel"])
    assert max_abs(f0, ref["f0"]) <= F0_TOL


def test_source_from_reference_f0_and_recorded_draws(
    hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]
) -> None:
    _, ref = case
    with torch.no_grad():
        source = hift.source_from_f0(ref["f0"], draws=recorded_draws(ref))
    assert max_abs(source.transpose(1, 2), ref["hift_source"]) <= SOURCE_TOL


def test_decode_of_reference_mel_and_source(hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]) -> None:
    _, ref = case
    with torch.no_grad():
        speech = hift.decode(ref["mel"], ref["hift_source"].transpose(1, 2))
    assert max_abs(speech, ref["speech"]) <= DECODE_TOL


def test_whole_hift_with_recorded_draws(hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]) -> None:
    _, ref = case
    speech = hift.inference(ref["mel"], draws=recorded_draws(ref))
    assert speech.shape == ref["speech"].shape == (1, ref["mel"].shape[2] * 480)
    assert max_abs(speech, ref["speech"]) <= WHOLE_REL_TOL * float(ref["speech"].abs().max())


def test_runner_seed_reproduces_the_recorded_draws(
    hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]
) -> None:
    meta, ref = case
    generator = torch.Generator().manual_seed(int(meta["hift"]["seed"]))
    draws = draw_hift_noise(1, ref["mel"].shape[2] * 480, 9, generator)
    assert torch.equal(draws.rand_ini, ref["hift_rand_ini"])
    assert torch.equal(draws.sine_noise, ref["hift_sine_noise"])
    assert draws.source_noise is not None
    assert torch.equal(draws.source_noise, ref["hift_source_noise"])
    seeded = hift.inference(ref["mel"], generator=torch.Generator().manual_seed(int(meta["hift"]["seed"])))
    assert torch.equal(seeded, hift.inference(ref["mel"], draws=recorded_draws(ref)))


def test_legacy_weight_norm_form_gives_identical_outputs(
    vocoder_dir: Path, hift: HiFTGenerator, case: tuple[dict, dict[str, torch.Tensor]]
) -> None:
    _, ref = case
    stored = torch.load(vocoder_dir / "hift.pt", map_location="cpu", weights_only=True)
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in stored.items()
    }
    assert sum(k.endswith(".weight_g") for k in legacy) == 82
    old_form = build_hift(vocoder_dir, legacy)
    draws = recorded_draws(ref)
    assert torch.equal(old_form.inference(ref["mel"], draws=draws), hift.inference(ref["mel"], draws=draws))
    assert np.isfinite(ref["speech"].numpy()).all()
