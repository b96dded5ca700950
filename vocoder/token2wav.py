"""Non-streaming token2wav: mixed LLM audio codes + prompt features -> 24 kHz waveform.

Follows the reference's ``token2wav_nonstream`` (docs/model.md §4.6):

1. the target and prompt codes are reshaped into dual-codebook frames (``reshape_mixed_codes``);
2. the prompt mel, computed on the untrimmed prompt, is resized with nearest-neighbour
   interpolation to 2 frames per prompt token frame (this also time-warps it when the tokenizer
   trimmed silence);
3. the flow turns (prompt ++ target) tokens into a mel with the prompt mel as condition;
4. HiFT turns the target mel into 480 samples per mel frame.

Upstream ``tts.py`` hands the prompt mel and speaker embedding over in bf16; that rounding changes
the output audibly (docs/model.md §4.6), so it is reproduced here by default.

Randomness is explicit: the ODE start noise and the HiFT source draws come from one CPU
``torch.Generator`` seeded per call (so a seed gives the same audio on any device), or are injected
(``noise``, ``hift_draws``) to replay the reference. Nothing is pre-allocated: the reference's
30000-frame noise buffer and ~2.2 GB of streaming caches do not exist here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from audio_codes import FRAMES_PER_GROUP
from errors import InvalidInputError, TooLargeError
from vocoder.config import VocoderParts, load_cosyvoice
from vocoder.flow import (
    GROUP,
    MIXED_VOCAB,
    N_TIMESTEPS,
    CausalMaskedDiffWithXvec,
    reshape_mixed_codes,
)
from vocoder.hift import HiftDraws, HiFTGenerator, draw_hift_noise

logger = logging.getLogger(__name__)

MEL_RATE = 50  # mel frames per second
MAX_MEL_FRAMES = 600 * MEL_RATE  # 600 s: the reference's limit (the length of its noise buffer)
SPK_EMBED_DIM = 192

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Token2WavTimings:
    """Seconds spent in each stage of the last call (for logs and benchmarks)."""

    flow_s: float
    hift_s: float
    mel_frames: int


def validate_codes(value: ArrayLike | list[int], name: str, *, allow_empty: bool = False) -> torch.Tensor:
    """Mixed audio codes as a 1-D int64 CPU tensor; a clear 4xx error for anything else."""
    try:
        codes = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidInputError(f"{name} must be a sequence of integer audio codes ({exc})", param=name) from exc
    codes = codes.reshape(-1) if codes.dim() == 2 and codes.size(0) == 1 else codes
    if codes.dim() != 1 or (codes.numel() == 0 and not allow_empty):
        raise InvalidInputError(f"{name} must be a non-empty 1-D sequence of audio codes", param=name)
    if codes.numel() == 0:
        return codes.to(torch.long).cpu()
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InvalidInputError(f"{name} must hold integers", param=name)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= MIXED_VOCAB:
        raise InvalidInputError(f"{name} must lie in 0..{MIXED_VOCAB - 1} (got {low}..{high})", param=name)
    return codes.to(torch.long).cpu()


def float_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    """A finite float32 CPU tensor; a clear 4xx error for anything else."""
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidInputError(f"{name} must be a numeric array ({exc})", param=name) from exc
    if not tensor.is_floating_point():
        raise InvalidInputError(f"{name} must be floating point", param=name)
    tensor = tensor.detach().cpu().float()
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(f"{name} contains NaN or infinite values", param=name)
    return tensor


def bf16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 (nearest even) and back to float32, as upstream's hand-over does."""
    return x.to(torch.bfloat16).to(torch.float32)


