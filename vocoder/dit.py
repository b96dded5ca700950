"""The flow-matching estimator: a DiT with adaLN-Zero blocks (attention, causal conv, MLP branches).

Parameter names reproduce the official ``flow.pt`` keys under ``decoder.estimator.``
(docs/model.md §4.4). The velocity field is evaluated on (x, mu, speaker, prompt condition)
stacked on channels; the time enters through a sinusoidal embedding that modulates every block.

For streaming, the modules take an explicit :class:`DiTCache` (left context of the causal
convolutions, past keys/values of the attention) instead of hidden module state; ``cache=None``
is the whole-utterance computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

TIME_EMBED_DIM = 256  # sinusoid width of the timestep embedding
TIME_SCALE = 1000.0  # t in [0, 1] is scaled to [0, 1000] before the sinusoid
TIME_MAX_PERIOD = 10000.0
ADALN_EPS = 1e-6  # the affine-free LayerNorms that adaLN modulates
CONV_KERNEL = 3


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, 1, C) modulation broadcast over time (one fused pass)."""
    return torch.addcmul(shift, x, 1 + scale)


@dataclass
class BlockCache:
    """Streaming state of one DiT block: conv left contexts (B, k-1, C) and past keys/values (B, H, T, d).

    Keys and values are stored newest chunk first, as the reference stores them: attention has
    no mask and no positions, so the order changes nothing but the summation order, and keeping
    it makes the reference's "first 96 + last prompt frames" truncation mean the same here.
    """

    conv1: torch.Tensor | None = None
    conv2: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None


@dataclass
class DiTCache:
    """One :class:`BlockCache` per block; updated in place by ``DiT.forward(..., cache=...)``."""

    blocks: list[BlockCache] = field(default_factory=list)

    @classmethod
    def empty(cls, depth: int) -> DiTCache:
        return cls([BlockCache() for _ in range(depth)])

    @property
    def frames(self) -> int:
        """Frames held in the attention cache (0 before the first chunk)."""
        key = self.blocks[0].key if self.blocks else None
        return 0 if key is None else int(key.size(2))

    def keep(self, newest: int, oldest: int) -> None:
        """Keep the first ``newest`` and the last ``oldest`` cached frames of every block (in place)."""
        for block in self.blocks:
            if block.key is not None and block.value is not None:
                n = block.key.size(2)
                block.key = torch.cat([block.key[:, :, :newest], block.key[:, :, n - oldest :]], dim=2)
                block.value = torch.cat([block.value[:, :, :newest], block.value[:, :, n - oldest :]], dim=2)


