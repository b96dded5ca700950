"""Writes ``Step-Audio-Tokenizer/`` in the official layout with seeded random weights.

Layout (docs/model.md §1.2)::

    Step-Audio-Tokenizer/
      linguistic_tokenizer.npy            float32 (1024, D) k-means centres for vq02
      speech_tokenizer_v1.onnx            S3-style encoder: feats (1,128,T) f32 + feats_length (1,) i32
                                          -> indices (1, ceil(ceil(T/2)/2)) i64 in [0, 4096)
      dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online/
        config.yaml  model.pt  am.mvn  tokens.json  tokens.txt  configuration.json

``model.pt`` is the state_dict of a real funasr ``ParaformerStreaming`` built from the written
``config.yaml`` (encoder, decoder and CIF predictor, as the official file holds), so the keys are
funasr's own. ``tiny`` takes about a second and 1.5 MB; ``full`` has the official dimensions
(50 SAN-M blocks d512 + 16 decoder blocks, vocab 8501: ~0.9 GB; S3 encoder 6 blocks x 1280,
20 heads, 4096 codes: ~0.5 GB) and is only for benchmarks, written to a temporary folder.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from audio_codes import VQ02_CODES, VQ06_CODES
from model_files import FUNASR_MODEL_ID, TOKENIZER_DIR

N_MELS_FBANK = 80
LFR_M = 7
LFR_N = 6
FEATS_DIM = N_MELS_FBANK * LFR_M  # 560
VQ06_N_MELS = 128
ONNX_OPSET = 17


@dataclass(frozen=True)
class TokenizerDims:
    """Sizes of one bundle; ``full`` is the official model's."""

    enc_size: int  # SAN-M width (vq02 code dimension)
    enc_heads: int
    enc_ffn: int
    enc_blocks: int  # 1 input block (encoders0) + enc_blocks - 1
    dec_ffn: int
    dec_blocks: int
    vocab: int  # Paraformer token list
    s3_width: int
    s3_heads: int
    s3_blocks: int
    s3_positions: int


DIMS: dict[str, TokenizerDims] = {
    "tiny": TokenizerDims(32, 4, 64, 3, 64, 1, 40, 64, 2, 1, 1500),
    "full": TokenizerDims(512, 4, 2048, 50, 2048, 16, 8501, 1280, 20, 6, 1500),
}


