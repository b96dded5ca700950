"""Flow matching from dual-codebook tokens to an 80-bin mel (CosyVoice-300M-25Hz "vq0206" variant).

``CausalMaskedDiffWithXvec`` embeds (prompt ++ target) tokens, runs the upsampling conformer to a
50 Hz ``mu``, and ``CausalConditionalCFM`` integrates the DiT velocity field from noise with 10
Euler steps on a cosine time grid and classifier-free guidance. Parameter names reproduce the
official ``flow.pt`` keys; nothing else is registered (in particular none of the reference's
multi-GB streaming buffers and no fixed noise buffer: the start noise is an argument).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audio_codes import CODES_PER_GROUP, N_MIXED_CODES, VQ02_CODES
from vocoder.dit import DiT, DiTCache
from vocoder.encoder import ConformerCache, DualCodebookEmbedding, UpsampleConformerEncoderV2

N_TIMESTEPS = 10
DEFAULT_CFG_RATE = 0.7
GROUP = CODES_PER_GROUP
MIXED_VOCAB = N_MIXED_CODES
VQ02_PAD = VQ02_CODES  # one past the vq02 codes pads the vq02 column
VQ06_SHIFT = 1  # flow id of a vq06 slot = mixed code + 1 (i.e. 1025 + raw vq06)
GROUP_PAD_TAIL = (0, 0, 0, VQ02_PAD, VQ02_PAD, VQ02_PAD)  # upstream pads a partial group with its tail


@dataclass
class FlowStreamCache:
    """Everything a streaming flow carries between chunks: the encoder's and one DiT cache per Euler step."""

    conformer: ConformerCache = field(default_factory=ConformerCache)
    estimator: list[DiTCache] = field(default_factory=list)

    @property
    def estimator_frames(self) -> int:
        """Mel frames in the DiT attention caches: the reference's noise offset for the next chunk."""
        return self.estimator[0].frames if self.estimator else 0

    def keep_estimator(self, newest: int, oldest: int) -> None:
        """Truncate every DiT attention cache to its first ``newest`` + last ``oldest`` frames."""
        for cache in self.estimator:
            cache.keep(newest, oldest)


