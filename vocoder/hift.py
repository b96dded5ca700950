"""HiFT vocoder (neural source filter + iSTFT): 80-bin mel at 50 Hz to a 24 kHz waveform.

The generator is the CosyVoice2 ``HiFTGenerator`` as StepFun ships it in ``hift.pt``: a
``ConvRNNF0Predictor`` turns the mel into one f0 per frame, the harmonic NSF source
(``SourceModuleHnNSF2``/``SineGen2``) turns f0 into an excitation signal, and a HiFi-GAN
style decoder fuses mel and source and emits an STFT (n_fft 16, hop 4) that an iSTFT turns
into samples; ``prod(upsample_rates) * hop_len`` = 480 samples per mel frame.

Attribute names reproduce the official checkpoint keys. Weight-normed convolutions use torch's
parametrization (keys ``…parametrizations.weight.original0/1``, the form the upstream code
saves today); :func:`load_hift_state_dict` also accepts the older ``…weight_g``/``…weight_v``
form of the same weights.

The three stages are separate methods (:meth:`HiFTGenerator.predict_f0`,
:meth:`HiFTGenerator.source_from_f0`, :meth:`HiFTGenerator.decode`) so each can be checked
against the reference on the reference's own input. The source's random draws (initial
phases, additive noise) are explicit: either injected as :class:`HiftDraws` or drawn from a
caller's ``torch.Generator`` in the reference's order and memory layout, so a seed reproduces
the reference's draws bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from errors import InvalidInputError, ModelLoadError
from vocoder.weights import load_strict

logger = logging.getLogger(__name__)

SNAKE_EPS = 1e-9  # keeps 1/alpha finite in Snake
MAGNITUDE_CLIP = 1e2  # the decoder's exp(log-magnitude) is clipped here before the iSTFT
WN_G, WN_V = "parametrizations.weight.original0", "parametrizations.weight.original1"
WN_G_OLD, WN_V_OLD = "weight_g", "weight_v"


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 dilated convolution."""
    return (kernel_size * dilation - dilation) // 2


@dataclass(frozen=True)
class HiftDraws:
    """The NSF source's random draws, in the reference's order.

    rand_ini : (B, H+1) U[0, 1) initial phase (in cycles) per harmonic; column 0 (the
        fundamental) is ignored, as upstream zeroes it.
    sine_noise : (B, L, H+1) N(0, 1), scaled by the voiced/unvoiced noise amplitude and added
        to the harmonics.
    source_noise : (B, L, 1) N(0, 1), the NSF "noise branch"; the reference draws it but it
        does not reach the waveform. Optional when injecting.
    """

    rand_ini: torch.Tensor
    sine_noise: torch.Tensor
    source_noise: torch.Tensor | None = None


