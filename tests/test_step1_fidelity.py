"""Step1 against the reference: strict load of the fixture checkpoint and its logits (docs/model.md §3.1).

The fixture bundle's LLM was run by the reference remote code in fp32 on CPU
(the fixtures' step1_logits set); skipped where the fixtures are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from model_loader import load_llm
from tests.conftest import load_reference

pytestmark = pytest.mark.fixtures

TOLERANCE = 1e-4  # the fp32 reference differs from an fp64 re-run by up to 5.7e-6


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    return load_reference(reference_dir, "step1_logits/lm_clone_short")


@pytest.fixture(scope="module")
def model(reference_dir: Path) -> torch.nn.Module:
    # load_llm raises ModelLoadError on any missing, unexpected or mismatched key (strict)
    return load_llm(reference_dir / "bundle" / "Step-Audio-EditX", "base", torch.device("cpu"), torch.float32)


def test_fixture_checkpoint_loads_strictly_into_our_class(reference_dir: Path) -> None:
    import llm  # noqa: F401
    from llm.model import Step1ForCausalLM

    model, info = Step1ForCausalLM.from_pretrained(
        reference_dir / "bundle" / "Step-Audio-EditX", dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_logits_without_cache_match_the_reference(model: torch.nn.Module, reference: tuple) -> None:
    _meta, arrays = reference
    ids = torch.from_numpy(arrays["input_ids"]).view(1, -1)
    positions = torch.from_numpy(arrays["positions"])
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0].float()
    assert np.abs(logits[positions].numpy() - arrays["logits_full"]).max() <= TOLERANCE
    assert np.array_equal(logits.argmax(-1).numpy(), arrays["argmax_full"])


def test_logits_with_cache_match_the_reference(model: torch.nn.Module, reference: tuple) -> None:
    """The reference's protocol: prefill ids[:prefill], then one token per call."""
    meta, arrays = reference
    ids = torch.from_numpy(arrays["input_ids"]).view(1, -1)
    prefill = int(meta["prefill"])
    cache = DynamicCache()
    with torch.inference_mode():
        first = model(ids[:, :prefill], cache=cache, use_cache=True).logits[0]
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[0] for t in range(prefill, ids.shape[1])]
    stepped = torch.cat(steps).float().numpy()
    assert np.abs(stepped - arrays["logits_cached"]).max() <= TOLERANCE
    argmax = torch.cat([first, *steps]).argmax(-1).numpy()
    assert np.array_equal(argmax, arrays["argmax_cached"])
