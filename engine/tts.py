"""The engine: clone and edit composed from the three stages (docs/model.md §5, docs/engine.md).

    clone: prompt audio ─► prepare_prompt ─► wav2token + prompt mel + speaker embedding
               (one cache record under the audio's content key, see _prompt_features)
           prompt text + tokens ─► clone prompt ─► Step1 generate(intensity, seed)
           audio ids + the prompt's tokens/mel/embedding ─► token2wav ─► 24 kHz
    edit:  the same, with the edit prompt; the audio to edit is the acoustic prompt.
           ``n_edit_iter`` > 1 feeds each iteration's 24 kHz output into the next (re-tokenised,
           mel and embedding recomputed, as the reference's history loop does) and returns all.
    chain: a clone or a first edit, then ``request.edits`` in order, each step on the previous
           output with the transcript carried along (``engine.chains``: checks, limits, seeds).

The engine is called from the service's worker threads. The tokenizer, the prompt frontend and
the cache are thread-safe; each LLM variant and the vocoder run one request at a time under their
own lock, so two requests overlap in different stages while (GPU) memory stays bounded.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
import torch

import model_loader
from audio import PCM16_SCALE, VOCODER_SR, AudioError, prepare_prompt, to_pcm16
from audio_codes import CODES_PER_GROUP, FRAMES_PER_GROUP
from engine.chains import check_step, generation_seed, needs_transcript
from engine.scheduler import GenerationHandle, Scheduler, SchedulerObserver
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
)
from errors import InvalidInputError, RequestCancelledError, TooLargeError
from llm import prompts
from llm.generate import MAX_INTENSITY, MIN_INTENSITY, STOP_IDS
from llm.text_tokenizer import AUDIO_ID_END, AUDIO_ID_OFFSET
from token_cache import LookupTally, content_key, count_lookups
from tokenizer import AudioTokens, check_prompt
from vocoder.frontend import frontend_fingerprint, prompt_features

if TYPE_CHECKING:
    from engine.transcribe import Transcriber
    from llm.model import Step1ForCausalLM
    from llm.text_tokenizer import StepTextTokenizer
    from settings import Settings
    from token_cache import TokenCache
    from tokenizer import StepAudioTokenizer
    from vocoder.frontend import SpeakerEncoder
    from vocoder.token2wav import Token2Wav

logger = logging.getLogger(__name__)

SAMPLES_PER_MEL_FRAME = 480  # HiFT: 24 kHz / 50 Hz mel
MEL_FRAMES_PER_TOKEN_FRAME = 2  # the flow upsamples 25 Hz dual-codebook frames to 50 Hz
SAMPLES_PER_GROUP = FRAMES_PER_GROUP * MEL_FRAMES_PER_TOKEN_FRAME * SAMPLES_PER_MEL_FRAME  # 2880


DEFAULT_VOICE_DIR = Path(__file__).resolve().parent / "default_voice"

DEMO_MAX_NEW_TOKENS = 250  # random weights rarely sample EOS: cap demo generations at 6 s of audio
PROMPT_RECORD = ("vq02", "vq06", "prompt_mel", "spk_emb")  # the arrays of a prompt's cache record
PROMPT_RECORD_VERSION = 1  # bump when the record's arrays or their meaning change


@dataclass(frozen=True)
class EngineOptions:
    """Behaviour knobs of the engine (plain values; ``build_engine`` fills them from settings)."""

    max_audio_seconds: float = 30.0
    max_edit_iter: int = 4
    enable_auto_transcribe: bool = False
    temperature: float = 0.7
    top_k: int = 50
    max_length: int = 8192  # total LLM length, prompt included, as the reference
    max_new_tokens: int | None = None  # cap on generated audio ids (tests keep it small)
    max_batch_rows: int = 16  # KV-cache rows in one decode step of a variant's loop
    kv_cache_bytes: int = 4 * 2**30  # KV budget of a variant's running batch (worst case)


@dataclass(frozen=True)
class PromptFeatures:
    """Everything the LLM prompt and the vocoder need from one prompt audio."""

    key: str
    tokens: AudioTokens
    prompt_mel: torch.Tensor  # (1, T, 80) float32 at 50 Hz
    spk_emb: torch.Tensor  # (1, 192) float32
    cache: PromptCacheResult = "none"  # how they were found: reported per request (X-Step-Audio-Cache)


@dataclass(frozen=True)
class PreparedPrompt:
    """One LLM prompt ready to generate from, the prompt audio's features, and the transcript used."""

    pair: prompts.PromptPair
    features: PromptFeatures
    transcript: str | None


