"""The engine: clone and edit requests as chains of generations (docs/engine.md).

    clone: prompt audio + text ─► PromptPreparer.clone ─► Synthesizer ─► 24 kHz
    edit:  the audio to edit is the acoustic prompt ─► PromptPreparer.edit ─► Synthesizer.
           ``n_edit_iter`` > 1 feeds each iteration's 24 kHz output into the next (re-tokenised,
           mel and embedding recomputed, as the reference's history loop does) and returns all.
    chain: a clone or a first edit, then ``request.edits`` in order, each step on the previous
           output with the transcript carried along (``engine.chains``: checks, limits, seeds).

``StepAudioEngine`` only walks the chain: the prompt preparer (tokenizer, frontend, cache,
Whisper) and the synthesizer (decode loops, vocoder) do the work, and both are shared by the
service's worker threads. The request's last generation streams to its ``AudioSink`` when it
has one; the earlier ones run whole.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audio import VOCODER_SR, AudioError
from engine.chains import check_step, generation_seed
from engine.prompting import PreparedPrompt, PromptPreparer
from engine.synthesizer import Generated, Synthesizer, pcm16_round_trip
from engine.types import (
    MAX_SEED,
    MAX_SPEED,
    MIN_SPEED,
    AudioInput,
    AudioSink,
    CancelToken,
    CloneRequest,
    EditRequest,
    EditStep,
    IterationLabel,
    PromptCacheResult,
    StreamInfo,
    SynthesisResult,
    Timings,
)
from engine.voices import load_default_voice
from errors import InvalidInputError
from llm import prompts
from llm.decode import DecodeObserver
from llm.sampling import MAX_INTENSITY, MIN_INTENSITY
from token_cache import count_lookups

logger = logging.getLogger(__name__)


@dataclass
class _ChainRun:
    """One request's chain: what it runs with, and every output so far with its label."""

    request: CloneRequest | EditRequest
    seed: int
    timings: Timings = field(default_factory=Timings)
    outputs: list[np.ndarray] = field(default_factory=list)
    labels: list[IterationLabel] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sink: AudioSink | None = None  # streams the request's last generation
    cancel: CancelToken | None = None  # set when the client went away
    transcript: str | None = None  # of the request's audio, for the stream's headers
    prompt_cache: list[PromptCacheResult] = field(default_factory=list)  # per generation's prompt, in order

    @property
    def generations(self) -> int:
        return len(self.outputs)


