"""The flow's token encoder: dual-codebook embedding and the upsampling conformer (25 Hz -> 50 Hz).

Parameter names reproduce the official ``flow.pt`` keys under ``input_embedding.`` and ``encoder.``
(see docs/model.md §4.4). The conformer is ESPnet's: relative-position self-attention
("rel_selfattn" with ``pos_bias_u``/``pos_bias_v``/``linear_pos`` and the relative shift) over the
"rel_pos_espnet" sinusoidal table, pre-norm blocks without macaron FFN or convolution module.
Every module is stateless: the whole-utterance path is ``forward``; the streaming path
(``forward_chunk``) carries its left context in an explicit :class:`ConformerCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

# Upstream names of the only layer variants the released checkpoint uses.
SUPPORTED_INPUT_LAYER = "linear"
SUPPORTED_POS_ENC = "rel_pos_espnet"
SUPPORTED_SELF_ATTN = "rel_selfattn"
SUPPORTED_ACTIVATION = "swish"
CONFORMER_NORM_EPS = 1e-12  # norm_mha / norm_ff (wenet convention)
POS_ENC_BASE = 10000.0
POS_TABLE_STEP = 5000  # relative tables are built for multiples of this length and sliced (the reference: 5000)
ATTN_QUERY_BLOCK = 256  # long inputs: scores are formed for this many queries at a time (bounded memory)
ATTN_BLOCK_ABOVE = 1024  # ... when the sequence is longer than this


@dataclass
class ConformerCache:
    """Streaming state of :class:`UpsampleConformerEncoderV2`, grown chunk by chunk, never truncated.

    lookahead: (B, C, k-1) last conv1 outputs of the look-ahead layer (conv2's left context);
    upsample: (B, C, 2*stride) tail of the x``stride`` upsampled input (the up conv's left context);
    keys/values: one (B, H, T, d_k) tensor per conformer layer (first-stage layers, then up-stage
    layers), oldest frame first; the first stage holds T token frames, the up stage ``stride`` * T.
    """

    lookahead: torch.Tensor | None = None
    upsample: torch.Tensor | None = None
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def frames(self) -> int:
        """Token frames (25 Hz) already encoded, i.e. the first stage's attention-cache length."""
        return int(self.keys[0].size(2)) if self.keys else 0


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``True`` at valid frames: (B,) lengths -> (B, 1, max_len) bool."""
    steps = torch.arange(max_len, device=lengths.device)
    return (steps[None, :] < lengths[:, None]).unsqueeze(1)


class DualCodebookEmbedding(nn.Module):
    """One table shared by both code streams; the two halves are concatenated (vq02 first)."""

    def __init__(self, vocab_size: int, input_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, input_size // 2)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B, T, 2) int64 flow ids -> (B, T, input_size)."""
        return torch.cat([self.embedding(token[..., 0]), self.embedding(token[..., 1])], dim=-1)


def rel_pos_table(d_model: int, length: int) -> torch.Tensor:
    """The ESPnet relative table for offsets +(length-1) .. -(length-1): (1, 2*length-1, d_model).

    Row k holds the encoding of relative position ``(length - 1) - k`` (query index minus key
    index), sin on even and cos on odd channels, computed in fp32 like the reference. Every entry
    depends only on its relative position, so a longer table sliced at its centre is identical.
    """
    size = -(-length // POS_TABLE_STEP) * POS_TABLE_STEP
    table = _rel_pos_table(d_model, size)
    return table[:, size - length : size + length - 1]


@lru_cache(maxsize=2)
def _rel_pos_table(d_model: int, length: int) -> torch.Tensor:
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(POS_ENC_BASE) / d_model))
    positive = torch.zeros(length, d_model)
    negative = torch.zeros(length, d_model)
    positive[:, 0::2] = torch.sin(position * div_term)
    positive[:, 1::2] = torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-1 * position * div_term)
    negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0).unsqueeze(0)


class RelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(d) and returns the relative table for its length (no parameters)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> (x * sqrt(D), pos_emb (1, 2T-1, D))."""
        pos_emb = rel_pos_table(self.d_model, x.size(1)).to(device=x.device, dtype=x.dtype)
        return x * self.xscale, pos_emb


class LinearInput(nn.Module):
    """``input_layer: linear``: Linear + LayerNorm (keys ``out.0``, ``out.1``), then the position table."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.pos_enc = RelPositionalEncoding(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, idim) -> (B, T, odim) scaled, pos_emb (1, 2T-1, odim)."""
        scaled_and_pos: tuple[torch.Tensor, torch.Tensor] = self.pos_enc(self.out(x))
        return scaled_and_pos


class RelPositionMultiHeadedAttention(nn.Module):
    """Self-attention with Transformer-XL style relative positions (ESPnet "rel_selfattn").

    scores = ((q + u) k^T + shift((q + v) p^T)) / sqrt(d_k), where p = linear_pos(pos_emb) and the
    shift turns the (T, 2T-1) offset scores into (T, T) query/key scores.
    """

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor, first_query: int = 0) -> torch.Tensor:
        """(B, H, Q, 2T-1) scores per offset -> (B, H, Q, T): out[i, j] = x[i, (T-1) - (first_query + i) + j].

        ``first_query`` is the absolute index of row 0 when only a block of queries is given.
        """
        q_len, t = x.size(2), (x.size(3) + 1) // 2
        rows = torch.arange(first_query, first_query + q_len, device=x.device)
        index = (t - 1) - rows[:, None] + torch.arange(t, device=x.device)[None, :]
        return torch.gather(x, -1, index.expand(x.size(0), x.size(1), q_len, t))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); mask: (B, 1, T) bool (True = valid) or None; pos_emb: (1, 2T-1, D) -> (B, T, D).

        Long inputs are processed in blocks of queries so the (T, 2T-1) score tensors never exist whole.
        """
        q, k, v = self._project(x)
        return self._attend(q, k, v, mask=mask, pos_emb=pos_emb, first_query=0)

    def forward_chunk(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        key_cache: torch.Tensor | None,
        value_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streaming: x (B, Q, D) are the newest frames; the cached keys/values (B, H, T, d_k) precede them.

        pos_emb: (1, 2(T+Q)-1, D). Attends to cache + chunk without a mask (as the reference's chunk
        path does) and returns (out (B, Q, D), keys, values) with the chunk appended to the cache.
        """
        q, k, v = self._project(x)
        if key_cache is not None and value_cache is not None:
            k = torch.cat([key_cache, k], dim=2)
            v = torch.cat([value_cache, v], dim=2)
        return self._attend(q, k, v, mask=None, pos_emb=pos_emb, first_query=k.size(2) - q.size(1)), k, v

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> q (B, T, H, d_k), k and v (B, H, T, d_k)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: torch.Tensor | None,
        pos_emb: torch.Tensor,
        first_query: int,
    ) -> torch.Tensor:
        """q: (B, Q, H, d_k) for key positions ``first_query`` .. ``first_query + Q - 1``; k, v: (B, H, K, d_k)."""
        b, t = q.size(0), q.size(1)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, Q, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        invalid = None if mask is None else ~mask.unsqueeze(1)  # (B, 1, 1, K)
        block = t if t <= ATTN_BLOCK_ABOVE else ATTN_QUERY_BLOCK
        outs = []
        for start in range(0, t, block):
            stop = min(start + block, t)
            matrix_ac = torch.matmul(q_u[:, :, start:stop], k.transpose(-2, -1))
            matrix_bd = self.rel_shift(torch.matmul(q_v[:, :, start:stop], p.transpose(-2, -1)), first_query + start)
            scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)  # (B, H, Q, K)
            if invalid is not None:
                attn = torch.softmax(scores.masked_fill(invalid, -float("inf")), dim=-1).masked_fill(invalid, 0.0)
            else:
                attn = torch.softmax(scores, dim=-1)
            outs.append(torch.matmul(attn, v))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        projected: torch.Tensor = self.linear_out(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))
        return projected