def draw_hift_noise(batch: int, n_samples: int, n_sines: int, generator: torch.Generator | None = None) -> HiftDraws:
    """Draw what :class:`SineGen2` needs, exactly as the reference does from its RNG.

    The reference takes ``randn_like`` of a transposed tensor (strides ``(S·L, 1, L)``), so
    the sine noise is filled in that memory order; ``torch.randn(B, L, S)`` would give
    different values for the same seed. Draws happen on the generator's device (CPU, the
    global CPU RNG, when ``generator`` is None).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    L, S = n_samples, n_sines
    rand_ini = torch.rand(batch, S, generator=generator, device=device)
    sine_noise = torch.empty_strided((batch, L, S), (S * L, 1, L), device=device).normal_(generator=generator)
    source_noise = torch.empty_strided((batch, L, 1), (L, 1, L), device=device).normal_(generator=generator)
    return HiftDraws(rand_ini, sine_noise, source_noise)


class Snake(nn.Module):
    """Snake activation ``x + sin²(αx)/α`` with a learned per-channel α (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (B, C, T) -> (B, C, T)."""
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations and weight-normed convolutions."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=get_padding(kernel_size, 1)))
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (B, C, T) -> (B, C, T)."""
        for act1, conv1, act2, conv2 in zip(
            self.activations1, self.convs1, self.activations2, self.convs2, strict=True
        ):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """Mel to f0 (Hz): five weight-normed k=3 convolutions with ELU, a linear head, |·|."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(
                weight_norm(
                    nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, kernel_size=3, padding=1)
                )
            )
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (B, n_mels, T) mel -> (B, T) f0 in Hz (for num_class 1)."""
        x = self.condnet(x).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


class SineGen2(nn.Module):
    """Harmonic sine source whose phase is integrated at frame rate (no parameters).

    The phase increment per sample, ``f0·k / sr mod 1`` for harmonics k = 1…H+1, is
    linearly down-sampled by ``upsample_scale``, accumulated, and linearly up-sampled again
    (×scale in value), which keeps the fp32 phase sum short.
    """

    harmonics: torch.Tensor  # buffer (1, 1, H+1): 1..H+1

    def __init__(
        self,
        samp_rate: int,
        upsample_scale: int,
        *,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0,
    ) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold
        self.upsample_scale = int(upsample_scale)
        self.register_buffer(
            "harmonics", torch.arange(1, self.dim + 1, dtype=torch.float32)[None, None], persistent=False
        )

    def _f02sine(self, f0_values: torch.Tensor, rand_ini: torch.Tensor) -> torch.Tensor:
        """f0_values : (B, L, H+1) Hz per harmonic -> sines (B, L, H+1), strides (·, 1, L)."""
        rad_values = (f0_values / self.sampling_rate) % 1
        rand_ini = rand_ini.to(rad_values).clone()
        rand_ini[:, 0] = 0  # the fundamental starts at phase 0
        rad_values[:, 0, :] = rad_values[:, 0, :] + rand_ini
        # scale_factor as a float (not a size) so the sampling positions match the reference
        rad_values = F.interpolate(
            rad_values.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear"
        ).transpose(1, 2)
        phase = torch.cumsum(rad_values, dim=1) * 2 * np.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale, mode="linear"
        ).transpose(1, 2)
        return torch.sin(phase)

    def forward(
        self, f0: torch.Tensor, rand_ini: torch.Tensor, sine_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 : (B, L, 1) Hz at sample rate -> (sine_waves (B, L, H+1), uv (B, L, 1))."""
        fn = f0 * self.harmonics
        sine_waves = self._f02sine(fn, rand_ini) * self.sine_amp
        uv = (f0 > self.voiced_threshold).to(torch.float32)
        # unvoiced: noise of about the sine amplitude; voiced: small additive noise
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * sine_noise.to(sine_waves)
        return sine_waves * uv + noise, uv


class SourceModuleHnNSF2(nn.Module):
    """Harmonic-plus-noise source: :class:`SineGen2` harmonics merged by Linear(H+1→1) + tanh."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        *,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshod: float = 0,
    ) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = SineGen2(
            sampling_rate,
            upsample_scale,
            harmonic_num=harmonic_num,
            sine_amp=sine_amp,
            noise_std=add_noise_std,
            voiced_threshold=voiced_threshod,
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, f0: torch.Tensor, draws: HiftDraws) -> torch.Tensor:
        """f0 : (B, L, 1) Hz at sample rate -> merged source (B, L, 1).

        The reference's noise branch (``draws.source_noise · sine_amp / 3``) never reaches
        the waveform, so it is not computed.
        """
        sine_wavs, _ = self.l_sin_gen(f0, draws.rand_ini, draws.sine_noise)
        merged: torch.Tensor = self.l_tanh(self.l_linear(sine_wavs))
        return merged


