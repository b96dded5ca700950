"""Requests to LLM prompts: the prompt audio's features (one cache record) and the prompt's ids.

``PromptPreparer`` owns everything a prompt needs before generation: the audio tokenizer
(wav2token), the prompt frontend (prompt mel, CAM++ speaker embedding), the token cache, the
LLM's text tokenizer and Whisper. It keeps no per-request state, so the service's workers share
one. Each prompt audio is one cache record under its content key: the key is hashed once and a
hit reads one file; a miss computes the tokens, mel and embedding and puts them as one record
(``[FunASR Cache HIT|MISS] hash=…``, the log lines operators grep for).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from audio import AudioError, prepare_prompt
from engine.chains import needs_transcript
from engine.types import AudioInput, CloneRequest, EditRequest, EditStep, PromptCacheResult, Timings
from errors import InvalidInputError, TooLargeError
from llm import prompts
from token_cache import content_key
from tokenizer import AudioTokens, check_prompt
from vocoder.frontend import prompt_features

if TYPE_CHECKING:
    from engine.transcribe import Transcriber
    from llm.text_tokenizer import StepTextTokenizer
    from shared_cache import RecordCache
    from tokenizer import StepAudioTokenizer
    from vocoder.frontend import SpeakerEncoder

logger = logging.getLogger(__name__)

PROMPT_RECORD = ("vq02", "vq06", "prompt_mel", "spk_emb")  # the arrays of a prompt's cache record
PROMPT_RECORD_VERSION = 1  # bump when the record's arrays or their meaning change


def prompt_cache_fingerprint(tokenizer_fingerprint: str, frontend_fp: str) -> str:
    """The fingerprint of prompt records: the tokenizer's and the prompt frontend's, and the layout.

    Any change to the tokenizer files or settings, ``campplus.onnx`` or the mel config makes old
    records misses (then overwritten), so new weights never get stale tokens or features.
    """
    text = f"prompt-record-v{PROMPT_RECORD_VERSION}\0{tokenizer_fingerprint}\0{frontend_fp}"
    return hashlib.sha256(text.encode()).hexdigest()


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


@dataclass(frozen=True)
class CloneVoice:
    """The speaker side of a clone prompt: the prompt audio's features, its transcript, the speaker id."""

    features: PromptFeatures
    transcript: str
    speaker: str


@contextmanager
def _renamed_param(old: str, new: str) -> Iterator[None]:
    """A stage's error about ``old`` names the request field ``new`` (the clone's audio is its prompt)."""
    try:
        yield
    except InvalidInputError as exc:
        if exc.param == old:
            exc.param = new
        raise