class Transpose(nn.Module):
    """Swaps time and channels inside ``CausalConvBlock.block`` (keeps the checkpoint's indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalConv1d(nn.Conv1d):
    """Conv1d with (kernel-1) frames of left context: zeros, or the cached tail of the previous chunk."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1

    def forward_time_major(
        self, x: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> (B, T, C') and the new left context (B, kernel-1, C).

        The same convolution as ``forward``, computed as one matmul over the unfolded time window
        so the DiT's (B, T, C) activations need no transposes. ``cache`` replaces the zero padding.
        """
        if cache is None:
            cache = x.new_zeros(x.size(0), self.context, x.size(2))
        padded = torch.cat([cache, x], dim=1)  # (B, T + k - 1, C)
        windows = padded.unfold(1, self.kernel_size[0], 1).reshape(x.size(0), x.size(1), -1)  # (B, T, C*k)
        y = F.linear(windows, self.weight.reshape(self.out_channels, -1), self.bias)
        return y, padded[:, padded.size(1) - self.context :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T) -> (B, C', T)."""
        return super().forward(F.pad(x, (self.context, 0)))


class CausalConvBlock(nn.Module):
    """CausalConv1d -> LayerNorm -> Mish -> CausalConv1d on (B, T, C); keys ``block.1``, ``block.3``, ``block.6``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = CONV_KERNEL) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Transpose(),
            CausalConv1d(in_channels, out_channels, kernel_size),
            Transpose(),
            nn.LayerNorm(out_channels),
            nn.Mish(),
            Transpose(),
            CausalConv1d(out_channels, out_channels, kernel_size),
            Transpose(),
        )

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); with ``cache`` the conv left contexts (B, k-1, C) are read and replaced.

        Equivalent to running ``self.block`` (transposes around channel-first convs), but stays in
        (B, T, C) layout throughout.
        """
        first, last = cast(CausalConv1d, self.block[1]), cast(CausalConv1d, self.block[6])
        h, conv1 = first.forward_time_major(x, None if cache is None else cache.conv1)
        h = self.block[4](self.block[3](h))
        h, conv2 = last.forward_time_major(h, None if cache is None else cache.conv2)
        if cache is not None:
            cache.conv1, cache.conv2 = conv1, conv2
        return h


class Attention(nn.Module):
    """Multi-head self-attention with per-head LayerNorm on q and k; key-padding mask only."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: BlockCache | None = None) -> torch.Tensor:
        """x: (B, T, C); mask: (B, 1, 1, T_keys) bool (True = attend) or None -> (B, T, C).

        With ``cache``, the new keys/values are put before the cached ones (newest first, see
        :class:`BlockCache`) and attended together.
        """
        b, t, _ = x.shape
        # per-head norms act on the last axis, so apply them before moving heads forward
        q = self.q_norm(self.to_q(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.to_k(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.to_v(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            if cache.key is not None and cache.value is not None:
                k = torch.cat([k, cache.key], dim=2)
                v = torch.cat([v, cache.value], dim=2)
            cache.key, cache.value = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, d)
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return projected


class MLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return out


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g_msa*Attn(mod(LN1 x)); x += g_conv*Conv(mod(LN3 x)); x += g_mlp*MLP(mod(LN2 x))."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_EPS)
        self.attn = Attention(hidden_size, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_EPS)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_EPS)
        self.conv = CausalConvBlock(hidden_size, hidden_size, CONV_KERNEL)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, cache: BlockCache | None = None
    ) -> torch.Tensor:
        """x: (B, T, C); c: (B, 1, C) time embedding; mask: (B, 1, 1, T) or None -> (B, T, C)."""
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_conv, scale_conv, gate_conv) = (
            self.adaLN_modulation(c).chunk(9, dim=-1)
        )
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask, cache))
        x = torch.addcmul(x, gate_conv, self.conv(modulate(self.norm3(x), shift_conv, scale_conv), cache))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoid of 1000*t over 256 dims in [cos, sin] order -> MLP -> (B, C)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = TIME_EMBED_DIM) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half).to(t)
        args = (t * TIME_SCALE)[:, None] * freqs[None]
        out: torch.Tensor = self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        return out


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on an affine-free LayerNorm, then Linear to the mel channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_EPS)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        out: torch.Tensor = self.linear(modulate(self.norm_final(x), shift, scale))
        return out


class DiT(nn.Module):
    """Velocity estimator v(x, t | mu, spk, cond); arguments named as the yaml's ``estimator`` block."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        mlp_ratio: float = 4.0,
        depth: int = 28,
        num_heads: int = 8,
        head_dim: int = 64,
        hidden_size: int = 256,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.in_proj = nn.Linear(in_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, head_dim, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_channels)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        *,
        spks: torch.Tensor,
        cond: torch.Tensor,
        cache: DiTCache | None = None,
    ) -> torch.Tensor:
        """Velocity for a batch of states.

        x, mu, cond: (B, 80, T); mask: (B, 1, T) (nonzero = valid frame); t: (B,); spks: (B, 80)
        -> (B, out_channels, T). The channel stack [x, mu, spks, cond] must be ``in_channels`` wide.
        """
        c = self.t_embedder(t).unsqueeze(1)  # (B, 1, C)
        spk = spks.unsqueeze(-1).expand(-1, -1, x.size(-1))
        h = self.in_proj(torch.cat([x, mu, spk, cond], dim=1).transpose(1, 2))  # (B, T, C)
        valid = mask.bool()
        attn_mask = None if bool(valid.all()) else valid.unsqueeze(1)  # (B, 1, 1, T)
        for i, block in enumerate(self.blocks):
            h = block(h, c, attn_mask, None if cache is None else cache.blocks[i])
        out: torch.Tensor = self.final_layer(h, c)
        return out.transpose(1, 2)