class Token2Wav:
    """The vocoder stage: holds the loaded flow and HiFT and runs them per utterance (thread-compatible:
    no per-call state is stored on the modules)."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithXvec,
        hift: HiFTGenerator,
        *,
        n_timesteps: int = N_TIMESTEPS,
        bf16_prompt_roundtrip: bool = True,
    ) -> None:
        self.flow = flow
        self.hift = hift
        self.n_timesteps = n_timesteps
        self.bf16_prompt_roundtrip = bf16_prompt_roundtrip
        self.last_timings: Token2WavTimings | None = None  # of the latest call (benchmarks, logs)

    @classmethod
    def from_parts(
        cls, parts: VocoderParts, *, n_timesteps: int = N_TIMESTEPS, bf16_prompt_roundtrip: bool = True
    ) -> Token2Wav:
        return cls(parts.flow, parts.hift, n_timesteps=n_timesteps, bf16_prompt_roundtrip=bf16_prompt_roundtrip)

    @classmethod
    def from_dir(
        cls,
        vocoder_dir: Path,
        device: str | torch.device = "cpu",
        *,
        n_timesteps: int = N_TIMESTEPS,
        bf16_prompt_roundtrip: bool = True,
    ) -> Token2Wav:
        """Load ``CosyVoice-300M-25Hz/`` (yaml + flow.pt + hift.pt) onto ``device``."""
        return cls.from_parts(
            load_cosyvoice(vocoder_dir, device), n_timesteps=n_timesteps, bf16_prompt_roundtrip=bf16_prompt_roundtrip
        )

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @property
    def sample_rate(self) -> int:
        return int(self.hift.sampling_rate)

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (480 at 24 kHz)."""
        return int(self.hift.upsample_scale)

    @property
    def mel_frames_per_token_frame(self) -> int:
        return int(self.flow.up_rate)

    def mel_frames(self, n_codes: int) -> int:
        """Mel frames the flow makes for ``n_codes`` mixed codes (a partial group counts as whole)."""
        return -(-n_codes // GROUP) * FRAMES_PER_GROUP * self.mel_frames_per_token_frame

    def prepare_prompt(
        self, prompt_codes: ArrayLike | list[int], prompt_mel: ArrayLike, spk_emb: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate the prompt and hand it over as upstream does (both vocoder paths share this).

        Returns the prompt's flow ids (1, T_ptok, 2), its mel (1, up * T_ptok, 80) after the bf16
        round trip and the nearest resize, and the embedding (1, spk_dim) after the round trip; all
        float32 on the CPU.
        """
        prompt = reshape_mixed_codes(validate_codes(prompt_codes, "prompt_codes")).unsqueeze(0)
        mel = float_tensor(prompt_mel, "prompt_mel")
        mel = mel.unsqueeze(0) if mel.dim() == 2 else mel
        n_mels = self.flow.output_size
        if mel.dim() != 3 or mel.size(0) != 1 or mel.size(2) != n_mels or mel.size(1) == 0:
            raise InvalidInputError(
                f"prompt_mel must have shape (1, T, {n_mels}), got {tuple(mel.shape)}", param="prompt_mel"
            )
        emb = float_tensor(spk_emb, "spk_emb").reshape(1, -1)
        spk_dim = self.flow.spk_embed_affine_layer.in_features
        if emb.size(1) != spk_dim:
            raise InvalidInputError(f"spk_emb must hold {spk_dim} values, got {emb.size(1)}", param="spk_emb")
        if self.bf16_prompt_roundtrip:
            mel, emb = bf16_round_trip(mel), bf16_round_trip(emb)
        n_prompt = self.mel_frames_per_token_frame * prompt.size(1)
        mel = F.interpolate(mel.transpose(1, 2), size=n_prompt, mode="nearest").transpose(1, 2)
        return prompt, mel, emb

    @torch.inference_mode()
    def token2wav(
        self,
        codes: ArrayLike | list[int],
        prompt_codes: ArrayLike | list[int],
        prompt_mel: ArrayLike,
        spk_emb: ArrayLike,
        *,
        seed: int | None = None,
        noise: ArrayLike | None = None,
        hift_draws: HiftDraws | None = None,
    ) -> torch.Tensor:
        """Synthesize the target codes in the prompt's voice.

        codes: (N,) mixed audio codes 0..5119 (LLM ids - 65536; 2 vq02 + 3 vq06 per group);
        prompt_codes: (M,) the prompt's mixed codes; prompt_mel: (1, T, 80) or (T, 80) log-mel at
        50 Hz of the untrimmed prompt; spk_emb: (1, 192) or (192,) CAM++ embedding.
        seed: seeds the noise (a fresh random seed when None); noise: (1, 80, T_prompt + T_target)
        ODE start noise to use unchanged (T_prompt = 2 * prompt frames); hift_draws: HiFT source draws.
        Returns (1, n_target_mel_frames * 480) float32 on the CPU, at :attr:`sample_rate`.
        """
        target = reshape_mixed_codes(validate_codes(codes, "codes")).unsqueeze(0)
        prompt, mel, emb = self.prepare_prompt(prompt_codes, prompt_mel, spk_emb)
        n_mels = self.flow.output_size
        up = self.mel_frames_per_token_frame
        n_prompt, n_target = mel.size(1), up * target.size(1)
        if n_prompt + n_target > MAX_MEL_FRAMES:
            raise TooLargeError(f"prompt + target audio exceed {MAX_MEL_FRAMES // MEL_RATE} s of speech", param="codes")

        generator = torch.Generator(device="cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        if noise is None:
            z = torch.randn(1, n_mels, n_prompt + n_target, generator=generator)
        else:
            z = float_tensor(noise, "noise")
            if tuple(z.shape) != (1, n_mels, n_prompt + n_target):
                raise InvalidInputError(
                    f"noise must have shape (1, {n_mels}, {n_prompt + n_target}), got {tuple(z.shape)}", param="noise"
                )
        n_samples = n_target * self.samples_per_frame
        if hift_draws is None:
            hift_draws = draw_hift_noise(1, n_samples, self.hift.nb_harmonics + 1, generator)

        device = self.device
        start = time.perf_counter()
        target_mel = self.flow.inference(
            target.to(device),
            prompt.to(device),
            prompt_feat=mel.to(device),
            embedding=emb.to(device),
            noise=z.to(device),
            n_timesteps=self.n_timesteps,
        )
        flow_done = time.perf_counter()
        draws = HiftDraws(
            hift_draws.rand_ini.to(device),
            hift_draws.sine_noise.to(device),
            None if hift_draws.source_noise is None else hift_draws.source_noise.to(device),
        )
        speech = self.hift.inference(target_mel, draws=draws)
        end = time.perf_counter()
        self.last_timings = Token2WavTimings(flow_done - start, end - flow_done, n_target)
        logger.debug("token2wav: %d mel frames, flow %.3f s, HiFT %.3f s", n_target, flow_done - start, end - flow_done)
        return speech.float().cpu()