class PromptPreparer:
    """Builds clone and edit prompts; thread-safe (the stages keep no per-call state)."""

    def __init__(
        self,
        *,
        tokenizer: StepAudioTokenizer,
        text_tokenizer: StepTextTokenizer,
        speaker_encoder: SpeakerEncoder,
        cache: RecordCache | None = None,
        transcriber: Transcriber | None = None,
        max_audio_seconds: float = 30.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_tokenizer = text_tokenizer
        self.speaker_encoder = speaker_encoder
        self.cache = cache
        self.transcriber = transcriber  # None: auto-transcription is off
        self.max_audio_seconds = max_audio_seconds

    # --- prompts ------------------------------------------------------------------------
    def clone(self, request: CloneRequest, timings: Timings | None = None) -> PreparedPrompt:
        """A clone request's prompt for its whole text (``voice`` then ``clone_prompt``)."""
        if not (request.text or "").strip():
            raise InvalidInputError("the text to speak is empty", param="text")
        return self.clone_prompt(self.voice(request, timings), request.text)

    def voice(self, request: CloneRequest, timings: Timings | None = None) -> CloneVoice:
        """The speaker side of a clone prompt, prepared once for every segment of the text.

        The prompt audio's transcript comes from the request or from Whisper; the speaker name
        hashes the transcript and the raw decoded samples, as the reference does.
        """
        timings = timings or Timings()
        audio = request.prompt_audio
        self.check_audio(audio, "prompt_audio")
        prompt_text = self.transcript(request.prompt_text, audio, "prompt_text", timings)
        features = self.features(audio, "prompt_audio", timings)
        return CloneVoice(features, prompt_text, prompts.clone_speaker_id(prompt_text, audio.samples))

    def clone_prompt(self, voice: CloneVoice, text: str) -> PreparedPrompt:
        """The clone prompt that speaks ``text`` in ``voice``."""
        with _renamed_param("audio", "prompt_audio"):
            pair = prompts.build_clone_prompt(
                self.text_tokenizer,
                speaker=voice.speaker,
                prompt_text=voice.transcript,
                audio_token_str=voice.features.tokens.token_str,
                target_text=text,
            )
        return PreparedPrompt(pair, voice.features, voice.transcript)

    def count_tokens(self, text: str) -> int:
        """Text tokens of ``text`` as the LLM reads it (the segment bound counts these)."""
        return len(self.text_tokenizer.sp.encode(text))

    def first_edit(
        self, request: EditRequest, steps: Sequence[EditStep], timings: Timings | None = None
    ) -> PreparedPrompt:
        """An edit request's first prompt; ``steps`` is its checked chain (its own edit first).

        The audio is transcribed when some step of the chain needs its transcript and none was given.
        """
        timings = timings or Timings()
        audio = request.audio
        self.check_audio(audio, "audio")
        audio_text: str | None
        if needs_transcript(steps):
            audio_text = self.transcript(request.audio_text, audio, "audio_text", timings)
        else:
            audio_text = (request.audio_text or "").strip() or None
        return self.edit(audio, steps[0], audio_text, timings)

    def edit(self, audio: AudioInput, step: EditStep, audio_text: str | None, timings: Timings) -> PreparedPrompt:
        """The prompt of one edit of ``audio`` (the audio to edit is the acoustic prompt)."""
        features = self.features(audio, "audio", timings)
        pair = prompts.build_edit_prompt(
            self.text_tokenizer,
            mode=step.mode,
            audio_token_str=features.tokens.token_str,
            edit_info=step.edit_info,
            audio_text=audio_text,
            text=step.text,
        )
        return PreparedPrompt(pair, features, audio_text)

    # --- checks and transcripts -------------------------------------------------------------
    def check_audio(self, audio: AudioInput, param: str) -> None:
        if audio.sample_rate <= 0 or audio.samples.size == 0:
            raise AudioError("the audio holds no samples", param=param)
        if audio.seconds > self.max_audio_seconds:
            raise TooLargeError(
                f"the audio is {audio.seconds:.1f}s long; the limit is {self.max_audio_seconds:g}s", param=param
            )

    def transcript(self, given: str | None, audio: AudioInput, param: str, timings: Timings) -> str:
        """The given transcript (verbatim, as the reference uses it), or Whisper's when it is missing
        and auto-transcription is on."""
        if given is not None and given.strip():
            return given
        if self.transcriber is None:
            raise InvalidInputError(
                f"{param} (the transcript of the audio) is required: auto-transcription is off", param=param
            )
        with timings.measure("transcribe"):
            text = self.transcriber.transcribe(audio.samples, audio.sample_rate).strip()
        if not text:
            raise InvalidInputError(f"no speech was recognised in the audio; give {param} explicitly", param=param)
        logger.info("Auto-transcribed %s: %r", param, text)
        return text

    # --- features and the cache ---------------------------------------------------------------
    def features(self, audio: AudioInput, param: str, timings: Timings | None = None) -> PromptFeatures:
        """Tokens, mel and speaker embedding of one prompt audio: one cache record, looked up once.

        Unusable audio raises (naming ``param``) before the cache is touched.
        """
        timings = timings or Timings()
        with timings.measure("prompt_features"):
            try:
                wav = check_prompt(prepare_prompt(audio.samples, audio.sample_rate), audio.sample_rate)
            except AudioError as exc:
                exc.param = exc.param or param
                raise
            key = content_key(wav, audio.sample_rate)
            record = self.cache.get(key, names=PROMPT_RECORD) if self.cache is not None else None
            if record is not None:
                logger.info("[FunASR Cache HIT] hash=%s…", key[:8])
                return PromptFeatures(
                    key,
                    AudioTokens(record["vq02"], record["vq06"]),
                    torch.from_numpy(np.asarray(record["prompt_mel"], dtype=np.float32)),
                    torch.from_numpy(np.asarray(record["spk_emb"], dtype=np.float32)),
                    "hit",
                )
            if self.cache is not None:
                logger.info("[FunASR Cache MISS] hash=%s…", key[:8])
            return self._compute(key, wav, audio.sample_rate)

    def _compute(self, key: str, wav: torch.Tensor, sample_rate: int) -> PromptFeatures:
        begin = time.perf_counter()
        with torch.inference_mode():
            tokens = self.tokenizer.wav2token(wav, sample_rate)
            computed = prompt_features(wav, sample_rate, self.speaker_encoder)
        prompt_mel, spk_emb = computed.prompt_mel.float().cpu(), computed.spk_emb.float().cpu()
        if self.cache is not None:
            arrays = {"vq02": tokens.vq02, "vq06": tokens.vq06, "prompt_mel": prompt_mel, "spk_emb": spk_emb}
            self.cache.put(key, arrays, compute_seconds=time.perf_counter() - begin)
        return PromptFeatures(key, tokens, prompt_mel, spk_emb, "none" if self.cache is None else "miss")

    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False}
        return {"enabled": True, **self.cache.stats().as_dict()}

    def clear_cache(self) -> None:
        if self.cache is not None:
            self.cache.clear()
