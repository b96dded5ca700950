"""The engine: clone and edit requests as chains of generations (docs/engine.md, docs/long-text.md).

    clone: prompt audio ─► PromptPreparer.voice (once) ─► for each text segment: its clone prompt
           ─► Synthesizer ─► 24 kHz; the segments' audio joined by ``engine.seams``.
    edit:  the audio to edit is the acoustic prompt ─► PromptPreparer.edit ─► Synthesizer.
           ``n_edit_iter`` > 1 feeds each iteration's 24 kHz output into the next (re-tokenised,
           mel and embedding recomputed, as the reference's history loop does) and returns all.
    chain: a clone or a first edit, then ``request.edits`` in order, each step on the previous
           output with the transcript carried along (``engine.chains``: checks, limits, seeds).

A clone's text is cut into segments (``engine.segments``) that are generated side by side in the
variant's running batch and delivered strictly in order (``engine.speaking``). ``StepAudioEngine``
only walks chains; the prompt preparer (tokenizer, frontend, cache, Whisper) and the synthesizer
(decode loops, vocoder) do the work, and both are shared by the service's worker threads.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from audio import VOCODER_SR, AudioError
from engine.chains import check_step, generation_seed
from engine.normalize import normalize_text
from engine.prompting import PreparedPrompt, PromptPreparer
from engine.runs import ChainRun, RequestRun
from engine.seams import DEFAULT_PAUSE_SECONDS, join_segments
from engine.segments import MAX_SEGMENT_TOKENS, Segment, split_text
from engine.speaking import SegmentChain, speak_segments
from engine.synthesizer import Synthesizer, pcm16_round_trip
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
    SegmentSpan,
    StreamInfo,
    SynthesisResult,
    Timings,
)
from engine.voices import load_default_voice
from errors import InvalidInputError
from llm import prompts
from llm.decode import DecodeObserver
from llm.generation import GenerationHandle
from llm.sampling import MAX_INTENSITY, MIN_INTENSITY, Ending
from token_cache import count_lookups

logger = logging.getLogger(__name__)

DEFAULT_SEGMENTS_IN_FLIGHT = 8


class StepAudioEngine:
    """Clone and edit requests on loaded stages; thread-safe for the service's workers."""

    def __init__(
        self,
        preparer: PromptPreparer,
        synthesizer: Synthesizer,
        *,
        max_edit_iter: int = 4,
        segment_max_tokens: int = MAX_SEGMENT_TOKENS,
        segments_in_flight: int = DEFAULT_SEGMENTS_IN_FLIGHT,
        pause_s: float = DEFAULT_PAUSE_SECONDS,
    ) -> None:
        self.preparer = preparer
        self.synthesizer = synthesizer
        self.max_edit_iter = max_edit_iter
        self.segment_max_tokens = segment_max_tokens
        self.segments_in_flight = segments_in_flight
        self.pause_s = pause_s

    # --- what the HTTP layer asks ------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return self.synthesizer.variants

    @property
    def generations(self) -> int:
        """LLM generations run since start (every clone segment and edit iteration)."""
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

    def segments(self, text: str) -> list[Segment]:
        """How ``text`` is cut into the segments a clone speaks (``engine.segments.split_text``)."""
        return split_text(text, count_tokens=self.preparer.count_tokens, max_tokens=self.segment_max_tokens)

    def count_tokens(self, text: str) -> int:
        """LLM text tokens of ``text`` (what the segment bound counts)."""
        return self.preparer.count_tokens(text)

    def set_observer(self, observer: DecodeObserver | None) -> None:
        self.synthesizer.set_observer(observer)

    def close(self) -> None:
        self.synthesizer.close()

    # --- requests -------------------------------------------------------------------------
    def clone(
        self,
        request: CloneRequest,
        *,
        sink: AudioSink | None = None,
        cancel: CancelToken | None = None,
        text: Iterable[Segment] | None = None,
    ) -> SynthesisResult:
        """Speak ``request.text`` in the voice of ``request.prompt_audio``; each segment then runs ``request.edits``.

        With a ``sink`` every segment's last generation is streamed there while the LLM samples,
        in order (the earlier ones run whole); ``cancel`` set (the client went away) stops the
        work before the next decode step with ``RequestCancelledError``. ``text``: the segments to
        speak as they become known (text that arrives while it is spoken) instead of
        ``request.text`` cut up front.
        """
        start = time.perf_counter()
        run = self._start(request, sink, cancel)
        steps = self.check_steps(request.edits)
        if text is None:
            if not (request.text or "").strip():
                raise InvalidInputError("the text to speak is empty", param="text")
            cut = self.segments(request.text)
            run.segments, text = len(cut), cut
        with count_lookups() as lookups:
            voice = self.preparer.voice(request, run.timings)
            run.transcript = voice.transcript
            chains = speak_segments(self, run, voice, text, steps)
        return self._result(run, chains, lookups.hits, lookups.misses, start)

    def edit(
        self, request: EditRequest, *, sink: AudioSink | None = None, cancel: CancelToken | None = None
    ) -> SynthesisResult:
        """Edit ``request.audio`` (``n_edit_iter`` times, each on the previous output), then ``request.edits``.

        ``sink`` and ``cancel`` as for ``clone``: only the last iteration of the last step streams.
        """
        start = time.perf_counter()
        run = self._start(request, sink, cancel)
        steps = self.check_steps((request.first_step, *request.edits))
        if request.normalize_text:
            steps = tuple(replace(s, text=normalize_text(s.text)) if s.text else s for s in steps)
        with count_lookups() as lookups:
            prepared = self.preparer.first_edit(request, steps, run.timings)
            run.transcript = prepared.transcript
            chain = ChainRun(run.seed, sink=sink)
            self.run_steps(run, chain, steps, prepared, prepared.transcript)
        return self._result(run, [], lookups.hits, lookups.misses, start, edit_chain=chain)

    def _start(
        self, request: CloneRequest | EditRequest, sink: AudioSink | None, cancel: CancelToken | None
    ) -> RequestRun:
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
        return RequestRun(request, seed, sink=sink, cancel=cancel)

    # --- chains -------------------------------------------------------------------------
    def run_clone_chain(self, run: RequestRun, item: SegmentChain, sink: AudioSink | None) -> ChainRun:
        """One clone segment: its already submitted clone generation, then its edit steps."""
        chain = ChainRun(item.seed, segment=item.index, sink=sink)
        label = IterationLabel(0, "clone", None, 1, item.seed, segment=item.index)
        self.output(run, chain, item.prompt, label, last=not item.steps, handle=item.handle)
        self.run_steps(run, chain, item.steps, None, item.spoken)
        return chain

    def run_steps(
        self,
        run: RequestRun,
        chain: ChainRun,
        steps: Sequence[EditStep],
        first_prompt: PreparedPrompt | None,
        audio_text: str | None,
    ) -> None:
        """Run the edit steps in order, each on ``chain``'s last output, with the transcript carried along.

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
                        previous = AudioInput(pcm16_round_trip(chain.outputs[-1])[None], VOCODER_SR)
                        prompt = self.preparer.edit(previous, step, audio_text, run.timings)
                    except AudioError as exc:
                        logger.warning(
                            "step %d iteration %d: the previous output cannot be edited (%s); returning %d output(s)",
                            k + 1,
                            iteration + 1,
                            exc,
                            chain.generations,
                        )
                        return
                seed = generation_seed(chain.seed, chain.generations)
                label = IterationLabel(k + 1, step.mode, step.edit_info, iteration + 1, seed, segment=chain.segment)
                last = k == len(steps) - 1 and iteration == step.n_edit_iter - 1
                self.output(run, chain, prompt, label, last=last)
                prompt = None
                if step.text is not None:  # the next edit hears the text this one produced
                    audio_text = step.text

    def submit(self, run: RequestRun, prompt: PreparedPrompt, seed: int) -> GenerationHandle:
        """Queue one generation of ``run``'s request on its variant's decode loop."""
        request = run.request
        return self.synthesizer.submit(
            request.variant, prompt, intensity=request.intensity, seed=seed, cancel=run.cancel
        )

    def output(
        self,
        run: RequestRun,
        chain: ChainRun,
        prompt: PreparedPrompt,
        label: IterationLabel,
        *,
        last: bool,
        handle: GenerationHandle | None = None,
    ) -> None:
        """One generation (submitted now unless ``handle`` is given) and its audio, appended to ``chain``;
        the chain's last one streams to ``chain.sink`` when there is one."""
        synth = self.synthesizer
        if handle is None:
            handle = self.submit(run, prompt, label.seed)
        run.prompt_cache.append(prompt.features.cache)
        if last and chain.sink is not None:  # started once the decode loop has accepted the prompt
            request = run.request
            info = StreamInfo(
                run.seed,
                request.intensity,
                VOCODER_SR,
                chain.generations + 1,
                run.transcript,
                run.segments,
                prompt_cache=tuple(run.prompt_cache),
            )
            chain.sink.start(info)
            generated = synth.streamed(
                handle, prompt, speed=request.speed, timings=run.timings, sink=chain.sink, cancel=run.cancel
            )
        else:
            generated = synth.whole(handle, prompt, timings=run.timings)
        if generated.ending is Ending.LIMIT:
            chain.cut_short = True
        chain.codes = generated.codes
        chain.outputs.append(generated.audio)
        chain.heard = generated.heard
        chain.labels.append(label)

    def _result(
        self,
        run: RequestRun,
        chains: Sequence[tuple[Segment, ChainRun]],
        hits: int,
        misses: int,
        start: float,
        *,
        edit_chain: ChainRun | None = None,
    ) -> SynthesisResult:
        speed, timings = run.request.speed, run.timings
        all_chains = [edit_chain] if edit_chain is not None else [chain for _, chain in chains]
        outputs = [c.at_speed(lambda wav: self.synthesizer.apply_speed(wav, speed, timings)) for c in all_chains]
        if len(outputs) == 1:
            audio = outputs[0][-1]
            spans = [(0, audio.size)]
        else:
            audio, spans = join_segments([o[-1] for o in outputs], sample_rate=VOCODER_SR, pause_s=self.pause_s)
        timings.total = time.perf_counter() - start
        cut = sum(c.cut_short for c in all_chains)
        if cut:
            logger.warning(
                "%d of %d part(s) of a request ended at the length limit, not their stop id: audio cut short",
                cut,
                len(all_chains),
            )
        return SynthesisResult(
            audio=audio,
            sample_rate=VOCODER_SR,
            seed=run.seed,
            intensity=run.request.intensity,
            iterations=[wav for o in outputs for wav in o],
            labels=[label for c in all_chains for label in c.labels],
            transcript=run.transcript,
            n_audio_tokens=sum(int(c.codes.shape[0]) for c in all_chains),
            timings=timings,
            cache_hits=hits,
            cache_misses=misses,
            prompt_cache=list(run.prompt_cache),
            segments=[
                SegmentSpan.of(k, seg, s, e, seed=chain.seed, cut_short=chain.cut_short)
                for k, ((seg, chain), (s, e)) in enumerate(zip(chains, spans, strict=False))
            ],
            cut_short=cut > 0,
        )
