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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audio_codes import CODES_PER_GROUP, N_MIXED_CODES, VQ02_CODES
from vocoder.dit import DiT
from vocoder.encoder import DualCodebookEmbedding, UpsampleConformerEncoderV2

N_TIMESTEPS = 10
DEFAULT_CFG_RATE = 0.7
GROUP = CODES_PER_GROUP
MIXED_VOCAB = N_MIXED_CODES
VQ02_PAD = VQ02_CODES  # one past the vq02 codes pads the vq02 column
VQ06_SHIFT = 1  # flow id of a vq06 slot = mixed code + 1 (i.e. 1025 + raw vq06)
GROUP_PAD_TAIL = (0, 0, 0, VQ02_PAD, VQ02_PAD, VQ02_PAD)  # upstream pads a partial group with its tail


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
    ) -> torch.Tensor:
        """mu, cond, noise: (B, 80, T); mask: (B, 1, T); spks: (B, 80) -> mel (B, 80, T).

        ``noise`` is the ODE start z (temperature 1), used unchanged.
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
            v = self.estimator(torch.cat([x, x]), mask_in, mu_in, t.repeat(2 * b), spks=spks_in, cond=cond_in)
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
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
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