class PositionwiseFeedForward(nn.Module):
    """w_2(swish(w_1(x)))."""

    def __init__(self, idim: int, hidden_units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        out: torch.Tensor = self.w_2(F.silu(self.w_1(x)))
        return out


class ConformerEncoderLayer(nn.Module):
    """Pre-norm block: x += MHA(LN(x)); x += FFN(LN(x)). No macaron FFN, no conv module."""

    def __init__(self, size: int, attention_heads: int, linear_units: int, key_bias: bool) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(attention_heads, size, key_bias)
        self.feed_forward = PositionwiseFeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=CONFORMER_NORM_EPS)
        self.norm_mha = nn.LayerNorm(size, eps=CONFORMER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        out: torch.Tensor = x + self.feed_forward(self.norm_ff(x))
        return out

    def forward_chunk(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_cache: torch.Tensor | None, value_cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, Q, D) newest frames after the cached ones -> (B, Q, D), keys, values (cache + chunk)."""
        att, keys, values = self.self_attn.forward_chunk(self.norm_mha(x), pos_emb, key_cache, value_cache)
        x = x + att
        return x + self.feed_forward(self.norm_ff(x)), keys, values


class PreLookaheadLayer(nn.Module):
    """Residual look-ahead: right-pad ``pre_lookahead_len`` zeros, conv k=len+1, leaky ReLU, causal conv k=3."""

    def __init__(self, channels: int, pre_lookahead_len: int) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        h = F.pad(x.transpose(1, 2), (0, self.pre_lookahead_len))
        h = F.pad(F.leaky_relu(self.conv1(h)), (self.conv2.kernel_size[0] - 1, 0))
        out: torch.Tensor = self.conv2(h)
        return out.transpose(1, 2) + x

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming: x (B, T, C) ends with ``pre_lookahead_len`` look-ahead frames, which only feed conv1.

        cache: (B, C, k2-1) conv1 outputs of the previous chunk (zeros at the start) -> output
        (B, T - pre_lookahead_len, C) and the new cache.
        """
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        if cache is None:
            cache = h.new_zeros(h.size(0), h.size(1), self.conv2.kernel_size[0] - 1)
        new_cache = h[:, :, h.size(2) - (self.conv2.kernel_size[0] - 1) :]
        out = self.conv2(torch.cat([cache, h], dim=2)).transpose(1, 2)
        return out + x[:, : x.size(1) - self.pre_lookahead_len], new_cache


class Upsample1D(nn.Module):
    """Nearest x``scale_factor``, left-pad 2*stride zeros, conv k=2*stride+1."""

    def __init__(self, channels: int, out_channels: int, stride: int, scale_factor: float) -> None:
        super().__init__()
        self.stride = stride
        self.scale_factor = float(scale_factor)
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, T) -> (B, C', T*scale), lengths * stride."""
        h = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return self.conv(F.pad(h, (self.stride * 2, 0))), lengths * self.stride

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming: x (B, C, T), cache (B, C, 2*stride) upsampled tail (zeros at the start) -> (B, C', T*scale)."""
        h = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        if cache is None:
            cache = h.new_zeros(h.size(0), h.size(1), self.stride * 2)
        h = torch.cat([cache, h], dim=2)
        return self.conv(h), h[:, :, h.size(2) - self.stride * 2 :]


class UpsampleConformerEncoderV2(nn.Module):
    """Token frames (25 Hz) -> conformer -> x2 upsample -> conformer -> (B, 2T, output_size) at 50 Hz.

    Takes the yaml block's arguments by name; dropout rates are accepted and unused (inference only).
    """

    def __init__(
        self,
        *,
        input_size: int,
        output_size: int = 256,
        input_layer: str = SUPPORTED_INPUT_LAYER,
        pre_lookahead_len: int = 3,
        num_blocks: int = 6,
        num_up_blocks: int = 4,
        up_stride: int = 2,
        up_scale_factor: float = 2,
        attention_heads: int = 4,
        pos_enc_layer_type: str = SUPPORTED_POS_ENC,
        selfattention_layer_type: str = SUPPORTED_SELF_ATTN,
        key_bias: bool = True,
        linear_units: int = 2048,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        normalize_before: bool = True,
        activation_type: str = SUPPORTED_ACTIVATION,
    ) -> None:
        super().__init__()
        for name, value, supported in (
            ("input_layer", input_layer, SUPPORTED_INPUT_LAYER),
            ("pos_enc_layer_type", pos_enc_layer_type, SUPPORTED_POS_ENC),
            ("selfattention_layer_type", selfattention_layer_type, SUPPORTED_SELF_ATTN),
            ("activation_type", activation_type, SUPPORTED_ACTIVATION),
            ("normalize_before", normalize_before, True),
        ):
            if value != supported:
                raise ValueError(
                    f"UpsampleConformerEncoderV2: {name}={value!r} is not supported "
                    f"(only {supported!r}, as in the released CosyVoice-300M-25Hz)"
                )
        if output_size % attention_heads:
            raise ValueError(f"output_size {output_size} is not divisible by attention_heads {attention_heads}")
        self._output_size = output_size
        self.embed = LinearInput(input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(output_size, attention_heads, linear_units, key_bias) for _ in range(num_blocks)
        )
        self.up_layer = Upsample1D(output_size, output_size, up_stride, up_scale_factor)
        self.up_embed = LinearInput(input_size, output_size)
        self.up_encoders = nn.ModuleList(
            ConformerEncoderLayer(output_size, attention_heads, linear_units, key_bias) for _ in range(num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs: (B, T, input_size), xs_lens: (B,) -> (B, T*up, output_size), mask (B, 1, T*up) bool."""
        mask = padding_mask(xs_lens, xs.size(1))
        attn_mask = None if bool(mask.all()) else mask
        xs, pos_emb = self.embed(xs)
        xs = self.pre_lookahead_layer(xs)
        for layer in self.encoders:
            xs = layer(xs, attn_mask, pos_emb)
        up, xs_lens = self.up_layer(xs.transpose(1, 2), xs_lens)
        xs = up.transpose(1, 2)
        mask = padding_mask(xs_lens, xs.size(1))
        attn_mask = None if bool(mask.all()) else mask
        xs, pos_emb = self.up_embed(xs)
        for layer in self.up_encoders:
            xs = layer(xs, attn_mask, pos_emb)
        return self.after_norm(xs), mask

    def forward_chunk(self, xs: torch.Tensor, cache: ConformerCache, *, last_chunk: bool) -> torch.Tensor:
        """Streaming: encode the next token frames after those in ``cache`` (updated in place).

        xs: (B, T, input_size) embedded token frames. Unless ``last_chunk``, the final
        ``pre_lookahead_len`` frames are look-ahead only (they are fed again with the next chunk)
        and the output covers the others; the last chunk is padded with zero frames instead, as
        ``forward`` pads the end. Attention sees the cached frames and the chunk without a mask;
        the relative-position table spans cache + chunk (any length: the table is computed, not
        stored). Returns (B, up * T_out, output_size).
        """
        n_first = len(self.encoders)
        offset = cache.frames
        xs = self.embed(xs)[0]
        if last_chunk:
            xs = F.pad(xs, (0, 0, 0, self.pre_lookahead_layer.pre_lookahead_len))
        xs, cache.lookahead = self.pre_lookahead_layer.forward_chunk(xs, cache.lookahead)
        pos_emb = rel_pos_table(self.embed.pos_enc.d_model, offset + xs.size(1)).to(device=xs.device, dtype=xs.dtype)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, layer in enumerate(cast("list[ConformerEncoderLayer]", self.encoders)):
            past_k, past_v = (cache.keys[i], cache.values[i]) if cache.keys else (None, None)
            xs, k, v = layer.forward_chunk(xs, pos_emb, past_k, past_v)
            keys.append(k)
            values.append(v)
        up, cache.upsample = self.up_layer.forward_chunk(xs.transpose(1, 2), cache.upsample)
        xs = self.up_embed(up.transpose(1, 2))[0]
        up_offset = offset * self.up_layer.stride
        pos_emb = rel_pos_table(self.up_embed.pos_enc.d_model, up_offset + xs.size(1)).to(
            device=xs.device, dtype=xs.dtype
        )
        for i, layer in enumerate(cast("list[ConformerEncoderLayer]", self.up_encoders), start=n_first):
            past_k, past_v = (cache.keys[i], cache.values[i]) if cache.keys else (None, None)
            xs, k, v = layer.forward_chunk(xs, pos_emb, past_k, past_v)
            keys.append(k)
            values.append(v)
        cache.keys, cache.values = keys, values
        out: torch.Tensor = self.after_norm(xs)
        return out
