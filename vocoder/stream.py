"""Streaming token2wav: a session fed mixed audio codes in any increments that emits 24 kHz pieces.

It computes the reference's streaming vocoder (``token2wav_stream`` fed one 5-code group per
call), which is a different function of the codes than the whole-utterance :class:`Token2Wav`:
each chunk's flow sees only the prompt, the most recent generated frames, itself and one
look-ahead group, and HiFT runs per chunk with a cross-fade. What it reproduces:

* **Setup** as soon as one look-ahead group (5 codes) is buffered: the flow runs over prompt +
  that group with the prompt mel as condition; only its caches are kept.
* **Chunks** of 15, 24, then 48 token frames (25, 40, 80 codes), each with the next group as
  look-ahead, which stays buffered for the next chunk; the last chunk takes whatever is left
  and pads the look-ahead with zero frames.
* **Caches**: the conformer's attention and convolution left contexts (never truncated); one DiT
  cache per Euler step, truncated after every chunk to the prompt + the newest 96 frames. The
  ODE start noise of a chunk is ``noise[o : o + T]`` with ``o`` the DiT cache length, so after
  the first truncation every chunk reuses the same window, as the reference does.
* **HiFT** per chunk on the previous chunk's last 8 mel frames + the chunk's mel; the first
  3840 source samples are replaced by the previous source's tail; the first 3840 samples are
  cross-faded (Hamming) with the previous chunk's tail; every chunk but the last holds back its
  last 3840 samples for that fade. HiFT draws restart from ``hift_seed + k`` for chunk k.

What it does differently from the reference's caller interface, on purpose:

* A call that brings several chunks' worth synthesises them one chunk at a time, so the audio
  does not depend on how the codes were split across calls.
* :meth:`Token2WavStream.finish` always produces the rest of the audio, also right after the
  setup or when fewer than 5 codes arrived in total (the look-ahead group is then the padded
  partial group, as the whole-utterance path pads it).
* State lives in the session object (no shared dictionaries keyed by session id); ``finish``,
  ``close`` and the context manager release it.
* Caches grow with what they hold; there are no fixed-size buffers, so any prompt works. The
  conformer cache is never truncated (as in the reference) and its relative-position table is
  computed for whatever length it reaches, where the reference's stops at 5000 frames (100 s).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

from audio_codes import CODES_PER_GROUP, FRAMES_PER_GROUP
from errors import InvalidInputError
from vocoder.flow import FlowStreamCache, reshape_mixed_codes
from vocoder.hift import HiftDraws, HiFTGenerator, draw_hift_noise
from vocoder.token2wav import ArrayLike, float_tensor, validate_codes

if TYPE_CHECKING:
    from vocoder.token2wav import Token2Wav

logger = logging.getLogger(__name__)

CHUNK_TOKEN_FRAMES = (15, 24, 48)  # the reference's chunk schedule (0.6 s, 0.96 s, 1.92 s); the last repeats
MEL_CACHE_FRAMES = 8  # mel frames HiFT re-reads from the previous chunk; also the fade length / 480
LEFT_CONTEXT_FRAMES = 96  # generated mel frames the DiT keeps attending to (1.92 s, the largest chunk)


def codes_per_token_frames(frames: int) -> int:
    """Mixed codes that make ``frames`` dual-codebook frames (3 frames per 5-code group)."""
    return frames // FRAMES_PER_GROUP * CODES_PER_GROUP


def fade_window(overlap: int) -> torch.Tensor:
    """The reference's cross-fade: ``np.hamming(2 * overlap)`` as float32 (its halves sum to ~1.08, not 1)."""
    return torch.from_numpy(np.hamming(2 * overlap)).float()