@dataclass
class _ChainRun:
    """One request's chain: what it runs with, and every output so far with its label."""

    llm: Step1ForCausalLM
    request: CloneRequest | EditRequest
    seed: int
    timings: dict[str, float]
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


def _raise_if_cancelled(cancel: CancelToken | None) -> None:
    if cancel is not None and cancel.is_set():
        raise RequestCancelledError("the client went away; its work was stopped")


def prompt_cache_fingerprint(tokenizer_fingerprint: str, frontend_fp: str) -> str:
    """The fingerprint of prompt records: the tokenizer's and the prompt frontend's, and the layout.

    Any change to the tokenizer files or settings, ``campplus.onnx`` or the mel config makes old
    records misses (then overwritten), so new weights never get stale tokens or features.
    """
    text = f"prompt-record-v{PROMPT_RECORD_VERSION}\0{tokenizer_fingerprint}\0{frontend_fp}"
    return hashlib.sha256(text.encode()).hexdigest()


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


def expected_samples(n_codes: int) -> int:
    """Samples token2wav makes from ``n_codes`` mixed codes (padded to whole groups)."""
    return -(-n_codes // CODES_PER_GROUP) * SAMPLES_PER_GROUP


@contextmanager
def _renamed_param(old: str, new: str) -> Iterator[None]:
    """A stage's error about ``old`` names the request field ``new`` (the clone's audio is its prompt)."""
    try:
        yield
    except InvalidInputError as exc:
        if exc.param == old:
            exc.param = new
        raise


@lru_cache(maxsize=1)
def _read_default_voice(directory: Path) -> tuple[AudioInput, str]:
    samples, sr = sf.read(directory / "voice.wav", dtype="float32", always_2d=True)
    transcript = (directory / "transcript.txt").read_text(encoding="utf-8").strip()
    return AudioInput(np.ascontiguousarray(samples.T), int(sr)), transcript


def load_default_voice(directory: Path = DEFAULT_VOICE_DIR) -> tuple[AudioInput, str]:
    """The shipped default voice: its clip ``(1, n)`` at 22.05 kHz and its transcript (a fresh copy)."""
    audio, transcript = _read_default_voice(directory)
    return AudioInput(audio.samples.copy(), audio.sample_rate), transcript


class StepAudioEngine:
    """Clone and edit requests on loaded stages; thread-safe for the service's workers.

    Parts (all already loaded): ``tokenizer`` (StepAudioTokenizer), ``llms`` (variant name ->
    Step1ForCausalLM), ``text_tokenizer`` (the LLM's text tokenizer), ``token2wav`` (the
    vocoder), ``speaker_encoder`` (CAM++), ``cache`` (the TokenCache of prompt records, whose
    fingerprint is ``prompt_cache_fingerprint`` of these stages, or None), ``transcriber``
    (Whisper, or None when auto-transcription is off).
    """

    def __init__(
        self,
        *,
        tokenizer: StepAudioTokenizer,
        llms: Mapping[str, Step1ForCausalLM],
        text_tokenizer: StepTextTokenizer,
        token2wav: Token2Wav,
        speaker_encoder: SpeakerEncoder,
        cache: TokenCache | None = None,
        transcriber: Transcriber | None = None,
        options: EngineOptions | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not llms:
            raise ValueError("the engine needs at least one LLM variant")
        self.tokenizer = tokenizer
        self.llms = dict(llms)
        self.text_tokenizer = text_tokenizer
        self.token2wav = token2wav
        self.speaker_encoder = speaker_encoder
        self.cache = cache
        self.transcriber = transcriber
        self.options = options or EngineOptions()
        self.device = torch.device(device)
        # the tokenizer and the prompt frontend keep no per-call state; each LLM variant has one
        # decode loop that batches every request generating on it (continuous batching), and the
        # vocoder runs one chunk or utterance at a time, which bounds its activation memory
        opts = self.options
        self.schedulers = {
            name: Scheduler(llm, max_batch_rows=opts.max_batch_rows, kv_budget_bytes=opts.kv_cache_bytes, variant=name)
            for name, llm in self.llms.items()
        }
        self._vocoder_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.generations = 0  # LLM generations run since start (every clone and edit iteration)

    def set_observer(self, observer: SchedulerObserver | None) -> None:
        """Metrics hooks for every variant's decode loop (batch size per step, queue wait, tokens)."""
        for scheduler in self.schedulers.values():
            scheduler.observer = observer

    def close(self) -> None:
        """Stop the decode loops (waiting and running generations end with NotReadyError)."""
        for scheduler in self.schedulers.values():
            scheduler.close()

    # --- catalogue ------------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return list(self.llms)

    @property
    def auto_transcribe(self) -> bool:
        return self.options.enable_auto_transcribe and self.transcriber is not None

    def tags(self) -> dict[str, list[str]]:
        """Edit modes with their allowed ``edit_info`` values, and the paralinguistic tags."""
        return prompts.catalogue()

    def default_voice(self) -> tuple[AudioInput, str]:
        return load_default_voice()

    # --- cache ----------------------------------------------------------------------------
    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False}
        return {"enabled": True, **self.cache.stats().as_dict()}

    def clear_cache(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    def prepare_voice(self, audio: AudioInput) -> None:
        """Tokenise a voice's clip and cache its prompt features now (voice registration)."""
        self._check_audio(audio, "prompt_audio")
        self._prompt_features(audio.samples, audio.sample_rate, "prompt_audio")

    def check_steps(self, steps: Sequence[EditStep]) -> tuple[EditStep, ...]:
        """Every step against the catalogue and the iteration limit (``engine.chains.check_step``)."""
        return tuple(check_step(step, max_edit_iter=self.options.max_edit_iter) for step in steps)

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
        timings: dict[str, float] = {}
        llm = self._llm(request.variant)
        self._check_controls(request.intensity, request.speed)
        steps = self.check_steps(request.edits)
        seed = self._seed(request.seed)
        run = _ChainRun(llm, request, seed, timings, sink=sink, cancel=cancel)
        with count_lookups() as lookups:
            prepared = self.prepare_clone(request, timings)
            run.transcript = prepared.transcript
            self._output(run, prepared, seed, IterationLabel(0, "clone", None, 1, seed), last=not steps)
            self._run_steps(run, steps, None, request.text)
        return self._result(run, prepared.transcript, lookups, start)

    def edit(
        self, request: EditRequest, *, sink: AudioSink | None = None, cancel: CancelToken | None = None
    ) -> SynthesisResult:
        """Edit ``request.audio`` (``n_edit_iter`` times, each on the previous output), then ``request.edits``.

        ``sink`` and ``cancel`` as for ``clone``: only the last iteration of the last step streams.
        """
        start = time.perf_counter()
        timings: dict[str, float] = {}
        llm = self._llm(request.variant)
        self._check_controls(request.intensity, request.speed)
        steps = self.check_steps((request.first_step, *request.edits))
        seed = self._seed(request.seed)
        run = _ChainRun(llm, request, seed, timings, sink=sink, cancel=cancel)
        with count_lookups() as lookups:
            prepared = self.prepare_edit(request, timings, steps=steps)
            run.transcript = prepared.transcript
            self._run_steps(run, steps, prepared, prepared.transcript)
        return self._result(run, prepared.transcript, lookups, start)

    def _run_steps(
        self,
        run: _ChainRun,
        steps: Sequence[EditStep],
        first_prompt: PreparedPrompt | None,
        audio_text: str | None,
    ) -> None:
        """Run the edit steps in order, each on ``run``'s last output, with the transcript carried along.

        The last step is a call of its own so that a streaming runner can run the others as here
        and stream only the last one's audio.
        """
        if not steps:
            return
        *head, last = steps  # step numbers start at 1; step 0 is the clone or the given audio
        for k, step in enumerate(head):
            audio_text, finished = self._run_step(run, step, k + 1, first_prompt if k == 0 else None, audio_text)
            if not finished:
                return
        self._run_step(run, last, len(head) + 1, None if head else first_prompt, audio_text, last=True)

    def _run_step(
        self,
        run: _ChainRun,
        step: EditStep,
        step_no: int,
        prompt: PreparedPrompt | None,
        audio_text: str | None,
        *,
        last: bool = False,
    ) -> tuple[str | None, bool]:
        """One step's iterations; returns the transcript of its output and whether it ran in full.

        Without ``prompt`` (every step but an edit request's first) the step edits the previous
        output after the 16-bit PCM round trip the reference's saved WAV implies.
        """
        for iteration in range(step.n_edit_iter):
            if prompt is None:
                try:
                    prompt = self._edit_prompt(
                        pcm16_round_trip(run.outputs[-1])[None],
                        VOCODER_SR,
                        mode=step.mode,
                        edit_info=step.edit_info,
                        audio_text=audio_text,
                        target_text=step.text,
                        timings=run.timings,
                    )
                except AudioError as exc:  # our own output is empty/too short to edit again
                    logger.warning(
                        "step %d iteration %d: the previous output cannot be edited (%s); returning %d output(s)",
                        step_no,
                        iteration + 1,
                        exc,
                        run.generations,
                    )
                    return audio_text, False
            gen_seed = generation_seed(run.seed, run.generations)
            label = IterationLabel(step_no, step.mode, step.edit_info, iteration + 1, gen_seed)
            self._output(run, prompt, gen_seed, label, last=last and iteration == step.n_edit_iter - 1)
            prompt = None
            if step.text is not None:  # the next edit hears the text this one produced
                audio_text = step.text
        return audio_text, True

    def _output(self, run: _ChainRun, prompt: PreparedPrompt, seed: int, label: IterationLabel, *, last: bool) -> None:
        """One generation and its audio, appended to ``run``; the request's last one streams to
        ``run.sink`` when there is one."""
        request = run.request
        run.prompt_cache.append(prompt.features.cache)
        if last and run.sink is not None:
            info = StreamInfo(
                run.seed,
                request.intensity,
                VOCODER_SR,
                run.generations + 1,
                run.transcript,
                prompt_cache=tuple(run.prompt_cache),
            )
            codes, wav = self._generate_streamed(
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
            codes = self._generate(
                request.variant,
                prompt.pair,
                intensity=request.intensity,
                seed=seed,
                timings=run.timings,
                cancel=run.cancel,
            )
            wav = self._vocode(codes, prompt.features, seed, run.timings)
        run.codes = codes
        run.outputs.append(wav)
        run.labels.append(label)

    def _result(self, run: _ChainRun, transcript: str | None, lookups: LookupTally, start: float) -> SynthesisResult:
        timings = run.timings
        iterations = [self._apply_speed(wav, run.request.speed, timings) for wav in run.outputs]
        timings["total"] = time.perf_counter() - start
        return SynthesisResult(
            audio=iterations[-1],
            sample_rate=VOCODER_SR,
            seed=run.seed,
            intensity=run.request.intensity,
            iterations=iterations,
            labels=run.labels,
            transcript=transcript,
            n_audio_tokens=int(run.codes.shape[0]),
            timings=timings,
            cache_hits=lookups.hits,
            cache_misses=lookups.misses,
            prompt_cache=list(run.prompt_cache),
        )

    # --- prompts --------------------------------------------------------------------------
    def prepare_clone(self, request: CloneRequest, timings: dict[str, float] | None = None) -> PreparedPrompt:
        """Validate a clone request and build its LLM prompt (transcribing the prompt if needed).

        The speaker name hashes the transcript and the raw decoded samples, as the reference does.
        """
        timings = {} if timings is None else timings
        if not (request.text or "").strip():
            raise InvalidInputError("the text to speak is empty", param="text")
        audio = request.prompt_audio
        self._check_audio(audio, "prompt_audio")
        prompt_text = self._transcript(request.prompt_text, audio, "prompt_text", timings)
        features = self._prompt_features(audio.samples, audio.sample_rate, "prompt_audio", timings)
        with _renamed_param("audio", "prompt_audio"):
            pair = prompts.build_clone_prompt(
                self.text_tokenizer,
                speaker=prompts.clone_speaker_id(prompt_text, audio.samples),
                prompt_text=prompt_text,
                audio_token_str=features.tokens.token_str,
                target_text=request.text,
            )
        return PreparedPrompt(pair, features, prompt_text)

    def prepare_edit(
        self,
        request: EditRequest,
        timings: dict[str, float] | None = None,
        *,
        steps: Sequence[EditStep] | None = None,
    ) -> PreparedPrompt:
        """Build an edit request's first prompt, transcribing the audio if a step of its chain needs it.

        ``steps``: the request's steps as ``check_steps`` returned them (checked here when None).
        """
        timings = {} if timings is None else timings
        if steps is None:
            steps = self.check_steps((request.first_step, *request.edits))
        step = steps[0]
        audio = request.audio
        self._check_audio(audio, "audio")
        audio_text: str | None
        if needs_transcript(steps):
            audio_text = self._transcript(request.audio_text, audio, "audio_text", timings)
        else:
            audio_text = (request.audio_text or "").strip() or None
        return self._edit_prompt(
            audio.samples,
            audio.sample_rate,
            mode=step.mode,
            edit_info=step.edit_info,
            audio_text=audio_text,
            target_text=step.text,
            timings=timings,
        )

    def _edit_prompt(
        self,
        samples: np.ndarray,
        sample_rate: int,
        *,
        mode: str,
        edit_info: str | None,
        audio_text: str | None,
        target_text: str | None,
        timings: dict[str, float],
    ) -> PreparedPrompt:
        features = self._prompt_features(samples, sample_rate, "audio", timings)
        pair = prompts.build_edit_prompt(
            self.text_tokenizer,
            mode=mode,
            audio_token_str=features.tokens.token_str,
            edit_info=edit_info,
            audio_text=audio_text,
            text=target_text,
        )
        return PreparedPrompt(pair, features, audio_text)

    # --- validation -----------------------------------------------------------------------
    def _llm(self, variant: str) -> Step1ForCausalLM:
        if variant not in self.llms:
            raise InvalidInputError(
                f"model variant {variant!r} is not loaded; loaded variants: {', '.join(self.llms)}",
                param="variant",
            )
        return self.llms[variant]

    @staticmethod
    def _check_controls(intensity: float, speed: float) -> None:
        if not MIN_INTENSITY <= intensity <= MAX_INTENSITY:
            raise InvalidInputError(
                f"intensity must be between {MIN_INTENSITY} and {MAX_INTENSITY}, got {intensity}",
                param="intensity",
            )
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidInputError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}", param="speed")

    def _check_audio(self, audio: AudioInput, param: str) -> None:
        if audio.sample_rate <= 0 or audio.samples.size == 0:
            raise AudioError("the audio holds no samples", param=param)
        if audio.seconds > self.options.max_audio_seconds:
            raise TooLargeError(
                f"the audio is {audio.seconds:.1f}s long; the limit is {self.options.max_audio_seconds:g}s",
                param=param,
            )

    def _transcript(self, given: str | None, audio: AudioInput, param: str, timings: dict[str, float]) -> str:
        """The given transcript (verbatim, as the reference uses it), or Whisper's when it is missing
        and auto-transcription is on."""
        if given is not None and given.strip():
            return given
        if not self.auto_transcribe or self.transcriber is None:
            raise InvalidInputError(
                f"{param} (the transcript of the audio) is required: auto-transcription is off", param=param
            )
        begin = time.perf_counter()
        text = self.transcriber.transcribe(audio.samples, audio.sample_rate).strip()
        timings["transcribe"] = timings.get("transcribe", 0.0) + time.perf_counter() - begin
        if not text:
            raise InvalidInputError(f"no speech was recognised in the audio; give {param} explicitly", param=param)
        logger.info("Auto-transcribed %s: %r", param, text)
        return text

    @staticmethod
    def _seed(seed: int | None) -> int:
        if seed is None:
            return secrets.randbelow(MAX_SEED + 1)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidInputError(f"seed must be between 0 and {MAX_SEED}, got {seed}", param="seed")
        return int(seed)

    # --- stages ---------------------------------------------------------------------------
    def _prompt_features(
        self, samples: np.ndarray, sample_rate: int, param: str, timings: dict[str, float] | None = None
    ) -> PromptFeatures:
        """Tokens, mel and speaker embedding of one prompt: one cache record, looked up once.

        The content key is hashed once here and a hit reads one file; a miss computes all three
        and puts them as one record. Unusable audio raises before the cache is touched. The
        log lines (``[FunASR Cache HIT|MISS] hash=…``) are the ones operators grep for.
        """
        begin = time.perf_counter()
        try:
            wav = check_prompt(prepare_prompt(samples, sample_rate), sample_rate)
            key = content_key(wav, sample_rate)
            record = self.cache.get(key, names=PROMPT_RECORD) if self.cache is not None else None
            cache: PromptCacheResult = "none" if self.cache is None else "hit" if record is not None else "miss"
            if record is not None:
                logger.info("[FunASR Cache HIT] hash=%s…", key[:8])
                tokens = AudioTokens(record["vq02"], record["vq06"])
                prompt_mel = torch.from_numpy(np.asarray(record["prompt_mel"], dtype=np.float32))
                spk_emb = torch.from_numpy(np.asarray(record["spk_emb"], dtype=np.float32))
            else:
                if self.cache is not None:
                    logger.info("[FunASR Cache MISS] hash=%s…", key[:8])
                start = time.perf_counter()
                with torch.inference_mode():
                    tokens = self.tokenizer.wav2token(wav, sample_rate)
                    features = prompt_features(wav, sample_rate, self.speaker_encoder)
                prompt_mel, spk_emb = features.prompt_mel.float().cpu(), features.spk_emb.float().cpu()
                if self.cache is not None:
                    arrays = {"vq02": tokens.vq02, "vq06": tokens.vq06, "prompt_mel": prompt_mel, "spk_emb": spk_emb}
                    self.cache.put(key, arrays, compute_seconds=time.perf_counter() - start)
        except AudioError as exc:
            exc.param = exc.param or param
            raise
        if timings is not None:
            timings["prompt_features"] = timings.get("prompt_features", 0.0) + time.perf_counter() - begin
        return PromptFeatures(key, tokens, prompt_mel, spk_emb, cache)

    def _submit_generation(
        self,
        variant: str,
        pair: prompts.PromptPair,
        *,
        intensity: float,
        seed: int,
        cancel: CancelToken | None,
    ) -> GenerationHandle:
        """Queue one prompt on its variant's decode loop; ``cancel`` stops it before its next step."""
        _raise_if_cancelled(cancel)
        opts = self.options
        handle = self.schedulers[variant].submit(
            pair,
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

    def _generate(
        self,
        variant: str,
        pair: prompts.PromptPair,
        *,
        intensity: float,
        seed: int,
        timings: dict[str, float],
        cancel: CancelToken | None = None,
    ) -> np.ndarray:
        """Mixed audio codes of one prompt, generated in the variant's running batch."""
        begin = time.perf_counter()
        handle = self._submit_generation(variant, pair, intensity=intensity, seed=seed, cancel=cancel)
        result = handle.result()
        timings["llm"] = timings.get("llm", 0.0) + time.perf_counter() - begin
        if result.cancelled:
            raise RequestCancelledError("the client went away during generation")
        return np.asarray(result.codes, dtype=np.int64)

    def _generate_streamed(
        self,
        variant: str,
        prepared: PreparedPrompt,
        *,
        intensity: float,
        seed: int,
        speed: float,
        timings: dict[str, float],
        sink: AudioSink,
        info: StreamInfo,
        cancel: CancelToken | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The decode loop samples while this thread feeds the streaming vocoder with its ids.

        ``sink.start(info)`` is called once the decode loop has accepted the prompt: the prompt's
        own checks (its length) fail before the stream starts, so the client gets their 4xx.

        The vocoder session's output does not depend on how the codes are split across feeds,
        so the streamed audio is the same whatever the thread timing. With ``speed`` != 1 the
        pieces are held back and the stretched whole is sent at the end (a phase-vocoder
        stretch needs the whole signal).
        """
        pieces: list[np.ndarray] = []
        begin = time.perf_counter()
        handle = self._submit_generation(variant, prepared.pair, intensity=intensity, seed=seed, cancel=cancel)
        sink.start(info)

        def emit(new: list[np.ndarray]) -> None:
            for piece in new:
                if piece.size:
                    if not pieces:  # how far the LLM was when the first audio left
                        timings["first_audio_ids"] = float(handle.steps_run)
                        timings["first_audio"] = time.perf_counter() - begin
                    pieces.append(piece)
                    if speed == 1.0:
                        sink.put(piece)

        features = prepared.features
        vocode_s = 0.0
        try:
            with self.token2wav.stream(
                np.asarray(features.tokens.prompt_codes), features.prompt_mel, features.spk_emb, seed=seed
            ) as session:
                stopped = False
                for token in handle.ids():
                    _raise_if_cancelled(cancel)  # also when the LLM had already finished
                    if stopped or not AUDIO_ID_OFFSET <= token < AUDIO_ID_END:
                        stopped = stopped or token in STOP_IDS  # the reference's postprocess: cut at a stop id
                        continue
                    t = time.perf_counter()
                    with self._vocoder_lock, torch.inference_mode():
                        emit(session.feed([token - AUDIO_ID_OFFSET]))
                    vocode_s += time.perf_counter() - t
                result = handle.result()
                _raise_if_cancelled(cancel)
                t = time.perf_counter()
                with self._vocoder_lock, torch.inference_mode():
                    emit(session.finish())
                vocode_s += time.perf_counter() - t
        finally:
            handle.cancel()  # a no-op when it is done; stops the LLM if the vocoder failed
        wav = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        if speed != 1.0 and wav.size:
            sink.put(self._apply_speed(wav, speed, timings))
        timings["generated_ids"] = float(handle.steps_run)
        timings["llm"] = timings.get("llm", 0.0) + time.perf_counter() - begin - vocode_s
        timings["vocoder"] = timings.get("vocoder", 0.0) + vocode_s
        return np.asarray(result.codes, dtype=np.int64), wav

    def _vocode(self, codes: np.ndarray, features: PromptFeatures, seed: int, timings: dict[str, float]) -> np.ndarray:
        if codes.size == 0:
            logger.warning("the LLM produced no audio ids; returning empty audio")
            return np.zeros(0, dtype=np.float32)
        begin = time.perf_counter()
        with self._vocoder_lock, torch.inference_mode():
            wav = self.token2wav.token2wav(
                torch.from_numpy(codes),
                torch.as_tensor(np.asarray(features.tokens.prompt_codes), dtype=torch.long),
                features.prompt_mel,
                features.spk_emb,
                seed=seed,
            )
        timings["vocoder"] = timings.get("vocoder", 0.0) + time.perf_counter() - begin
        return wav.reshape(-1).float().cpu().numpy()

    @staticmethod
    def _apply_speed(wav: np.ndarray, speed: float, timings: dict[str, float]) -> np.ndarray:
        if speed == 1.0:
            return wav
        begin = time.perf_counter()
        out = change_speed(wav, speed)
        timings["speed"] = timings.get("speed", 0.0) + time.perf_counter() - begin
        return out


def build_engine(
    settings: Settings, *, registry: model_loader.ModelRegistry | None = None, max_new_tokens: int | None = None
) -> StepAudioEngine:
    """Load every stage named by ``settings`` (blocking; minutes for official weights).

    Downloads missing bundle parts when ``--model-source`` allows it, resolves device and dtype,
    and loads through ``registry`` (a new ``model_loader.ModelRegistry`` when None), so engines
    built on one registry share every loaded component. ``max_new_tokens`` caps the audio ids
    per generation (default: no cap beyond the reference's total length; the demo's random-weight
    bundle gets ``DEMO_MAX_NEW_TOKENS``). Failures raise ``errors.ModelLoadError``.
    """
    if registry is None:
        model_loader.fetch_bundle(
            settings.model_path, settings.model_source, settings.tokenizer_model_id, settings.variants
        )
        device = model_loader.resolve_device(settings.device)
        bundle = model_loader.resolve_bundle(
            settings.model_path,
            settings.tokenizer_model_id,
            awq_path=settings.awq_model_path,
            bnb_path=settings.bnb_model_path,
        )
        model_loader.verify_bundle(bundle, settings.funasr_model_id, settings.variants)
        registry = model_loader.ModelRegistry(bundle, device, model_loader.resolve_dtype(settings.torch_dtype, device))
    if max_new_tokens is None and settings.demo:
        max_new_tokens = DEMO_MAX_NEW_TOKENS
    tokenizer = registry.get_tokenizer(
        settings.funasr_model_id, dither=settings.funasr_dither, onnx_threads=settings.onnx_threads
    )
    vocoder = registry.get_vocoder(settings.onnx_threads)
    cache = registry.get_prompt_cache(
        settings.cache_dir,
        settings.cache_max_bytes,
        prompt_cache_fingerprint(tokenizer.fingerprint, frontend_fingerprint(vocoder.speaker_encoder)),
    )
    llms = registry.load_llms(dict.fromkeys(settings.variants))  # de-duplicated, in order
    transcriber = None
    if settings.enable_auto_transcribe:
        from engine.transcribe import make_transcriber

        def load_whisper() -> Transcriber:
            whisper = make_transcriber(
                settings.asr_backend,
                settings.whisper_model,
                device=str(registry.device),
                download_root=settings.cache_dir / "whisper",
            )
            whisper.load()  # at startup, so the first request does not pay for it
            return whisper

        key = f"whisper:{settings.asr_backend}:{settings.whisper_model}"
        transcriber = registry.get_or_load(key, load_whisper)
    options = EngineOptions(
        max_audio_seconds=settings.max_audio_seconds,
        max_edit_iter=settings.max_edit_iter,
        enable_auto_transcribe=settings.enable_auto_transcribe,
        max_new_tokens=max_new_tokens,
        max_batch_rows=settings.llm_max_batch_rows,
        kv_cache_bytes=settings.llm_kv_cache_mib * 2**20,
    )
    return StepAudioEngine(
        tokenizer=tokenizer,
        llms=llms,
        text_tokenizer=registry.get_text_tokenizer(),
        token2wav=vocoder.token2wav,
        speaker_encoder=vocoder.speaker_encoder,
        cache=cache,
        transcriber=transcriber,
        options=options,
        device=registry.device,
    )
