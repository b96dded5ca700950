"""The engine: clone and edit composed from the three stages (model-spec §5, DESIGN §2).

    clone: prompt audio ─► prepare_prompt ─► wav2token + prompt mel + speaker embedding
               (cached together under the audio's content key)
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
from engine.types import (
    MAX_SEED,
    MAX_SPEED,
    MIN_SPEED,
    AudioInput,
    CloneRequest,
    EditRequest,
    EditStep,
    IterationLabel,
    SynthesisResult,
)
from errors import InvalidInputError, TooLargeError
from llm import prompts
from llm.generate import MAX_INTENSITY, MIN_INTENSITY, generate_audio_ids
from token_cache import LookupTally, content_key, count_lookups
from vocoder.frontend import prompt_features

if TYPE_CHECKING:
    from engine.transcribe import WhisperTranscriber
    from llm.model import Step1ForCausalLM
    from llm.text_tokenizer import StepTextTokenizer
    from settings import Settings
    from token_cache import TokenCache
    from tokenizer import AudioTokens, StepAudioTokenizer
    from vocoder.frontend import SpeakerEncoder
    from vocoder.token2wav import Token2Wav

logger = logging.getLogger(__name__)

SAMPLES_PER_MEL_FRAME = 480  # HiFT: 24 kHz / 50 Hz mel
MEL_FRAMES_PER_TOKEN_FRAME = 2  # the flow upsamples 25 Hz dual-codebook frames to 50 Hz
SAMPLES_PER_GROUP = FRAMES_PER_GROUP * MEL_FRAMES_PER_TOKEN_FRAME * SAMPLES_PER_MEL_FRAME  # 2880


DEFAULT_VOICE_DIR = Path(__file__).resolve().parent / "default_voice"

DEMO_MAX_NEW_TOKENS = 250  # random weights rarely sample EOS: cap demo generations at 6 s of audio


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


@dataclass(frozen=True)
class PromptFeatures:
    """Everything the LLM prompt and the vocoder need from one prompt audio."""

    key: str
    tokens: AudioTokens
    prompt_mel: torch.Tensor  # (1, T, 80) float32 at 50 Hz
    spk_emb: torch.Tensor  # (1, 192) float32


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

    @property
    def generations(self) -> int:
        return len(self.outputs)


def pcm16_round_trip(wav: np.ndarray) -> np.ndarray:
    """The reference saves each edit iteration as a 16-bit WAV (soundfile) and reloads it; same in memory."""
    return (to_pcm16(wav) / np.float32(PCM16_SCALE)).astype(np.float32)


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
    vocoder), ``speaker_encoder`` (CAM++), ``cache`` (the TokenCache the tokenizer also writes,
    or None), ``transcriber`` (Whisper, or None when auto-transcription is off).
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
        transcriber: WhisperTranscriber | None = None,
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
        # the tokenizer and the prompt frontend keep no per-call state; the LLM and the vocoder
        # run one request at a time each, which bounds (GPU) memory to one activation set per stage
        self._vocoder_lock = threading.Lock()
        self._llm_locks = {name: threading.Lock() for name in self.llms}
        self._count_lock = threading.Lock()
        self.generations = 0  # LLM generations run since start (every clone and edit iteration)

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
    def clone(self, request: CloneRequest) -> SynthesisResult:
        """Speak ``request.text`` in the voice of ``request.prompt_audio``, then run ``request.edits``."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        llm = self._llm(request.variant)
        self._check_controls(request.intensity, request.speed)
        steps = self.check_steps(request.edits)
        seed = self._seed(request.seed)
        run = _ChainRun(llm, request, seed, timings)
        with count_lookups() as lookups:
            prepared = self.prepare_clone(request, timings)
            codes = self._generate(
                llm, request.variant, prepared.pair, intensity=request.intensity, seed=seed, timings=timings
            )
            run.outputs.append(self._vocode(codes, prepared.features, seed, timings))
            run.labels.append(IterationLabel(step=0, mode="clone", edit_info=None, iteration=1, seed=seed))
            run.codes = codes
            self._run_steps(run, steps, None, request.text)
        return self._result(run, prepared.transcript, lookups, start)

    def edit(self, request: EditRequest) -> SynthesisResult:
        """Edit ``request.audio`` (``n_edit_iter`` times, each on the previous output), then ``request.edits``."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        llm = self._llm(request.variant)
        self._check_controls(request.intensity, request.speed)
        steps = self.check_steps((request.first_step, *request.edits))
        seed = self._seed(request.seed)
        run = _ChainRun(llm, request, seed, timings)
        with count_lookups() as lookups:
            prepared = self.prepare_edit(request, timings, steps=steps)
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
        self._run_step(run, last, len(head) + 1, None if head else first_prompt, audio_text)

    def _run_step(
        self,
        run: _ChainRun,
        step: EditStep,
        step_no: int,
        prompt: PreparedPrompt | None,
        audio_text: str | None,
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
            request = run.request
            run.codes = self._generate(
                run.llm, request.variant, prompt.pair, intensity=request.intensity, seed=gen_seed, timings=run.timings
            )
            run.outputs.append(self._vocode(run.codes, prompt.features, gen_seed, run.timings))
            run.labels.append(IterationLabel(step_no, step.mode, step.edit_info, iteration + 1, gen_seed))
            prompt = None
            if step.text is not None:  # the next edit hears the text this one produced
                audio_text = step.text
        return audio_text, True

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
        if not self.auto_transcribe:
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
        """Tokens, mel and speaker embedding of one prompt; each from the cache when it has them."""
        begin = time.perf_counter()
        wav = prepare_prompt(samples, sample_rate)
        key = content_key(wav, sample_rate)
        try:
            with torch.inference_mode():
                tokens = self.tokenizer.wav2token(wav, sample_rate)
                features = prompt_features(wav, sample_rate, self.speaker_encoder, cache=self.cache, key=key)
        except AudioError as exc:
            exc.param = exc.param or param
            raise
        if timings is not None:
            timings["prompt_features"] = timings.get("prompt_features", 0.0) + time.perf_counter() - begin
        return PromptFeatures(key, tokens, features.prompt_mel.float(), features.spk_emb.float())

    def _generate(
        self,
        llm: Step1ForCausalLM,
        variant: str,
        pair: prompts.PromptPair,
        *,
        intensity: float,
        seed: int,
        timings: dict[str, float],
    ) -> np.ndarray:
        begin = time.perf_counter()
        with self._llm_locks[variant], torch.inference_mode():
            codes = generate_audio_ids(
                llm,
                [pair],
                intensity=intensity,
                seed=seed,
                temperature=self.options.temperature,
                top_k=self.options.top_k,
                max_length=self.options.max_length,
                max_new_tokens=self.options.max_new_tokens,
            )[0]
            with self._count_lock:
                self.generations += 1
        timings["llm"] = timings.get("llm", 0.0) + time.perf_counter() - begin
        return np.asarray(codes, dtype=np.int64)

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
        settings.funasr_model_id,
        dither=settings.funasr_dither,
        onnx_threads=settings.onnx_threads,
        cache_dir=settings.cache_dir,
        cache_max_bytes=settings.cache_max_bytes,
    )
    vocoder = registry.get_vocoder(settings.onnx_threads)
    llms = registry.load_llms(dict.fromkeys(settings.variants))  # de-duplicated, in order
    transcriber = None
    if settings.enable_auto_transcribe:
        from engine.transcribe import WhisperTranscriber

        def load_whisper() -> WhisperTranscriber:
            whisper = WhisperTranscriber(
                settings.whisper_model, device=str(registry.device), download_root=settings.cache_dir / "whisper"
            )
            whisper.load()  # at startup, so the first request does not pay for it
            return whisper

        transcriber = registry.get_or_load(f"whisper:{settings.whisper_model}", load_whisper)
    options = EngineOptions(
        max_audio_seconds=settings.max_audio_seconds,
        max_edit_iter=settings.max_edit_iter,
        enable_auto_transcribe=settings.enable_auto_transcribe,
        max_new_tokens=max_new_tokens,
    )
    return StepAudioEngine(
        tokenizer=tokenizer,
        llms=llms,
        text_tokenizer=registry.get_text_tokenizer(),
        token2wav=vocoder.token2wav,
        speaker_encoder=vocoder.speaker_encoder,
        cache=tokenizer.cache,
        transcriber=transcriber,
        options=options,
        device=registry.device,
    )
