"""Writes ``Step-Audio-EditX/`` LLM files (official names and layout) with seeded random weights.

Three sizes: ``tiny`` (tests and demo, ~7 MB, nearly all of it the 74752-row embedding and head),
``mid`` (CPU benchmarks) and ``full`` (the official 3.5 B dimensions, GPU benchmarks only; ~7 GB,
never written by tests). The vocabulary always stays
74752 because audio ids are 65536 + N. The files are what the official bundle holds: ``config.json``
with the official keys, one bf16 safetensors shard with the official key names, and its index.

Also writes the quantised variants from a base bundle, with the libraries users' checkpoints come
from: ``Step-Audio-EditX-AWQ-4bit/`` (compressed-tensors ``pack-quantized``, int4 symmetric group
quantisation, as llmcompressor writes it) and ``Step-Audio-EditX-bnb-4bit/`` (bitsandbytes NF4).

The random weights are shaped so that a tiny model behaves like a TTS LLM in one respect: every
``lm_head`` row except the audio ids and EOS is zero, so sampling (top-k 50) and greedy decoding
emit only audio ids, and EOS is drawn with a small probability per step, so generation ends. The
values themselves are noise. ``eos=False`` leaves the EOS row zero instead: its logit (0) never
reaches the top 50 audio logits, so every generation runs to its ``max_new_tokens`` cap and a
benchmark gets exactly the audio length it asks for.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llm.text_tokenizer import AUDIO_ID_OFFSET, N_AUDIO_CODES
from model_files import AWQ_DIR, BNB_DIR, EDITX_DIR

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model-00001-of-00001.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

VOCAB_SIZE = 74752
AUDIO_TOKEN_OFFSET = AUDIO_ID_OFFSET
N_AUDIO_TOKENS = N_AUDIO_CODES  # vq02 + vq06 codes: ids [65536, 70656)
EOS_TOKEN_ID = 3

# Dimensions per size. tiny: heads not a power of two (both ALiBi slope branches run); input
# widths multiples of 8 (int4 packing, group size 8).
LLM_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 24,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_attention_groups": 2,
    },
    "mid": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_attention_groups": 4,
    },
    "full": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 48,
        "num_attention_groups": 4,
    },
}
AWQ_GROUP_SIZE = 128  # the official AWQ checkpoint's; smaller models use the largest fitting power of 2

WEIGHT_STD = 0.02
NORM_JITTER = 0.05  # norm weights 1 + noise, so a model that skips them differs
AUDIO_LOGIT_STD = 2.0  # spread of audio logits (the final norm output has rms ~1 per dim)
EOS_LOGIT_STD = 2.6  # EOS beats the sampled audio ids now and then: generation ends


def llm_config_dict(size: str = "tiny") -> dict[str, Any]:
    """``config.json`` content for ``size``, with exactly the official keys."""
    if size not in LLM_SIZES:
        raise ValueError(f"LLM bundle size must be one of {sorted(LLM_SIZES)}, got {size!r}")
    return {
        "architectures": ["Step1ForCausalLM"],
        "model_type": "step1",
        "bos_token_id": 1,
        "pad_token_id": 0,
        "eos_token_id": EOS_TOKEN_ID,
        **LLM_SIZES[size],
        "max_seq_len": 32768,
        "vocab_size": VOCAB_SIZE,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
    }


def llm_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, in the official checkpoint's order."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    kv_width = hidden // int(config["num_attention_heads"]) * int(config["num_attention_groups"])
    vocab = int(config["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_width, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_width, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_llm_weights(
    config: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu", *, eos: bool = True
) -> dict[str, torch.Tensor]:
    """Seeded bf16 weights under the official keys (drawn in fp32 on ``device``, returned on CPU).

    ``eos=False``: the EOS row of ``lm_head`` stays zero (generation never stops by itself); the
    other weights are the same draws as with ``eos=True``.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = int(config["hidden_size"])
    out: dict[str, torch.Tensor] = {}
    for key, shape in llm_weight_shapes(config).items():
        if key.endswith("norm.weight"):
            w = 1.0 + NORM_JITTER * torch.randn(shape, generator=gen, device=device)
        elif key == "lm_head.weight":
            w = torch.zeros(shape, device=device)
            audio = slice(AUDIO_TOKEN_OFFSET, AUDIO_TOKEN_OFFSET + N_AUDIO_TOKENS)
            w[audio] = torch.randn((N_AUDIO_TOKENS, hidden), generator=gen, device=device)
            w[audio] *= AUDIO_LOGIT_STD / hidden**0.5
            eos_row = torch.randn((hidden,), generator=gen, device=device)
            if eos:
                w[EOS_TOKEN_ID] = eos_row * (EOS_LOGIT_STD / hidden**0.5)
        else:
            w = WEIGHT_STD * torch.randn(shape, generator=gen, device=device)
        out[key] = w.to(torch.bfloat16).cpu()
    return out


