"""Write ``CosyVoice-300M-25Hz/`` with seeded random weights: the official layout, tiny or full size.

The ``cosyvoice.yaml`` has the official structure (the same ``!new:`` tags, keys and nesting as
the upstream file); only the widths and depths differ between sizes. ``flow.pt`` and ``hift.pt``
are built by our own yaml reader from that file, so their keys are exactly the official ones
(HiFT's weight-normed convs in the ``parametrizations.weight.original0/1`` form), filled from one
seeded generator with scales that keep activations finite. ``campplus.onnx`` is the small
stand-in from :mod:`bundles.campplus_stub`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model_files import VOCODER_DIR

logger = logging.getLogger(__name__)

WN_G_SUFFIX = "parametrizations.weight.original0"
WN_V_SUFFIX = "parametrizations.weight.original1"


@dataclass(frozen=True)
class VocoderDims:
    """The sizes that differ between the tiny and the official vocoder."""

    flow_width: int  # flow input_size = encoder width (2 x the per-codebook embedding)
    attention_heads: int
    num_blocks: int
    num_up_blocks: int
    linear_units: int
    dit_hidden: int
    dit_depth: int
    dit_heads: int
    dit_head_dim: int
    dit_mlp_ratio: float
    hift_base_channels: int


SIZES: dict[str, VocoderDims] = {
    # official values: docs/model.md §4.1, verified against the checkpoints' shapes (tests/data/checkpoint-keys)
    "full": VocoderDims(512, 8, 6, 4, 2048, 512, 16, 8, 64, 4.0, 512),
    "tiny": VocoderDims(32, 2, 2, 2, 64, 32, 2, 2, 16, 2.0, 16),
}

YAML_TEMPLATE = """\
# cosyvoice.yaml written by bundles/vocoder_bundle.py ({size} size, seeded random weights):
# the official structure and upstream class tags; only widths and depths differ from the release.
mel_conf:
    num_mels: 80
    n_fft: 1920
    hop_size: 480
    win_size: 1920
    sampling_rate: 24000
    fmin: 0
    fmax: 8000

flow: !new:stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: {d.flow_width}
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 5121
    input_embedding: !new:stepvocoder.cosyvoice2.embedding.dual_codebook.DualCodebookEmbedding
        vocab_size: 5121
        input_size: {d.flow_width}
    encoder: !new:stepvocoder.cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: {d.flow_width}
        output_size: {d.flow_width}
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: {d.num_blocks}
        num_up_blocks: {d.num_up_blocks}
        up_stride: 2
        up_scale_factor: 2
        attention_heads: {d.attention_heads}
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: {d.linear_units}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
    decoder: !new:stepvocoder.cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:stepvocoder.cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: {d.dit_mlp_ratio}
            depth: {d.dit_depth}
            num_heads: {d.dit_heads}
            head_dim: {d.dit_head_dim}
            hidden_size: {d.dit_hidden}

hift: !new:stepvocoder.cosyvoice2.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {d.hift_base_channels}
    nb_harmonics: 8
    sampling_rate: 24000
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:stepvocoder.cosyvoice2.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {d.hift_base_channels}
"""


def cosyvoice_yaml(size: str) -> str:
    """The ``cosyvoice.yaml`` text for ``size`` (``tiny`` or ``full``)."""
    if size not in SIZES:
        raise ValueError(f"vocoder bundle size must be one of {sorted(SIZES)}, got {size!r}")
    return YAML_TEMPLATE.format(size=size, d=SIZES[size])


def _random_like(key: str, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A seeded value for one parameter, scaled by its role so that activations stay finite."""
    shape = template.shape
    noise = torch.randn(shape, generator=generator)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("embedding.weight"):
        return noise
    if leaf in {"pos_bias_u", "pos_bias_v", "alpha"} or template.dim() == 1:
        # biases, LayerNorm affine, Snake alpha: near their neutral value
        is_scale = leaf == "alpha" or ("norm" in key and leaf == "weight") or key.endswith("out.1.weight")
        return (1.0 if is_scale else 0.0) + 0.05 * noise
    fan_in = math.prod(shape[1:])
    if "adaLN_modulation" in key:
        return noise * (0.2 / math.sqrt(fan_in))  # small modulation keeps adaLN near identity
    return noise / math.sqrt(fan_in)


def random_state_dict(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded values for every key of ``model``; weight-norm pairs get g = ||v|| (effective weight = v)."""
    template = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in template.items():
        if key.endswith(WN_G_SUFFIX):
            continue
        if key.endswith(WN_V_SUFFIX):
            v = _random_like(key.replace(WN_V_SUFFIX, "weight"), value, generator)
            if "ups." in key:  # ConvTranspose1d weight is (in, out, k): fan-in is the input axis
                v = v * math.sqrt(math.prod(v.shape[1:])) / math.sqrt(v.shape[0] * v.shape[2])
            out[key] = v
            g_key = key.replace(WN_V_SUFFIX, WN_G_SUFFIX)
            out[g_key] = v.flatten(1).norm(dim=1).reshape(template[g_key].shape)
            continue
        out[key] = _random_like(key, value, generator)
    return {k: out[k].to(template[k].dtype).contiguous() for k in template}


def _save_atomic(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_vocoder_bundle(editx_dir: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write ``<editx_dir>/CosyVoice-300M-25Hz/`` (yaml, flow.pt, hift.pt, campplus.onnx); returns it.

    The same ``size`` and ``seed`` always give the same weights.
    """
    from bundles.campplus_stub import write_campplus_onnx
    from vocoder.config import build_from_yaml

    text = cosyvoice_yaml(size)
    out_dir = Path(editx_dir) / VOCODER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = out_dir / "cosyvoice.yaml"
    yaml_path.write_text(text, encoding="utf-8")
    with torch.device("meta"):  # shapes only: the values come from the seeded generator
        _, flow, hift = build_from_yaml(yaml_path)
    generator = torch.Generator().manual_seed(seed)
    _save_atomic(random_state_dict(flow, generator), out_dir / "flow.pt")
    del flow
    _save_atomic(random_state_dict(hift, generator), out_dir / "hift.pt")
    del hift
    write_campplus_onnx(out_dir / "campplus.onnx", seed=seed)
    logger.info("Wrote the %s vocoder bundle to %s", size, out_dir)
    return out_dir