def reshape_mixed_codes(codes: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mixed codes [a, b, c, d, e, ...] -> (3G, 2) int64 flow ids, rows (a, c+1), (b, d+1), (1024, e+1).

    A length that is not a multiple of 5 is completed with the last ``5 - len % 5`` entries of
    ``[0, 0, 0, 1024, 1024, 1024]``, as the reference's ``_reshape`` does (without mutating the input).
    Range checks are the caller's (see ``validate_codes``).
    """
    seq = [int(c) for c in (codes.tolist() if hasattr(codes, "tolist") else codes)]
    if len(seq) % GROUP:
        seq += list(GROUP_PAD_TAIL[-(GROUP - len(seq) % GROUP) :])
    groups = torch.tensor(seq, dtype=torch.long).view(-1, GROUP)
    vq02 = torch.cat([groups[:, :2], torch.full((groups.size(0), 1), VQ02_PAD, dtype=torch.long)], dim=1)
    vq06 = groups[:, 2:] + VQ06_SHIFT
    return torch.stack([vq02.reshape(-1), vq06.reshape(-1)], dim=1)


def cosine_time_grid(
    n_timesteps: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """t_k = 1 - cos(k/n * pi/2), k = 0..n: small steps near the noise end."""
    t = torch.linspace(0, 1, n_timesteps + 1, dtype=dtype, device=device)
    return 1 - torch.cos(t * 0.5 * math.pi)


class CausalConditionalCFM(nn.Module):
    """Euler ODE solver around the DiT estimator with classifier-free guidance.

    Each step evaluates the estimator once on a batch of two, (x | mu, spk, cond) and (x | 0, 0, 0),
    and combines v = (1 + r) v_cond - r v_uncond with r = ``inference_cfg_rate``.
    """

    def __init__(self, estimator: DiT, inference_cfg_rate: float = DEFAULT_CFG_RATE) -> None:
        super().__init__()
        self.estimator = estimator
        self.inference_cfg_rate = float(inference_cfg_rate)
        self.out_channels = estimator.out_channels

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        *,
        spks: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        n_timesteps: int = N_TIMESTEPS,
        caches: Sequence[DiTCache] | None = None,
    ) -> torch.Tensor:
        """mu, cond, noise: (B, 80, T); mask: (B, 1, T); spks: (B, 80) -> mel (B, 80, T).

        ``noise`` is the ODE start z (temperature 1), used unchanged. Streaming passes one
        :class:`DiTCache` per Euler step (each step attends to its own past keys/values).
        """
        t_span = cosine_time_grid(n_timesteps, mu.dtype, mu.device)
        x = noise.to(mu.dtype)
        b = x.size(0)
        mask_in = torch.cat([mask, mask], dim=0)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        rate = self.inference_cfg_rate
        # The reference advances t by dt and re-derives dt from the grid; keep that arithmetic.
        t = t_span[:1]
        dt = t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v = self.estimator(
                torch.cat([x, x]),
                mask_in,
                mu_in,
                t.repeat(2 * b),
                spks=spks_in,
                cond=cond_in,
                cache=None if caches is None else caches[step - 1],
            )
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


class CausalMaskedDiffWithXvec(nn.Module):
    """Tokens + prompt mel + speaker embedding -> target mel; arguments named as the yaml's ``flow`` block."""

    def __init__(
        self,
        *,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 5121,
        encoder: UpsampleConformerEncoderV2 | None = None,
        decoder: CausalConditionalCFM | None = None,
        input_embedding: DualCodebookEmbedding | None = None,
    ) -> None:
        super().__init__()
        if encoder is None or decoder is None:
            raise ValueError("CausalMaskedDiffWithXvec needs an encoder and a decoder")
        if output_type != "mel":
            raise ValueError(f"output_type {output_type!r} is not supported (only 'mel')")
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.input_embedding = input_embedding or DualCodebookEmbedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.up_rate = encoder.up_layer.stride
        self.pre_lookahead_len = encoder.pre_lookahead_layer.pre_lookahead_len

    def speaker_condition(self, embedding: torch.Tensor) -> torch.Tensor:
        """(1, spk_embed_dim) CAM++ embedding -> (1, 80) ODE speaker condition (L2-normalised, projected)."""
        condition: torch.Tensor = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        return condition

    @torch.inference_mode()
    def inference(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        *,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        noise: torch.Tensor,
        n_timesteps: int = N_TIMESTEPS,
    ) -> torch.Tensor:
        """Non-streaming flow for one utterance.

        token: (1, T_tok, 2), prompt_token: (1, T_ptok, 2) int64 flow ids; prompt_feat: (1, T_pmel, 80)
        with T_pmel = up_rate * T_ptok; embedding: (1, spk_embed_dim); noise: (1, 80, up_rate *
        (T_ptok + T_tok)) -> mel (1, 80, up_rate * T_tok) for the target frames only.
        """
        spks = self.speaker_condition(embedding)
        tokens = torch.cat([prompt_token, token], dim=1)
        lengths = torch.tensor([tokens.size(1)], device=tokens.device)
        h, mask = self.encoder(self.input_embedding(tokens.clamp(min=0)), lengths)
        mu = self.encoder_proj(h)  # (1, T_mel, 80)
        n_prompt = prompt_feat.size(1)
        cond = torch.zeros_like(mu)
        cond[:, :n_prompt] = prompt_feat
        mel: torch.Tensor = self.decoder(
            mu.transpose(1, 2).contiguous(),
            mask.to(mu.dtype),
            spks=spks,
            cond=cond.transpose(1, 2).contiguous(),
            noise=noise,
            n_timesteps=n_timesteps,
        )
        return mel[:, :, n_prompt:]

    @torch.inference_mode()
    def forward_chunk(
        self,
        token: torch.Tensor,
        spks: torch.Tensor,
        cache: FlowStreamCache,
        *,
        noise: torch.Tensor,
        cond: torch.Tensor | None = None,
        last_chunk: bool = False,
        n_timesteps: int = N_TIMESTEPS,
    ) -> torch.Tensor:
        """Streaming flow: the mel of the token frames that follow those already in ``cache``.

        token: (1, T_tok, 2) flow ids, ending with ``pre_lookahead_len`` look-ahead frames unless
        ``last_chunk``; spks: (1, 80) from :meth:`speaker_condition`; noise: (1, 80, T_mel) the ODE
        start for exactly this chunk's mel frames; cond: (1, T_mel, 80) or None (zeros). The
        reference's setup is this call on prompt + first look-ahead tokens with an empty cache and
        the prompt mel as ``cond``. ``cache`` is updated in place. Returns (1, 80, T_mel).
        """
        h = self.encoder.forward_chunk(self.input_embedding(token), cache.conformer, last_chunk=last_chunk)
        mu = self.encoder_proj(h)  # (1, T_mel, 80)
        if noise.size(2) != mu.size(1):
            raise ValueError(f"chunk noise covers {noise.size(2)} frames, the chunk has {mu.size(1)}")
        if not cache.estimator:
            cache.estimator = [DiTCache.empty(self.decoder.estimator.depth) for _ in range(n_timesteps)]
        cond = torch.zeros_like(mu) if cond is None else cond
        mel: torch.Tensor = self.decoder(
            mu.transpose(1, 2).contiguous(),
            torch.ones(1, 1, mu.size(1), dtype=mu.dtype, device=mu.device),
            spks=spks,
            cond=cond.transpose(1, 2).contiguous(),
            noise=noise,
            n_timesteps=n_timesteps,
            caches=cache.estimator,
        )
        return mel
