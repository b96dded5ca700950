"""Prepared prompts to 24 kHz audio: generation in the variant's decode loop, then the vocoder.

``Synthesizer`` runs one generation at a time per caller (the service's worker threads call it
concurrently): the LLM part joins the variant's running batch (``llm.scheduler``), the vocoder
part runs on the calling thread under one lock, which bounds its activation memory to one
utterance or chunk. A whole generation waits for its codes and vocodes them at once; a streamed
one reads the ids as they are sampled and feeds the streaming vocoder while the LLM goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from audio import PCM16_SCALE, to_pcm16
from engine.prompting import PreparedPrompt, PromptFeatures
from engine.types import AudioSink, CancelToken, Timings
from errors import InvalidInputError, RequestCancelledError
from llm.decode import DecodeObserver
from llm.generation import GenerationHandle
from llm.sampling import DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, STOP_IDS, Ending
from llm.text_tokenizer import AUDIO_ID_END, AUDIO_ID_OFFSET
from vocoder.stream import Token2WavStream

if TYPE_CHECKING:
    from llm.scheduler import Scheduler
    from vocoder.token2wav import Token2Wav

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingOptions:
    """The server-wide generation settings every request shares."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    max_length: int = DEFAULT_MAX_LENGTH  # total LLM length, prompt included, as the reference
    max_new_tokens: int | None = None  # cap on generated audio ids (tests and the demo keep it small)


@dataclass(frozen=True)
class Generated:
    """One generation's output: its mixed audio codes, their 24 kHz audio (speed not applied), and
    what ended it (``Ending.LIMIT``: the length limit cut it short). ``heard``: a streamed
    generation's audio as it was sent, speed applied (so the result need not stretch it again)."""

    codes: np.ndarray
    audio: np.ndarray
    ending: Ending
    heard: np.ndarray | None = None


def raise_if_cancelled(cancel: CancelToken | None) -> None:
    if cancel is not None and cancel.is_set():
        raise RequestCancelledError("the client went away; its work was stopped")


def pcm16_round_trip(wav: np.ndarray) -> np.ndarray:
    """The reference saves each edit iteration as a 16-bit WAV (soundfile) and reloads it; same in memory."""
    out: np.ndarray = (to_pcm16(wav) / np.float32(PCM16_SCALE)).astype(np.float32)
    return out


def change_speed(wav: np.ndarray, speed: float) -> np.ndarray:
    """Play ``wav`` ``speed`` times faster without changing its pitch (phase-vocoder time stretch).

    Output length is ``round(len / speed)``. A phase vocoder smears transients a little at large
    factors; it is the documented trade-off for a simple pitch-preserving stretch (librosa).
    """
    if speed == 1.0 or wav.size == 0:
        return wav
    import librosa

    return librosa.effects.time_stretch(wav.astype(np.float32), rate=float(speed)).astype(np.float32)