class StepAudioEngine:
    """Clone and edit requests on loaded stages; thread-safe for the service's workers."""

    def __init__(self, preparer: PromptPreparer, synthesizer: Synthesizer, *, max_edit_iter: int = 4) -> None:
        self.preparer = preparer
        self.synthesizer = synthesizer
        self.max_edit_iter = max_edit_iter

    # --- what the HTTP layer asks ------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return self.synthesizer.variants

    @property
    def generations(self) -> int:
        """LLM generations run since start (every clone and edit iteration)."""
        return self.synthesizer.generations

    @property
    def auto_transcribe(self) -> bool:
        return self.preparer.transcriber is not None

    def transcribe(self, audio: AudioInput) -> str:
        """Whisper's transcript of ``audio`` (InvalidInputError when auto-transcription is off)."""
        return self.preparer.transcript(None, audio, "audio_text", Timings())

    def tags(self) -> dict[str, list[str]]:
        """Edit modes with their allowed ``edit_info`` values, and the paralinguistic tags."""
        return prompts.catalogue()

    def default_voice(self) -> tuple[AudioInput, str]:
        return load_default_voice()

    def cache_stats(self) -> dict[str, Any]:
        return self.preparer.cache_stats()

    def clear_cache(self) -> None:
        self.preparer.clear_cache()

    def prepare_voice(self, audio: AudioInput) -> None:
        """Tokenise a voice's clip and cache its prompt features now (voice registration)."""
        self.preparer.check_audio(audio, "prompt_audio")
        self.preparer.features(audio, "prompt_audio")

    def check_steps(self, steps: Sequence[EditStep]) -> tuple[EditStep, ...]:
        """Every step against the catalogue and the iteration limit (``engine.chains.check_step``)."""
        return tuple(check_step(step, max_edit_iter=self.max_edit_iter) for step in steps)

    def set_observer(self, observer: DecodeObserver | None) -> None:
        self.synthesizer.set_observer(observer)

    def close(self) -> None:
        self.synthesizer.close()

    # --- requests -------------------------------------------------------------------------
    def clone(
        self, request: CloneRequest, *, sink: AudioSink | None = None, cancel: CancelToken | None = None
    ) -> SynthesisResult:
        """Speak ``request.text`` in the voice of ``request.prompt_audio``, then run ``request.edits``.

        With a ``sink`` the request's last generation is streamed there while the LLM samples
        (the earlier ones run whole); ``cancel`` set (the client went away) stops the work
        before the next decode step with ``RequestCancelledError``.
        """
        start = time.perf_counter()
        run = self._start(request, sink, cancel)
        steps = self.check_steps(request.edits)
        with count_lookups() as lookups:
            prepared = self.preparer.clone(request, run.timings)
            run.transcript = prepared.transcript
            self._output(run, prepared, run.seed, IterationLabel(0, "clone", None, 1, run.seed), last=not steps)
            self._run_steps(run, steps, None, request.text)
        return self._result(run, lookups.hits, lookups.misses, start)

    def edit(
        self, request: EditRequest, *, sink: AudioSink | None = None, cancel: CancelToken | None = None
    ) -> SynthesisResult:
        """Edit ``request.audio`` (``n_edit_iter`` times, each on the previous output), then ``request.edits``.

        ``sink`` and ``cancel`` as for ``clone``: only the last iteration of the last step streams.
        """
        start = time.perf_counter()
        run = self._start(request, sink, cancel)
        steps = self.check_steps((request.first_step, *request.edits))
        with count_lookups() as lookups:
            prepared = self.preparer.first_edit(request, steps, run.timings)
            run.transcript = prepared.transcript
            self._run_steps(run, steps, prepared, prepared.transcript)
        return self._result(run, lookups.hits, lookups.misses, start)

    def _start(
        self, request: CloneRequest | EditRequest, sink: AudioSink | None, cancel: CancelToken | None
    ) -> _ChainRun:
        """Check the request's controls and give it its seed."""
        self.synthesizer.check_variant(request.variant)
        if not MIN_INTENSITY <= request.intensity <= MAX_INTENSITY:
            raise InvalidInputError(
                f"intensity must be between {MIN_INTENSITY} and {MAX_INTENSITY}, got {request.intensity}",
                param="intensity",
            )
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise InvalidInputError(
                f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed}", param="speed"
            )
        if request.seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        elif 0 <= request.seed <= MAX_SEED:
            seed = int(request.seed)
        else:
            raise InvalidInputError(f"seed must be between 0 and {MAX_SEED}, got {request.seed}", param="seed")
        return _ChainRun(request, seed, sink=sink, cancel=cancel)

    def _run_steps(
        self, run: _ChainRun, steps: Sequence[EditStep], first_prompt: PreparedPrompt | None, audio_text: str | None
    ) -> None:
        """Run the edit steps in order, each on ``run``'s last output, with the transcript carried along.

        Without ``first_prompt`` (every step but an edit request's first) a step edits the
        previous output after the 16-bit PCM round trip the reference's saved WAV implies. A
        step whose input cannot be edited again (our own output empty or too short) ends the
        chain with what ran so far.
        """
        prompt = first_prompt
        for k, step in enumerate(steps):
            for iteration in range(step.n_edit_iter):
                if prompt is None:
                    try:
                        previous = AudioInput(pcm16_round_trip(run.outputs[-1])[None], VOCODER_SR)
                        prompt = self.preparer.edit(previous, step, audio_text, run.timings)
                    except AudioError as exc:
                        logger.warning(
                            "step %d iteration %d: the previous output cannot be edited (%s); returning %d output(s)",
                            k + 1,
                            iteration + 1,
                            exc,
                            run.generations,
                        )
                        return
                seed = generation_seed(run.seed, run.generations)
                label = IterationLabel(k + 1, step.mode, step.edit_info, iteration + 1, seed)
                last = k == len(steps) - 1 and iteration == step.n_edit_iter - 1
                self._output(run, prompt, seed, label, last=last)
                prompt = None
                if step.text is not None:  # the next edit hears the text this one produced
                    audio_text = step.text

    def _output(self, run: _ChainRun, prompt: PreparedPrompt, seed: int, label: IterationLabel, *, last: bool) -> None:
        """One generation and its audio, appended to ``run``; the request's last one streams to
        ``run.sink`` when there is one."""
        request, synth = run.request, self.synthesizer
        run.prompt_cache.append(prompt.features.cache)
        generated: Generated
        if last and run.sink is not None:
            info = StreamInfo(
                run.seed,
                request.intensity,
                VOCODER_SR,
                run.generations + 1,
                run.transcript,
                prompt_cache=tuple(run.prompt_cache),
            )
            generated = synth.streamed(
                request.variant,
                prompt,
                intensity=request.intensity,
                seed=seed,
                speed=request.speed,
                timings=run.timings,
                sink=run.sink,
                info=info,
                cancel=run.cancel,
            )
        else:
            generated = synth.whole(
                request.variant, prompt, intensity=request.intensity, seed=seed, timings=run.timings, cancel=run.cancel
            )
        run.codes = generated.codes
        run.outputs.append(generated.audio)
        run.labels.append(label)

    def _result(self, run: _ChainRun, hits: int, misses: int, start: float) -> SynthesisResult:
        iterations = [self.synthesizer.apply_speed(wav, run.request.speed, run.timings) for wav in run.outputs]
        run.timings.total = time.perf_counter() - start
        return SynthesisResult(
            audio=iterations[-1],
            sample_rate=VOCODER_SR,
            seed=run.seed,
            intensity=run.request.intensity,
            iterations=iterations,
            labels=run.labels,
            transcript=run.transcript,
            n_audio_tokens=int(run.codes.shape[0]),
            timings=run.timings,
            cache_hits=hits,
            cache_misses=misses,
            prompt_cache=list(run.prompt_cache),
        )
