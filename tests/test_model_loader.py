"""model_loader: torch policy, bundle resolution, model sources, LLM variants, the shared registry."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model_loader as ml
from bundles.llm_bundle import (
    AWQ_DIR,
    BNB_DIR,
    EDITX_DIR,
    WEIGHTS_NAME,
    write_awq_bundle,
    write_bnb_bundle,
    write_llm_bundle,
)
from errors import ModelLoadError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root with base, AWQ and pre-quantised bnb LLMs and an (empty) audio tokenizer dir."""
    root = tmp_path_factory.mktemp("bundle")
    write_llm_bundle(root, size="tiny", seed=1)
    write_awq_bundle(root)
    write_bnb_bundle(root)
    (root / ml.TOKENIZER_DIR).mkdir()
    return root


@pytest.fixture(scope="module")
def registry(root: Path) -> ml.ModelRegistry:
    return ml.ModelRegistry(ml.resolve_bundle(root), CPU, torch.float32)


def _ids() -> torch.Tensor:
    return torch.arange(65536, 65536 + 40).view(2, 20)


# --- device, dtype, TF32 ---------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert ml.resolve_device("cpu") == CPU
    assert ml.resolve_device(" CPU ") == CPU
    assert ml.resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ModelLoadError, match="device"):
            ml.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_a_load_error() -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            ml.resolve_device(spec)


def test_resolve_dtype() -> None:
    assert ml.resolve_dtype("auto", CPU) is torch.float32
    assert ml.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert ml.resolve_dtype("bfloat16", CPU) is torch.bfloat16
    assert ml.resolve_dtype("fp16", CPU) is torch.float16
    assert ml.resolve_dtype("float32", torch.device("cuda")) is torch.float32
    with pytest.raises(ModelLoadError, match="dtype"):
        ml.resolve_dtype("int8", CPU)


@pytest.fixture
def restore_tf32_flags() -> Iterator[None]:
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    yield
    matmul.fp32_precision, conv.fp32_precision = saved