class HiFTGenerator(nn.Module):
    """HiFTNet generator (NSF + iSTFTNet); keyword arguments are the yaml ``hift:`` keys."""

    stft_window: torch.Tensor  # buffer (n_fft,): periodic Hann

    def __init__(
        self,
        *,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 24000,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 5, 3),
        upsample_kernel_sizes: Sequence[int] = (16, 11, 7),
        istft_params: Mapping[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        if len(upsample_rates) != len(upsample_kernel_sizes) or len(upsample_rates) != len(
            source_resblock_kernel_sizes
        ):
            raise ModelLoadError(
                "hift: upsample_rates, upsample_kernel_sizes and source_resblock_kernel_sizes must have the same length"
            )
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ModelLoadError("hift: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        self.out_channels = 1
        self.in_channels = in_channels
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = istft_params
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_scale = math.prod(upsample_rates) * self.hop_len  # samples per mel frame: 480

        self.m_source = SourceModuleHnNSF2(
            sampling_rate=sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha,
            add_noise_std=nsf_sigma,
            voiced_threshod=nsf_voiced_threshold,
        )
        self.f0_upsamp = nn.Upsample(scale_factor=self.upsample_scale)
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, 1, padding=3))

        self.ups = nn.ModuleList(
            weight_norm(
                nn.ConvTranspose1d(base_channels // 2**i, base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            )
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes, strict=True))
        )

        # source downsampling to each stage's rate: cumulative products of the later stages' rates
        downsample_rates = [1, *list(upsample_rates)[::-1][:-1]]
        downsample_cum_rates = np.cumprod(downsample_rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (rate, k, d) in enumerate(
            zip(downsample_cum_rates, source_resblock_kernel_sizes, source_resblock_dilation_sizes, strict=True)
        ):
            ch, u = base_channels // 2 ** (i + 1), int(rate)
            if u == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))

        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base_channels // 2 ** (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = weight_norm(nn.Conv1d(ch, self.n_fft + 2, 7, 1, padding=3))
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        # periodic Hann computed in float64 then rounded, as scipy's get_window gives the reference
        self.register_buffer(
            "stft_window", torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(), persistent=False
        )
        self.f0_predictor = (
            f0_predictor
            if f0_predictor is not None
            else ConvRNNF0Predictor(in_channels=in_channels, cond_channels=base_channels)
        )

    # ---- stages ------------------------------------------------------------------------------

    def _check_mel(self, speech_feat: torch.Tensor) -> None:
        if speech_feat.dim() != 3 or speech_feat.shape[1] != self.in_channels or speech_feat.shape[2] < 1:
            raise InvalidInputError(
                f"HiFT expects a mel shaped (batch, {self.in_channels}, frames >= 1), got {tuple(speech_feat.shape)}"
            )

    def predict_f0(self, speech_feat: torch.Tensor) -> torch.Tensor:
        """speech_feat : (B, 80, T) log-mel -> f0 (B, T) in Hz, one value per mel frame."""
        self._check_mel(speech_feat)
        f0: torch.Tensor = self.f0_predictor(speech_feat)
        return f0

    def source_from_f0(
        self, f0: torch.Tensor, *, generator: torch.Generator | None = None, draws: HiftDraws | None = None
    ) -> torch.Tensor:
        """f0 : (B, T) Hz -> NSF excitation (B, 1, T·480).

        ``draws`` replaces the random draws (for parity tests); otherwise they come from
        ``generator`` (or the global RNG when it is None) in the reference's order.
        """
        if f0.dim() != 2:
            raise InvalidInputError(f"f0 must be shaped (batch, frames), got {tuple(f0.shape)}")
        B, L, S = f0.shape[0], f0.shape[1] * self.upsample_scale, self.nb_harmonics + 1
        if draws is None:
            draws = draw_hift_noise(B, L, S, generator)
        elif tuple(draws.rand_ini.shape) != (B, S) or tuple(draws.sine_noise.shape) != (B, L, S):
            raise InvalidInputError(
                f"injected HiFT draws must be rand_ini {(B, S)} and sine_noise {(B, L, S)}, got "
                f"{tuple(draws.rand_ini.shape)} and {tuple(draws.sine_noise.shape)}"
            )
        f0_up = self.f0_upsamp(f0[:, None]).transpose(1, 2)  # (B, L, 1), nearest
        source: torch.Tensor = self.m_source(f0_up, draws)
        return source.transpose(1, 2)

    def decode(self, speech_feat: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """speech_feat : (B, 80, T), source : (B, 1, T·480) -> waveform (B, T·480) in ±audio_limit."""
        self._check_mel(speech_feat)
        if source.dim() != 3 or source.shape[1] != 1 or source.shape[2] != speech_feat.shape[2] * self.upsample_scale:
            raise InvalidInputError(
                f"HiFT source must be shaped (batch, 1, {speech_feat.shape[2] * self.upsample_scale}), "
                f"got {tuple(source.shape)}"
            )
        spec = torch.stft(
            source.squeeze(1), self.n_fft, self.hop_len, self.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)  # (B, n_fft/2+1, frames, 2)
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1).to(source.dtype)  # (B, n_fft+2, T·120+1)

        x = self.conv_pre(speech_feat)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = self.reflection_pad(x)
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01 here, as the reference
        x = self.conv_post(x)  # (B, n_fft+2, T·120+1)

        half = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half, :]).float(), max=MAGNITUDE_CLIP)
        phase = torch.sin(x[:, half:, :]).float()
        spec_out = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec_out, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window)
        return torch.clamp(wav.to(x.dtype), -self.audio_limit, self.audio_limit)

    @torch.inference_mode()
    def inference(
        self,
        speech_feat: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        draws: HiftDraws | None = None,
        cache_source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """speech_feat : (B, 80, T) log-mel -> waveform (B, T·480) float32 at ``sampling_rate``.

        ``cache_source`` (B, 1, n) overwrites the start of the source, as streaming does to
        avoid glitches at chunk borders; None for whole utterances.
        """
        return self.inference_with_source(speech_feat, generator=generator, draws=draws, cache_source=cache_source)[0]

    @torch.inference_mode()
    def inference_with_source(
        self,
        speech_feat: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        draws: HiftDraws | None = None,
        cache_source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`inference` that also returns the source it decoded (B, 1, T·480), which streaming caches."""
        with parametrize.cached():
            f0 = self.predict_f0(speech_feat)
            source = self.source_from_f0(f0, generator=generator, draws=draws)
            if cache_source is not None and cache_source.shape[-1] > 0:
                source[:, :, : cache_source.shape[-1]] = cache_source
            return self.decode(speech_feat, source), source

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (480 for the official config)."""
        return self.upsample_scale


def normalize_weight_norm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the legacy weight-norm keys (``….weight_g``/``….weight_v``) to the parametrization
    form (``….parametrizations.weight.original0/1``); other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    renames = {WN_G_OLD: WN_G, WN_V_OLD: WN_V}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{prefix}.{renames[leaf]}" if leaf in renames and prefix else key] = value
    return out


def load_hift_state_dict(model: HiFTGenerator, state_dict: Mapping[str, torch.Tensor] | Path) -> None:
    """Strictly load ``hift.pt`` (a path or a state dict) in either weight-norm storage form."""
    load_strict(model, state_dict, "hift.pt", convert=normalize_weight_norm_keys)