def write_tokenizer_bundle(root: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write ``root/Step-Audio-Tokenizer`` (overwriting its files) and return that folder."""
    if size not in DIMS:
        raise ValueError(f"tokenizer bundle size must be one of {sorted(DIMS)}, got {size!r}")
    dims = DIMS[size]
    out = Path(root) / TOKENIZER_DIR
    model_dir = out / FUNASR_MODEL_ID
    model_dir.mkdir(parents=True, exist_ok=True)
    tokens = _token_list(dims.vocab)
    config = funasr_config(dims)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (model_dir / "configuration.json").write_text(json.dumps(_configuration_json(), indent=2))
    (model_dir / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    (model_dir / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    (model_dir / "am.mvn").write_text(_am_mvn(np.random.default_rng(seed + 1)))
    torch.save(_paraformer_state_dict(config, len(tokens), seed), model_dir / "model.pt")
    codebook = np.random.default_rng(seed + 2).standard_normal((VQ02_CODES, dims.enc_size)).astype(np.float32)
    np.save(out / "linguistic_tokenizer.npy", codebook)
    export_s3_tokenizer(out / "speech_tokenizer_v1.onnx", dims, seed + 3)
    return out


# ----------------------------------------------------------------------------------------------
# FunASR Paraformer (vq02)
# ----------------------------------------------------------------------------------------------


def funasr_config(dims: TokenizerDims) -> dict:
    """The ``config.yaml`` of a streaming Paraformer-large with these sizes (official keys)."""
    return {
        "model": "ParaformerStreaming",
        "model_conf": {
            "ctc_weight": 0.0,
            "lsm_weight": 0.1,
            "length_normalized_loss": True,
            "predictor_weight": 1.0,
            "predictor_bias": 1,
            "sampling_ratio": 0.75,
        },
        "encoder": "SANMEncoderChunkOpt",
        "encoder_conf": {
            "output_size": dims.enc_size,
            "attention_heads": dims.enc_heads,
            "linear_units": dims.enc_ffn,
            "num_blocks": dims.enc_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe_online",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": 11,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
            "chunk_size": [12, 15],
            "stride": [8, 10],
            "pad_left": [0, 0],
            "encoder_att_look_back_factor": [4, 4],
            "decoder_att_look_back_factor": [1, 1],
        },
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            "attention_heads": dims.enc_heads,
            "linear_units": dims.dec_ffn,
            "num_blocks": dims.dec_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "self_attention_dropout_rate": 0.1,
            "src_attention_dropout_rate": 0.1,
            "att_layer_num": dims.dec_blocks,
            "kernel_size": 11,
            "sanm_shfit": 5,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": dims.enc_size, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontendOnline",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": N_MELS_FBANK,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": LFR_M,
            "lfr_n": LFR_N,
        },
        "specaug": "SpecAugLFR",
        "specaug_conf": {
            "apply_time_warp": False,
            "time_warp_window": 5,
            "time_warp_mode": "bicubic",
            "apply_freq_mask": True,
            "freq_mask_width_range": [0, 30],
            "lfr_rate": LFR_N,
            "num_freq_mask": 1,
            "apply_time_mask": True,
            "time_mask_width_range": [0, 12],
            "num_time_mask": 1,
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def _configuration_json() -> dict:
    return {
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "file_path_metas": {
            "init_param": "model.pt",
            "config": "config.yaml",
            "tokenizer_conf": {"token_list": "tokens.json", "seg_dict_file": "seg_dict"},
            "frontend_conf": {"cmvn_file": "am.mvn"},
        },
    }


def _token_list(vocab: int) -> list[str]:
    """``<blank> <s> </s>``, then letters and CJK characters, ``<unk>`` last (funasr's order)."""
    body = [chr(ord("a") + i) for i in range(26)]
    body += [chr(0x4E00 + i) for i in range(max(0, vocab - 4 - len(body)))]
    return ["<blank>", "<s>", "</s>", *body[: vocab - 4], "<unk>"]


def _am_mvn(rng: np.random.Generator) -> str:
    """Kaldi nnet CMVN text: ``(x + shift) * scale`` over the 560 LFR dims, log-fbank-like values."""
    shift = -rng.uniform(4.0, 13.0, FEATS_DIM)
    scale = rng.uniform(0.1, 0.3, FEATS_DIM)

    def row(v: np.ndarray) -> str:
        return "<LearnRateCoef> 0 [ " + " ".join(f"{x:.6f}" for x in v) + " ]"

    return (
        f"<Nnet>\n<Splice> {FEATS_DIM} {FEATS_DIM}\n[ 0 ]\n"
        f"<AddShift> {FEATS_DIM} {FEATS_DIM}\n{row(shift)}\n"
        f"<Rescale> {FEATS_DIM} {FEATS_DIM}\n{row(scale)}\n</Nnet>\n"
    )


def _paraformer_state_dict(config: dict, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """State dict of funasr's own ``ParaformerStreaming`` built from ``config``, seeded init."""
    from tokenizer import import_funasr

    import_funasr()
    from funasr.register import tables

    model_cls = tables.model_classes[config["model"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(
            **config["model_conf"],
            encoder=config["encoder"],
            encoder_conf=config["encoder_conf"],
            decoder=config["decoder"],
            decoder_conf=config["decoder_conf"],
            predictor=config["predictor"],
            predictor_conf=config["predictor_conf"],
            input_size=FEATS_DIM,
            vocab_size=vocab,
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# S3 tokenizer stand-in (vq06)
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Whisper encoder block: pre-LN self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.mlp_ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, T, C) -> (1, T, C)."""
        h = self.attn_ln(x)
        b, t, c = h.shape
        d = c // self.heads
        q = self.query(h).view(b, t, self.heads, d).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, d).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, d).transpose(1, 2)
        w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        x = x + self.out((w @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.mlp_ln(x))


class S3TokenizerStandIn(nn.Module):
    """A Whisper-style encoder + cosine codebook with the real S3 tokenizer's I/O signature."""

    positional_embedding: torch.Tensor  # buffer (positions, width)

    def __init__(self, dims: TokenizerDims) -> None:
        super().__init__()
        width = dims.s3_width
        self.conv1 = nn.Conv1d(VQ06_N_MELS, width, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", _sinusoids(dims.s3_positions, width))
        self.blocks = nn.ModuleList([_Block(width, dims.s3_heads) for _ in range(dims.s3_blocks)])
        self.embed = nn.Parameter(torch.randn(VQ06_CODES, width))

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        """feats: (1, 128, T) float32, feats_length: (1,) int32 -> (1, ceil(ceil(T/2)/2)) int64.

        Frames at or beyond ``feats_length`` are zeroed, so the length input is part of the graph.
        """
        t = feats.shape[2]
        valid = torch.arange(t, device=feats.device)[None, None, :] < feats_length.to(torch.int64)[:, None, None]
        x = feats * valid.to(feats.dtype)
        x = nn.functional.gelu(self.conv1(x))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)  # (1, T4, C)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        sims = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.embed, dim=-1).t()
        return sims.argmax(dim=-1)


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's sinusoidal position table (length, channels)."""
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def export_s3_tokenizer(path: Path, dims: TokenizerDims, seed: int) -> None:
    """Export a seeded ``S3TokenizerStandIn`` to ONNX with a dynamic frame axis."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = S3TokenizerStandIn(dims).eval()
    example = (torch.zeros(1, VQ06_N_MELS, 64), torch.tensor([64], dtype=torch.int32))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["feats", "feats_length"],
            output_names=["indices"],
            dynamic_axes={"feats": {2: "T"}, "indices": {1: "T4"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