class Synthesizer:
    """Generation (one decode loop per variant) and vocoding; thread-safe for the service's workers."""

    def __init__(
        self, schedulers: Mapping[str, Scheduler], token2wav: Token2Wav, options: SamplingOptions | None = None
    ) -> None:
        if not schedulers:
            raise ValueError("the synthesizer needs at least one LLM variant")
        self.schedulers = dict(schedulers)
        self.token2wav = token2wav
        self.options = options or SamplingOptions()
        self.generations = 0  # LLM generations submitted since start (every clone and edit iteration)
        self._count_lock = threading.Lock()
        self._vocoder_lock = threading.Lock()

    @property
    def variants(self) -> list[str]:
        return list(self.schedulers)

    def check_variant(self, variant: str) -> None:
        if variant not in self.schedulers:
            raise InvalidInputError(
                f"model variant {variant!r} is not loaded; loaded variants: {', '.join(self.schedulers)}",
                param="variant",
            )

    def set_observer(self, observer: DecodeObserver | None) -> None:
        """Metrics hooks for every variant's decode loop (batch size per step, queue wait, tokens)."""
        for scheduler in self.schedulers.values():
            scheduler.observer = observer

    def close(self) -> None:
        """Stop the decode loops (waiting and running generations end with NotReadyError)."""
        for scheduler in self.schedulers.values():
            scheduler.close()

    # --- generation -----------------------------------------------------------------------
    def submit(
        self, variant: str, prompt: PreparedPrompt, *, intensity: float, seed: int, cancel: CancelToken | None
    ) -> GenerationHandle:
        """Queue one prompt on its variant's decode loop; ``cancel`` stops it before its next step."""
        raise_if_cancelled(cancel)
        opts = self.options
        handle = self.schedulers[variant].submit(
            prompt.pair,
            seed=seed,
            intensity=intensity,
            temperature=opts.temperature,
            top_k=opts.top_k,
            max_length=opts.max_length,
            max_new_tokens=opts.max_new_tokens,
        )
        if cancel is not None:
            cancel.on_cancel(handle.cancel)
        with self._count_lock:
            self.generations += 1
        return handle

    def whole(self, handle: GenerationHandle, prompt: PreparedPrompt, *, timings: Timings) -> Generated:
        """Wait for a submitted generation, then vocode the whole utterance."""
        with timings.measure("llm"):
            result = handle.result()
        if result.cancelled:
            raise RequestCancelledError("the client went away during generation")
        codes = np.asarray(result.codes, dtype=np.int64)
        return Generated(codes, self.vocode(codes, prompt.features, handle.seed, timings), result.ending)

    def streamed(
        self,
        handle: GenerationHandle,
        prompt: PreparedPrompt,
        *,
        speed: float,
        timings: Timings,
        sink: AudioSink,
        cancel: CancelToken | None,
    ) -> Generated:
        """The decode loop samples while this thread feeds the streaming vocoder with the ids of ``handle``.

        The vocoder session's output does not depend on how the codes are split across feeds, so
        the streamed audio is the same whatever the thread timing. With ``speed`` != 1 the pieces
        are held back and the stretched whole is sent at the end (a phase-vocoder stretch needs
        the whole signal).
        """
        pieces: list[np.ndarray] = []
        begin = time.perf_counter()
        seed = handle.seed

        def emit(new: list[np.ndarray]) -> None:
            for piece in new:
                if piece.size:
                    if not pieces and timings.first_audio is None:  # how far the LLM was when audio first left
                        timings.first_audio_ids = handle.steps_run
                        timings.first_audio = time.perf_counter() - begin
                    pieces.append(piece)
                    if speed == 1.0:
                        sink.put(piece)

        features = prompt.features
        vocode_s = 0.0
        try:
            with Token2WavStream(
                self.token2wav,
                np.asarray(features.tokens.prompt_codes),
                features.prompt_mel,
                features.spk_emb,
                seed=seed,
            ) as session:
                stopped = False
                for token in handle.ids():
                    raise_if_cancelled(cancel)  # also when the LLM had already finished
                    if stopped or not AUDIO_ID_OFFSET <= token < AUDIO_ID_END:
                        stopped = stopped or token in STOP_IDS  # the reference's postprocess: cut at a stop id
                        continue
                    t = time.perf_counter()
                    with self._vocoder_lock, torch.inference_mode():
                        emit(session.feed([token - AUDIO_ID_OFFSET]))
                    vocode_s += time.perf_counter() - t
                result = handle.result()
                raise_if_cancelled(cancel)
                t = time.perf_counter()
                with self._vocoder_lock, torch.inference_mode():
                    emit(session.finish())
                vocode_s += time.perf_counter() - t
        finally:
            handle.cancel()  # a no-op when it is done; stops the LLM if the vocoder failed
        wav = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        heard = self.apply_speed(wav, speed, timings)  # wav itself at speed 1: its pieces went out above
        if speed != 1.0 and wav.size:
            sink.put(heard)
        if timings.first_audio_ids is not None and timings.streamed_ids is None:
            timings.streamed_ids = handle.steps_run
        timings.llm += time.perf_counter() - begin - vocode_s
        timings.vocoder += vocode_s
        return Generated(np.asarray(result.codes, dtype=np.int64), wav, result.ending, heard)

    # --- audio ------------------------------------------------------------------------------
    def vocode(self, codes: np.ndarray, features: PromptFeatures, seed: int, timings: Timings) -> np.ndarray:
        """The whole-utterance vocoder (the reference's ``token2wav``) on ``codes``."""
        if codes.size == 0:
            logger.warning("the LLM produced no audio ids; returning empty audio")
            return np.zeros(0, dtype=np.float32)
        with timings.measure("vocoder"), self._vocoder_lock, torch.inference_mode():
            wav = self.token2wav.token2wav(
                torch.from_numpy(codes),
                torch.as_tensor(np.asarray(features.tokens.prompt_codes), dtype=torch.long),
                features.prompt_mel,
                features.spk_emb,
                seed=seed,
            )
        return wav.reshape(-1).float().cpu().numpy()

    @staticmethod
    def apply_speed(wav: np.ndarray, speed: float, timings: Timings) -> np.ndarray:
        if speed == 1.0:
            return wav
        with timings.measure("speed"):
            return change_speed(wav, speed)