def test_tf32_is_enabled_and_logged_when_cuda_is_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, restore_tf32_flags: None, root: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="model_loader"):
        ml.ModelRegistry(ml.resolve_bundle(root), torch.device("cuda"), torch.bfloat16)
    assert "TF32 acceleration enabled" in caplog.messages
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_no_tf32_without_cuda(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, restore_tf32_flags: None, root: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.backends.cuda.matmul.fp32_precision
    with caplog.at_level(logging.INFO, logger="model_loader"):
        assert ml.enable_tf32() is False
        ml.ModelRegistry(ml.resolve_bundle(root), CPU, torch.float32)
    assert "TF32 acceleration enabled" not in caplog.messages
    assert torch.backends.cuda.matmul.fp32_precision == before


# --- bundle resolution ---------------------------------------------------------------------------------


def test_root_form(root: Path) -> None:
    paths = ml.resolve_bundle(root)
    assert paths.root == root and paths.editx == root / EDITX_DIR
    assert paths.tokenizer == root / ml.TOKENIZER_DIR
    assert paths.vocoder == root / EDITX_DIR / ml.VOCODER_DIR
    assert paths.awq == root / AWQ_DIR and paths.bnb == root / BNB_DIR


def test_editx_dir_form_with_tokenizer_as_sub_path_or_path(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editx = root / EDITX_DIR
    by_sub_path = ml.resolve_bundle(editx, ml.TOKENIZER_DIR)
    assert by_sub_path.editx == editx and by_sub_path.root == root
    assert by_sub_path.tokenizer == root / ml.TOKENIZER_DIR
    elsewhere = tmp_path / "tok"
    elsewhere.mkdir()
    assert ml.resolve_bundle(editx, str(elsewhere)).tokenizer == elsewhere
    monkeypatch.chdir(tmp_path)
    assert ml.resolve_bundle(editx, "tok").tokenizer == Path("tok")
    custom = ml.resolve_bundle(editx, awq_path=tmp_path / "a", bnb_path=str(tmp_path / "b"))
    assert custom.awq == tmp_path / "a" and custom.bnb == tmp_path / "b"


def test_missing_parts_are_load_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no Step1 model"):
        ml.resolve_bundle(tmp_path)
    with pytest.raises(ModelLoadError, match="audio tokenizer directory 'nope'"):
        ml.resolve_bundle(root, "nope")
    assert ml.resolve_bundle(root, "nope", require_tokenizer=False).tokenizer == root / "nope"


# --- model sources ----------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[tuple[str, Path, str]]:
    """A stand-in for the model hubs (the network boundary): copies repos from the tiny bundle."""
    calls: list[tuple[str, Path, str]] = []
    published = {repo: name for name, repo in ml.REPO_IDS.items()}

    def fake_download(repo_id: str, local_dir: Path, source: str) -> Path:
        calls.append((repo_id, local_dir, source))
        shutil.copytree(root / published[repo_id], local_dir)
        return local_dir

    monkeypatch.setattr(ml, "download_snapshot", fake_download)
    return calls


def test_local_source_never_downloads(hub: list, tmp_path: Path) -> None:
    ml.fetch_bundle(tmp_path / "absent", "local")
    assert hub == []
    with pytest.raises(ModelLoadError):
        ml.resolve_bundle(tmp_path / "absent")


@pytest.mark.parametrize("source", ["auto", "huggingface", "modelscope"])
def test_remote_sources_download_only_what_is_missing(hub: list, tmp_path: Path, source: str, root: Path) -> None:
    target = tmp_path / "models"
    ml.fetch_bundle(target, source, variants=("base", "awq"))
    expected_hub = "huggingface" if source == "auto" else source
    assert hub == [
        ("stepfun-ai/Step-Audio-EditX", target / EDITX_DIR, expected_hub),
        ("stepfun-ai/Step-Audio-Tokenizer", target / ml.TOKENIZER_DIR, expected_hub),
        ("stepfun-ai/Step-Audio-EditX-AWQ-4bit", target / AWQ_DIR, expected_hub),
    ]
    paths = ml.resolve_bundle(target)
    assert paths.editx == target / EDITX_DIR
    hub.clear()
    ml.fetch_bundle(target, source, variants=("base", "awq"))  # everything is local now
    ml.fetch_bundle(root / EDITX_DIR, source)  # the EditX-dir form, already local
    assert hub == []


def test_download_failures_and_bad_sources_are_load_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(repo_id: str, local_dir: Path, source: str) -> Path:
        raise OSError("network unreachable")

    monkeypatch.setattr(ml, "download_snapshot", offline)
    with pytest.raises(ModelLoadError, match=r"stepfun-ai/Step-Audio-EditX .*network unreachable"):
        ml.fetch_bundle(tmp_path / "m", "huggingface")
    with pytest.raises(ModelLoadError, match="model source 'ftp'"):
        ml.fetch_bundle(tmp_path / "m", "ftp")


# --- variants ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "awq", "bnb"])
def test_every_variant_loads_and_generates(registry: ml.ModelRegistry, variant: str) -> None:
    model = registry.get_llm(variant)
    base = registry.get_llm("base")
    with torch.inference_mode():
        logits = model(_ids()).logits.float()
        reference = base(_ids()).logits
        out = model.generate(_ids(), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 24) and (out[:, 20:] >= 65536).all()
    diff = (logits - reference).abs().max().item()
    if variant == "base":
        assert diff == 0.0
    else:  # 4-bit weights: close to, but not equal to, the base model
        assert 0.0 < diff < 0.3 * reference.abs().max().item()


def test_awq_weights_are_the_packed_int4_values(root: Path, registry: ml.ModelRegistry) -> None:
    """Unpack the checkpoint by hand (8 nibbles per int32, low first, offset 8, per-group scale)."""
    stored = load_file(str(root / AWQ_DIR / WEIGHTS_NAME))
    group = json.loads((root / AWQ_DIR / "config.json").read_text())["quantization_config"]
    group = group["config_groups"]["group_0"]["weights"]
    assert (group["num_bits"], group["symmetric"], group["strategy"]) == (4, True, "group")
    base = load_file(str(root / EDITX_DIR / WEIGHTS_NAME))
    model = registry.get_llm("awq")
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        packed, scale = stored[f"{name}.weight_packed"], stored[f"{name}.weight_scale"].float()
        nibbles = torch.stack([(packed >> (4 * s)) & 0xF for s in range(8)], dim=-1).reshape(packed.shape[0], -1) - 8
        weight = (nibbles.float().view(scale.shape[0], scale.shape[1], -1) * scale[..., None]).flatten(1)
        assert torch.equal(module.weight, weight), name
        error = (weight - base[f"{name}.weight"].float()).view(*scale.shape, -1).abs()
        assert (error <= 0.55 * scale[..., None]).all(), name  # half a step (+ bf16 rounding of the scale)
    assert torch.equal(model.lm_head.weight, base["lm_head.weight"].float())


def test_prequantised_bnb_equals_runtime_nf4(root: Path) -> None:
    runtime = ml.load_llm(root / EDITX_DIR, "bnb", CPU, torch.float32, quantized_dir=root / "absent")
    stored = ml.load_llm(root / EDITX_DIR, "bnb", CPU, torch.float32, quantized_dir=root / BNB_DIR)
    with torch.inference_mode():
        assert torch.equal(runtime(_ids()).logits, stored(_ids()).logits)


def test_unloadable_variants_fail_at_load_time_with_the_reason(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editx = root / EDITX_DIR
    with pytest.raises(ModelLoadError, match="'awq': no checkpoint"):
        ml.load_llm(editx, "awq", CPU, torch.float32, quantized_dir=tmp_path / "absent")
    with pytest.raises(ModelLoadError, match=r"'awq'.*not a compressed-tensors checkpoint"):
        ml.load_llm(editx, "awq", CPU, torch.float32, quantized_dir=root / BNB_DIR)
    with pytest.raises(ModelLoadError, match=r"'bnb'.*not a bitsandbytes checkpoint"):
        ml.load_llm(editx, "bnb", CPU, torch.float32, quantized_dir=root / AWQ_DIR)
    with pytest.raises(ModelLoadError, match="'int8' is not one of base, awq, bnb"):
        ml.load_llm(editx, "int8", CPU, torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without the library
    with pytest.raises(ModelLoadError, match="'bnb' needs the bitsandbytes package"):
        ml.load_llm(editx, "bnb", CPU, torch.float32)


def test_checkpoint_that_does_not_match_step1_is_rejected(root: Path, tmp_path: Path) -> None:
    broken = tmp_path / EDITX_DIR
    shutil.copytree(root / EDITX_DIR, broken)
    tensors = load_file(str(broken / WEIGHTS_NAME))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(tensors, str(broken / WEIGHTS_NAME), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(tensors, WEIGHTS_NAME)
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"'base'.*does not match Step1.*up_proj.*extra"):
        ml.load_llm(broken, "base", CPU, torch.float32)


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_loads_each_component_once_across_threads(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = ml.ModelRegistry(ml.resolve_bundle(root), CPU, torch.float32)
    results: list[torch.nn.Module] = []
    with caplog.at_level(logging.INFO, logger="model_loader"):
        threads = [threading.Thread(target=lambda: results.append(registry.get_llm("base"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4 and all(m is results[0] for m in results)
    assert sum("Loaded Step1 variant base" in m for m in caplog.messages) == 1
    assert registry.load_llms(["base"]) == {"base": results[0]}
    assert registry.loaded == ["llm:base"]


def test_registry_remembers_a_failed_variant(root: Path, tmp_path: Path) -> None:
    registry = ml.ModelRegistry(ml.resolve_bundle(root, awq_path=tmp_path / "absent"), CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="'awq'") as first:
        registry.get_llm("awq")
    with pytest.raises(ModelLoadError) as second:
        registry.get_llm("awq")
    assert second.value is first.value and registry.loaded == []