def write_llm_files(model_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """``config.json``, the single safetensors shard and its index into ``model_dir``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tmp = model_dir / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(model_dir / WEIGHTS_NAME)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict.fromkeys(sorted(tensors), WEIGHTS_NAME),
    }
    (model_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_text_tokenizer(editx_dir: Path) -> None:
    """The text tokenizer files, from the text-tokenizer writer when that module exists."""
    try:
        from bundles.text_tokenizer_bundle import write_text_tokenizer
    except ImportError:
        logger.warning("bundles.text_tokenizer_bundle is not available: no tokenizer files in %s", editx_dir)
        return
    write_text_tokenizer(editx_dir)


def write_llm_bundle(
    root: Path, size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu", *, eos: bool = True
) -> Path:
    """Write ``root/Step-Audio-EditX`` (config, weights, index, text tokenizer); return that dir.

    ``device`` only says where the random draws happen (``cuda`` makes the full size fast);
    ``eos=False`` writes a model that never stops before its token cap (see the module docstring).
    """
    config = llm_config_dict(size)
    editx = Path(root) / EDITX_DIR
    write_llm_files(editx, config, random_llm_weights(config, seed, device, eos=eos))
    _write_text_tokenizer(editx)
    logger.info("Wrote a %s Step1 bundle (seed %d) at %s", size, seed, editx)
    return editx


def _load_base_fp32(base_dir: Path) -> torch.nn.Module:
    """Our Step1 model from ``base_dir`` on CPU in fp32 (the quantisers' input)."""
    import llm  # noqa: F401 - registers Step1 with the Auto classes
    from llm.model import Step1ForCausalLM

    return Step1ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _copy_text_tokenizer(src: Path, dst: Path) -> None:
    """Tokenizer files travel with each variant dir, as in the published variant repos."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_awq_bundle(root: Path, group_size: int | None = None) -> Path:
    """Quantise ``root/Step-Audio-EditX`` to ``root/Step-Audio-EditX-AWQ-4bit`` with compressed-tensors.

    Same format as the official AWQ checkpoint (llmcompressor's output): every Linear but
    ``lm_head`` as int4 symmetric per-group ``pack-quantized`` (``weight_packed`` int32,
    ``weight_scale``, ``weight_shape``), min-max scales; ``config.json`` gains the
    ``quantization_config``. No calibration data: AWQ's activation-aware smoothing only changes
    the values, not the format the loader reads.
    """
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    base = Path(root) / EDITX_DIR
    config = json.loads((base / CONFIG_NAME).read_text())
    if group_size is None:
        group_size = AWQ_GROUP_SIZE
        while int(config["hidden_size"]) % group_size or int(config["intermediate_size"]) % group_size:
            group_size //= 2
    model = _load_base_fp32(base)
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, observer="minmax"
    )
    qconfig = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, qconfig, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                linear: Any = module  # a quantised Linear: weight_scale / weight_zero_point were added
                groups = linear.weight.view(linear.weight.shape[0], -1, group_size)
                scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
                linear.weight_scale.copy_(scale)
                linear.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    tensors = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()
    }
    out = Path(root) / AWQ_DIR
    write_llm_files(out, config, tensors)
    compressor.update_config(str(out))  # adds quantization_config (quant_method compressed-tensors)
    _copy_text_tokenizer(base, out)
    logger.info("Wrote a compressed-tensors int4 (group %d) checkpoint at %s", group_size, out)
    return out


def write_bnb_bundle(root: Path) -> Path:
    """Quantise ``root/Step-Audio-EditX`` to NF4 with bitsandbytes and save ``root/Step-Audio-EditX-bnb-4bit``.

    The pre-quantised form the fork loads: transformers' bnb 4-bit serialisation (``weight`` uint8
    plus ``weight.absmax``/``quant_map``/``quant_state`` entries), ``quantization_config`` in
    ``config.json``. Raises whatever bitsandbytes raises where it cannot run.
    """
    from transformers import BitsAndBytesConfig

    import llm  # noqa: F401 - registers Step1 with the Auto classes
    from llm.model import Step1ForCausalLM

    base = Path(root) / EDITX_DIR
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )
    model = Step1ForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    out = Path(root) / BNB_DIR
    model.save_pretrained(out)
    _copy_text_tokenizer(base, out)
    logger.info("Wrote a bitsandbytes NF4 checkpoint at %s", out)
    return out