def crossfade(head: torch.Tensor, prev_tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Fade ``head`` (B, n) in over the previous chunk's faded-out ``prev_tail`` (B, n); window (2n,)."""
    n = head.size(-1)
    return head * window[:n] + prev_tail * window[n:]


@dataclass
class HiftRecord:
    """What HiFT did for one chunk, kept when recording (tests, diagnostics)."""

    mel_in: torch.Tensor  # (1, 80, cache + T)
    seed: int | None  # None when the draws were injected
    rand_ini: torch.Tensor
    source: torch.Tensor  # (1, 1, L) after the cached head was written in
    speech_raw: torch.Tensor  # (1, L) HiFT output before the fade
    speech: torch.Tensor  # (1, L) after the fade
    emitted: int  # samples released for this chunk


@dataclass
class ChunkRecord:
    """What one chunk did, kept when the session records (tests, diagnostics)."""

    index: int
    last: bool
    codes: tuple[int, int]  # target codes consumed, look-ahead included: [start, stop)
    token: torch.Tensor  # (1, rows, 2) flow ids given to the flow
    noise_offset: int
    noise: torch.Tensor  # (1, 80, T) the ODE start
    cache_frames_in: int  # DiT attention-cache frames before the chunk
    cache_frames_out: int  # ... after it, before truncation
    cache_frames_kept: int  # ... after truncation
    mel: torch.Tensor  # (1, 80, T) flow mel
    hift: HiftRecord


@dataclass
class SetupRecord:
    """The setup call's inputs and discarded output (tests, diagnostics)."""

    token: torch.Tensor  # (1, prompt rows + look-ahead rows, 2)
    prompt_feat: torch.Tensor  # (1, P, 80)
    embedding: torch.Tensor  # (1, spk_dim)
    noise: torch.Tensor  # (1, 80, P)
    feat: torch.Tensor  # (1, 80, P) the ODE output over the prompt


@dataclass
class _HiftState:
    mel: torch.Tensor | None = None  # last MEL_CACHE_FRAMES frames of the previous HiFT input
    source: torch.Tensor | None = None  # last overlap samples of the previous source
    speech: torch.Tensor | None = None  # last overlap samples of the previous (faded) speech


class HiftStream:
    """HiFT over successive flow-mel chunks with the reference's mel/source caches and cross-fade.

    Separate from the flow so the HiFT half can be checked on the reference's own flow mels.
    Chunk k draws its NSF noise from a fresh ``torch.Generator`` seeded ``hift_seed + k`` (bit
    for bit what the reference draws after ``torch.manual_seed(hift_seed + k)``), or replays
    ``draws[k]``.
    """

    def __init__(
        self,
        hift: HiFTGenerator,
        *,
        hift_seed: int | None = None,
        draws: Sequence[HiftDraws] | None = None,
        mel_cache_frames: int = MEL_CACHE_FRAMES,
        record: bool = False,
    ) -> None:
        if hift_seed is None and draws is None:
            raise ValueError("HiftStream needs a hift_seed or injected draws")
        self.hift = hift
        self.hift_seed = hift_seed
        self.draws = draws
        self.mel_cache_frames = mel_cache_frames
        self.overlap = mel_cache_frames * hift.upsample_scale
        device = next(hift.parameters()).device
        self.window = fade_window(self.overlap).to(device)
        self.chunks = 0
        self.record = record
        self.records: list[HiftRecord] = []
        self._state = _HiftState()

    def _draws(self, n_samples: int) -> tuple[HiftDraws, int | None]:
        device = self.window.device
        if self.draws is not None:
            if self.chunks >= len(self.draws):
                raise InvalidInputError(f"no injected HiFT draws for chunk {self.chunks}", param="hift_draws")
            d = self.draws[self.chunks]
            return HiftDraws(d.rand_ini.to(device), d.sine_noise.to(device)), None
        assert self.hift_seed is not None
        seed = int(self.hift_seed) + self.chunks
        generator = torch.Generator(device="cpu").manual_seed(seed)
        d = draw_hift_noise(1, n_samples, self.hift.nb_harmonics + 1, generator)
        return HiftDraws(d.rand_ini.to(device), d.sine_noise.to(device)), seed

    @torch.inference_mode()
    def process(self, mel: torch.Tensor, *, last: bool) -> torch.Tensor:
        """mel: (1, 80, T) flow mel of the next chunk -> the samples this chunk releases, (1, n) float32."""
        state = self._state
        mel_in = mel if state.mel is None else torch.cat([state.mel, mel], dim=2)
        n_samples = mel_in.size(2) * self.hift.upsample_scale
        draws, seed = self._draws(n_samples)
        speech_raw, source = self.hift.inference_with_source(mel_in, draws=draws, cache_source=state.source)
        speech = speech_raw
        if state.speech is not None:  # from chunk 1 on, mel_in (>= 8 cached + 1 frames) outlasts the fade
            speech = speech_raw.clone()
            speech[:, : self.overlap] = crossfade(speech_raw[:, : self.overlap], state.speech, self.window)
        state.mel = mel_in[:, :, max(mel_in.size(2) - self.mel_cache_frames, 0) :]
        state.source = source[:, :, max(source.size(2) - self.overlap, 0) :]
        state.speech = speech[:, max(speech.size(1) - self.overlap, 0) :]
        out = speech if last else speech[:, : max(speech.size(1) - self.overlap, 0)]
        if self.record:
            self.records.append(
                HiftRecord(
                    mel_in.cpu(),
                    seed,
                    draws.rand_ini.cpu(),
                    source.cpu(),
                    speech_raw.cpu(),
                    speech.cpu(),
                    int(out.size(1)),
                )
            )
        self.chunks += 1
        return out.float()

    def release(self) -> None:
        self._state = _HiftState()


@dataclass
class _FlowState:
    prompt: torch.Tensor  # (1, T_ptok, 2)
    prompt_feat: torch.Tensor  # (1, P, 80)
    embedding: torch.Tensor  # (1, spk_dim) as handed over (after the bf16 round trip)
    noise: torch.Tensor  # (1, 80, N) the session's noise buffer
    spks: torch.Tensor | None = None
    cache: FlowStreamCache | None = None
    buffer: list[int] = field(default_factory=list)
    consumed: int = 0  # target codes dropped from the front of the buffer
    chunk: int = 0


class Token2WavStream:
    """One streamed utterance. Not thread-safe: drive it from one thread at a time.

    ``feed(codes)`` buffers codes and returns the pieces of every chunk that became due (usually
    none: a call that completes no chunk only appends to a list); ``finish()`` synthesises the
    rest and returns the final pieces. Pieces are 1-D float32 arrays at 24 kHz whose
    concatenation is the utterance; it depends only on the codes, the prompt and the seeds, not
    on how the codes were split across calls. ``close()`` (or leaving a ``with`` block) drops
    the caches at any point; ``finish`` does too.
    """

    def __init__(
        self,
        t2w: Token2Wav,
        prompt_codes: ArrayLike | list[int],
        prompt_mel: ArrayLike,
        spk_emb: ArrayLike,
        *,
        seed: int | None = None,
        noise: ArrayLike | None = None,
        hift_seed: int | None = None,
        hift_draws: Sequence[HiftDraws] | None = None,
        chunk_token_frames: Sequence[int] = CHUNK_TOKEN_FRAMES,
        record: bool = False,
    ) -> None:
        up = t2w.mel_frames_per_token_frame
        if not chunk_token_frames or any(
            f <= 0 or f % FRAMES_PER_GROUP or up * f < MEL_CACHE_FRAMES for f in chunk_token_frames
        ):
            raise ValueError(f"chunk sizes must be multiples of 3 token frames making >= {MEL_CACHE_FRAMES} mel frames")
        self.t2w = t2w
        self.flow = t2w.flow
        self.device = t2w.device
        self.n_timesteps = t2w.n_timesteps
        self.lookahead_frames = int(self.flow.pre_lookahead_len)
        self.lookahead_codes = codes_per_token_frames(self.lookahead_frames)
        self.chunk_token_frames = tuple(int(f) for f in chunk_token_frames)
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self.hift_seed = self.seed + 1 if hift_seed is None else int(hift_seed)
        prompt, prompt_feat, embedding = t2w.prepare_prompt(prompt_codes, prompt_mel, spk_emb)
        n_prompt = prompt_feat.size(1)
        # the furthest any chunk's noise window can reach: the cache never holds more than
        # prompt + left context at a chunk's start, and a chunk spans at most its frames + look-ahead
        needed = n_prompt + LEFT_CONTEXT_FRAMES + up * (max(self.chunk_token_frames) + self.lookahead_frames)
        if noise is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            z = torch.randn(1, self.flow.output_size, needed, generator=generator)
        else:
            z = float_tensor(noise, "noise")
            if z.dim() != 3 or z.size(0) != 1 or z.size(1) != self.flow.output_size or z.size(2) < n_prompt:
                raise InvalidInputError(
                    f"noise must have shape (1, {self.flow.output_size}, N >= {n_prompt}), got {tuple(z.shape)}",
                    param="noise",
                )
        self._flow: _FlowState | None = _FlowState(prompt, prompt_feat, embedding, z)
        self._hift: HiftStream | None = HiftStream(
            t2w.hift, hift_seed=self.hift_seed, draws=hift_draws, mel_cache_frames=MEL_CACHE_FRAMES, record=record
        )
        self.record = record
        self.setup_record: SetupRecord | None = None
        self.chunk_records: list[ChunkRecord] = []
        self.codes_received = 0
        self.samples_emitted = 0
        self.finished = False
        self.synthesis_s = 0.0  # seconds spent in the flow and HiFT (for logs and benchmarks)

    # ---- caller interface ----------------------------------------------------------------------

    def feed(self, codes: ArrayLike | list[int]) -> list[np.ndarray]:
        """Buffer ``codes`` (mixed, 0..5119) and return the audio of every chunk they complete."""
        state = self._open_state()
        new = validate_codes(codes, "codes", allow_empty=True).tolist()
        state.buffer.extend(new)
        self.codes_received += len(new)
        if state.cache is None and len(state.buffer) < self.lookahead_codes:
            return []
        try:
            return self._advance(state)
        except BaseException:  # a failed chunk leaves the caches half-updated: nothing may continue from them
            self.close()
            raise

    def finish(self) -> list[np.ndarray]:
        """Synthesise everything still buffered as the last chunk, release the state, return its audio."""
        state = self._open_state()
        try:
            if not state.buffer:
                return []  # nothing ever arrived: no audio
            if state.cache is None:  # fewer codes than one look-ahead group: it is the padded partial group
                self._setup(state)
            piece = self._chunk(state, list(state.buffer), last=True)
            return [piece] if piece.size else []
        finally:
            self.finished = True
            self.close()

    def close(self) -> None:
        """Drop all caches (idempotent); later ``feed``/``finish`` calls raise."""
        self._flow = None
        if self._hift is not None:
            self._hift.release()
            self._hift = None

    @property
    def closed(self) -> bool:
        return self._flow is None

    @property
    def sample_rate(self) -> int:
        return self.t2w.sample_rate

    def __enter__(self) -> Token2WavStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------

    def _open_state(self) -> _FlowState:
        if self._flow is None:
            raise RuntimeError("this vocoder stream is finished or closed")
        return self._flow

    def _chunk_codes(self, state: _FlowState) -> int:
        frames = self.chunk_token_frames[min(state.chunk, len(self.chunk_token_frames) - 1)]
        return codes_per_token_frames(frames)

    def _advance(self, state: _FlowState) -> list[np.ndarray]:
        """Set up once a look-ahead group is buffered, then synthesise every chunk that is due, one by one."""
        pieces: list[np.ndarray] = []
        if state.cache is None:
            if len(state.buffer) < self.lookahead_codes:
                return pieces
            self._setup(state)
        while len(state.buffer) >= self._chunk_codes(state) + self.lookahead_codes:
            size = self._chunk_codes(state)
            piece = self._chunk(state, state.buffer[: size + self.lookahead_codes], last=False)
            del state.buffer[:size]
            state.consumed += size
            pieces.append(piece)
        return [p for p in pieces if p.size]

    @torch.inference_mode()
    def _setup(self, state: _FlowState) -> None:
        start = time.perf_counter()
        lookahead = reshape_mixed_codes(state.buffer[: self.lookahead_codes]).unsqueeze(0)
        token = torch.cat([state.prompt, lookahead], dim=1)
        n_prompt = state.prompt_feat.size(1)
        device = self.device
        state.spks = self.flow.speaker_condition(state.embedding.to(device))
        state.cache = FlowStreamCache()
        z = state.noise[:, :, :n_prompt]
        feat = self.flow.forward_chunk(
            token.to(device),
            state.spks,
            state.cache,
            noise=z.to(device),
            cond=state.prompt_feat.to(device),
            last_chunk=False,
            n_timesteps=self.n_timesteps,
        )
        if self.record:
            self.setup_record = SetupRecord(token, state.prompt_feat, state.embedding, z, feat.cpu())
        self.synthesis_s += time.perf_counter() - start

    @torch.inference_mode()
    def _chunk(self, state: _FlowState, codes: list[int], *, last: bool) -> np.ndarray:
        start = time.perf_counter()
        assert state.cache is not None and state.spks is not None and self._hift is not None
        token = reshape_mixed_codes(codes).unsqueeze(0)
        rows = token.size(1) if last else token.size(1) - self.lookahead_frames
        frames = self.t2w.mel_frames_per_token_frame * rows
        offset = state.cache.estimator_frames
        if offset + frames > state.noise.size(2):
            raise InvalidInputError(
                f"noise has {state.noise.size(2)} frames; chunk {state.chunk} needs [{offset}, {offset + frames})",
                param="noise",
            )
        z = state.noise[:, :, offset : offset + frames]
        mel = self.flow.forward_chunk(
            token.to(self.device),
            state.spks,
            state.cache,
            noise=z.to(self.device),
            last_chunk=last,
            n_timesteps=self.n_timesteps,
        )
        frames_out = state.cache.estimator_frames
        n_prompt = state.prompt_feat.size(1)
        if frames_out > n_prompt + LEFT_CONTEXT_FRAMES:
            state.cache.keep_estimator(LEFT_CONTEXT_FRAMES, n_prompt)
        speech = self._hift.process(mel, last=last)
        piece = speech[0].cpu().numpy()
        if self.record:
            self.chunk_records.append(
                ChunkRecord(
                    index=state.chunk,
                    last=last,
                    codes=(state.consumed, state.consumed + len(codes)),
                    token=token,
                    noise_offset=offset,
                    noise=z,
                    cache_frames_in=offset,
                    cache_frames_out=frames_out,
                    cache_frames_kept=state.cache.estimator_frames,
                    mel=mel.cpu(),
                    hift=self._hift.records[-1],
                )
            )
        state.chunk += 1
        self.samples_emitted += int(piece.size)
        self.synthesis_s += time.perf_counter() - start
        logger.debug("vocoder stream chunk %d: %d mel frames, %d samples", state.chunk - 1, frames, piece.size)
        return piece
