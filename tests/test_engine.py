"""The engine end to end on the tiny bundle: real tokenizer, Step1, vocoder, cache and Whisper."""

from __future__ import annotations

import io
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import engine.prompting as engine_prompting
import token_cache
from audio import VOCODER_SR, AudioError
from audio_codes import CODES_PER_GROUP, FRAMES_PER_GROUP
from bundles import bundle_is_complete, write_bundle
from engine.build import build_engine
from engine.prompting import PromptPreparer, prompt_cache_fingerprint
from engine.synthesizer import change_speed, pcm16_round_trip
from engine.tts import StepAudioEngine
from engine.types import AudioInput, CloneRequest, EditRequest, EditStep
from engine.voices import load_default_voice
from errors import InvalidInputError, TooLargeError
from model_loader import ModelRegistry, resolve_bundle
from settings import Settings
from tests.conftest import word_error_rate
from token_cache import TokenCache, count_lookups
from tokenizer import tokenizer_fingerprint
from vocoder.frontend import frontend_fingerprint

# 480 samples per mel frame, 2 mel frames per dual-codebook frame, 3 frames per group of 5 codes
SAMPLES_PER_GROUP = FRAMES_PER_GROUP * 2 * 480
MAX_NEW_TOKENS = 10  # two groups: 5760 samples (0.24 s) per generation keeps the suite fast
PROMPT_SECONDS = 1.5


def engine_settings(bundle: Path, cache_dir: Path, **kwargs) -> Settings:
    return Settings(model_path=bundle, cache_dir=cache_dir, device="cpu", torch_dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def registry(tiny_bundle: Path) -> ModelRegistry:
    bundle = resolve_bundle(tiny_bundle)
    return ModelRegistry(bundle, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path, engine_cache_dir: Path, registry: ModelRegistry) -> StepAudioEngine:
    settings = engine_settings(tiny_bundle, engine_cache_dir, enable_auto_transcribe=False)
    return build_engine(settings, registry=registry, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def prompt() -> tuple[AudioInput, str]:
    """The first 1.5 s of the shipped default voice (a real speech clip) and its transcript."""
    voice, transcript = load_default_voice()
    n = int(PROMPT_SECONDS * voice.sample_rate)
    return AudioInput(voice.samples[:, :n].copy(), voice.sample_rate), transcript


def expected_samples(n_codes: int) -> int:
    """Samples token2wav makes from ``n_codes`` mixed codes (padded to whole groups)."""
    return -(-n_codes // CODES_PER_GROUP) * SAMPLES_PER_GROUP


def clone(engine: StepAudioEngine, prompt: tuple[AudioInput, str], **kwargs) -> np.ndarray:
    audio, text = prompt
    fields = {"prompt_audio": audio, "prompt_text": text, "text": "Hello there.", "seed": 5} | kwargs
    return engine.clone(CloneRequest(**fields)).audio


def test_clone_gives_24k_audio_of_the_generated_length(engine: StepAudioEngine, prompt) -> None:
    audio, text = prompt
    result = engine.clone(CloneRequest(prompt_audio=audio, prompt_text=text, text="Good morning, everyone."))
    assert result.sample_rate == VOCODER_SR == 24000
    assert 0 < result.n_audio_tokens <= MAX_NEW_TOKENS
    assert result.audio.shape == (expected_samples(result.n_audio_tokens),)
    assert result.audio.shape[0] == engine.synthesizer.token2wav.mel_frames(result.n_audio_tokens) * 480
    assert result.audio.dtype == np.float32 and np.isfinite(result.audio).all()
    assert np.abs(result.audio).max() > 0
    assert result.iterations == [result.audio]
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**31  # drawn and reported
    assert result.transcript == text
    timings = result.timings
    assert min(timings.prompt_features, timings.llm, timings.vocoder) > 0 and timings.total > 0


def test_seed_reproduces_even_from_concurrent_threads(engine: StepAudioEngine, prompt) -> None:
    results: dict[int, np.ndarray] = {}

    def run(slot: int) -> None:
        results[slot] = clone(engine, prompt, seed=11)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], clone(engine, prompt, seed=11))
    other = clone(engine, prompt, seed=12)
    assert other.shape != results[0].shape or not np.array_equal(other, results[0])


def test_intensity_changes_the_output(engine: StepAudioEngine, prompt) -> None:
    audio, text = prompt
    low = engine.clone(CloneRequest(prompt_audio=audio, prompt_text=text, text="Hi.", seed=3, intensity=0.1))
    high = engine.clone(CloneRequest(prompt_audio=audio, prompt_text=text, text="Hi.", seed=3, intensity=3.0))
    assert (low.intensity, high.intensity) == (0.1, 3.0)
    assert low.audio.shape != high.audio.shape or not np.array_equal(low.audio, high.audio)


EDIT_CASES = [
    ("emotion", "happy", None),
    ("style", "whisper", None),
    ("speed", "more faster", None),
    ("paralinguistic", None, "[Laughter] Hello, I am the default voice."),
    ("denoise", None, None),
    ("vad", None, None),
]


@pytest.mark.parametrize(("mode", "edit_info", "text"), EDIT_CASES)
def test_every_edit_mode(engine: StepAudioEngine, prompt, mode: str, edit_info: str | None, text: str | None) -> None:
    audio, transcript = prompt
    audio_text = None if mode in {"denoise", "vad"} else transcript  # those two need no transcript
    result = engine.edit(
        EditRequest(audio=audio, audio_text=audio_text, mode=mode, edit_info=edit_info, text=text, seed=1)
    )
    assert result.sample_rate == VOCODER_SR
    assert 0 < result.n_audio_tokens <= MAX_NEW_TOKENS
    assert result.audio.shape == (expected_samples(result.n_audio_tokens),)
    assert len(result.iterations) == 1 and result.iterations[-1] is result.audio


def test_n_edit_iter_runs_every_iteration_on_the_previous_output(
    engine: StepAudioEngine, prompt, caplog: pytest.LogCaptureFixture
) -> None:
    audio, transcript = prompt
    request = EditRequest(audio=audio, audio_text=transcript, mode="style", edit_info="whisper", n_edit_iter=3, seed=2)
    with caplog.at_level(logging.INFO):
        result = engine.edit(request)
    assert len(result.iterations) == 3
    assert result.audio is result.iterations[-1]
    for wav in result.iterations:
        assert wav.shape[0] % SAMPLES_PER_GROUP == 0 and wav.shape[0] > 0
    # iterations 2 and 3 tokenise the previous 24 kHz output: new audio, so new cache keys
    assert sum("[FunASR Cache MISS]" in r.getMessage() for r in caplog.records) >= 2
    assert not np.array_equal(result.iterations[0], result.iterations[1])


def test_speed_halves_the_duration(engine: StepAudioEngine, prompt) -> None:
    normal = clone(engine, prompt, seed=4)
    fast = clone(engine, prompt, seed=4, speed=2.0)
    assert abs(fast.shape[0] / normal.shape[0] - 0.5) <= 0.025


def test_speed_keeps_the_pitch() -> None:
    t = np.arange(VOCODER_SR) / VOCODER_SR
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    for speed in (0.5, 2.0):
        out = change_speed(tone, speed)
        assert abs(out.shape[0] - round(tone.shape[0] / speed)) <= 1
        spectrum = np.abs(np.fft.rfft(out * np.hanning(out.shape[0])))
        peak_hz = np.argmax(spectrum) * VOCODER_SR / out.shape[0]
        assert abs(peak_hz - 440.0) < 5.0


def test_iteration_hand_over_equals_a_16_bit_wav_round_trip() -> None:
    wav = np.concatenate([np.random.default_rng(0).uniform(-1, 1, 4000), [1.0, -1.0, 1.5, -1.5, 1e-6, -1e-6]])
    buffer = io.BytesIO()
    sf.write(buffer, wav.astype(np.float32), VOCODER_SR, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    reloaded, _ = sf.read(buffer, dtype="float32")
    np.testing.assert_array_equal(pcm16_round_trip(wav.astype(np.float32)), reloaded)


def test_second_request_with_the_same_prompt_hits_the_cache(
    engine: StepAudioEngine, prompt, caplog: pytest.LogCaptureFixture
) -> None:
    voice, _ = load_default_voice()
    # a prompt no other test uses (seconds 2.0 to 3.5 of the default voice)
    audio = AudioInput(voice.samples[:, 2 * voice.sample_rate : int(3.5 * voice.sample_rate)].copy(), voice.sample_rate)
    request = CloneRequest(prompt_audio=audio, prompt_text="the default voice", text="Cache me.", seed=9)
    before = engine.cache_stats()
    with caplog.at_level(logging.INFO):
        engine.clone(request)
    after_first = engine.cache_stats()
    assert after_first["misses"] == before["misses"] + 1  # one record: tokens, mel and speaker embedding
    assert after_first["entries"] == before["entries"] + 1
    assert "[FunASR Cache MISS] hash=" in caplog.text and "[FunASR Encoding] time=" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = engine.clone(request)
    after_second = engine.cache_stats()
    assert after_second["misses"] == after_first["misses"]  # nothing was computed again
    assert after_second["hits"] == after_first["hits"] + 1
    assert after_second["time_saved_s"] > after_first["time_saved_s"]
    assert "[FunASR Cache HIT] hash=" in caplog.text and "[FunASR Encoding]" not in caplog.text
    assert second.audio.shape[0] > 0
    assert (second.cache_hits, second.cache_misses) == (1, 0)  # one record, one lookup


def test_a_hit_reads_one_file_and_hashes_the_content_once(
    engine: StepAudioEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice, _ = load_default_voice()
    audio = AudioInput(voice.samples[:, 3 * voice.sample_rate : 4 * voice.sample_rate].copy(), voice.sample_rate)
    with count_lookups() as first:
        missed = engine.preparer.features(audio, "prompt_audio")
    assert (first.hits, first.misses) == (0, 1)
    cache = engine.preparer.cache
    assert cache is not None
    root = str(cache.root)
    opened: list[str] = []
    hashed: list[int] = []
    counting = threading.local()

    def on_open(event: str, args: tuple) -> None:  # the interpreter's own record of every file opened
        if event == "open" and getattr(counting, "on", False) and str(args[0]).startswith(root):
            opened.append(str(args[0]))

    sys.addaudithook(on_open)  # hooks stay for the process; this one only counts while ``counting.on``
    for module in (engine_prompting, token_cache):
        real = module.content_key

        def spy(wav: object, sample_rate: int, real=real) -> str:
            hashed.append(sample_rate)
            return real(wav, sample_rate)

        monkeypatch.setattr(module, "content_key", spy)
    counting.on = True
    try:
        with count_lookups() as again:
            hit = engine.preparer.features(audio, "prompt_audio")
    finally:
        counting.on = False
    assert (again.hits, again.misses) == (1, 0)
    payloads = [p for p in opened if p.endswith(".npz")]
    assert payloads == [str(cache._path(hit.key))]  # one record, read once
    assert len(hashed) == 1  # the content is hashed once per lookup
    assert torch.equal(hit.prompt_mel, missed.prompt_mel) and torch.equal(hit.spk_emb, missed.spk_emb)
    np.testing.assert_array_equal(hit.tokens.speech_ids, missed.tokens.speech_ids)


def test_records_survive_a_restart_and_new_weights_miss(engine: StepAudioEngine, prompt) -> None:
    audio = prompt[0]
    engine.prepare_voice(audio)  # stored (or already there)

    preparer = engine.preparer
    cache = preparer.cache
    assert cache is not None

    def preparer_over(cache: TokenCache) -> PromptPreparer:
        return PromptPreparer(
            tokenizer=preparer.tokenizer,
            text_tokenizer=preparer.text_tokenizer,
            speaker_encoder=preparer.speaker_encoder,
            cache=cache,
        )

    restarted = preparer_over(TokenCache(cache.directory, cache.max_bytes, cache.fingerprint))
    with count_lookups() as lookups:
        restarted.features(audio, "prompt_audio")
    assert (lookups.hits, lookups.misses) == (1, 0)
    dithered = prompt_cache_fingerprint(
        tokenizer_fingerprint(preparer.tokenizer.tokenizer_dir, preparer.tokenizer.funasr_model_id, dither=1.0),
        frontend_fingerprint(preparer.speaker_encoder),
    )
    other = preparer_over(TokenCache(cache.directory, cache.max_bytes, dithered))
    with count_lookups() as lookups:
        other.features(audio, "prompt_audio")
    assert (lookups.hits, lookups.misses) == (0, 1)


def test_unusable_audio_is_refused_before_the_cache(engine: StepAudioEngine) -> None:
    before = engine.cache_stats()
    with pytest.raises(AudioError) as exc:
        engine.prepare_voice(AudioInput(np.zeros((1, 16000), np.float32), 16000))
    assert exc.value.param == "prompt_audio"
    after = engine.cache_stats()
    assert (after["hits"], after["misses"], after["entries"]) == (before["hits"], before["misses"], before["entries"])


def test_prepare_voice_fills_the_cache(engine: StepAudioEngine) -> None:
    voice, _ = load_default_voice()
    audio = AudioInput(voice.samples[:, voice.sample_rate : 2 * voice.sample_rate].copy(), voice.sample_rate)
    engine.prepare_voice(audio)
    before = engine.cache_stats()
    engine.prepare_voice(audio)
    after = engine.cache_stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 1


def test_clear_cache(engine: StepAudioEngine, prompt) -> None:
    engine.prepare_voice(prompt[0])
    assert engine.cache_stats()["entries"] > 0
    engine.clear_cache()
    assert engine.cache_stats()["entries"] == 0


def test_missing_transcripts_without_auto_transcription(engine: StepAudioEngine, prompt) -> None:
    audio, _ = prompt
    assert not engine.auto_transcribe
    with pytest.raises(InvalidInputError, match="auto-transcription is off") as err:
        engine.clone(CloneRequest(prompt_audio=audio, prompt_text=None, text="Hello."))
    assert err.value.param == "prompt_text"
    with pytest.raises(InvalidInputError) as err:
        engine.edit(EditRequest(audio=audio, audio_text="  ", mode="emotion", edit_info="sad"))
    assert err.value.param == "audio_text"


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"variant": "awq"}, "variant", "loaded variants: base"),
        ({"mode": "emotion", "edit_info": "whisper"}, "edit_info", "'whisper' is not allowed"),
        ({"mode": "style", "edit_info": None}, "edit_info", "missing; allowed"),
        ({"mode": "denoise", "edit_info": "happy"}, "edit_info", "takes no edit_info"),
        ({"mode": "shout"}, "mode", "unknown edit mode"),
        ({"mode": "paralinguistic", "edit_info": None, "text": None}, "text", "inline tags"),
        ({"n_edit_iter": 0}, "n_edit_iter", "between 1 and 4"),
        ({"n_edit_iter": 5}, "n_edit_iter", "between 1 and 4"),
        ({"intensity": 3.5}, "intensity", "between 0.1 and 3.0"),
        ({"speed": 0.1}, "speed", "between 0.25 and 4.0"),
        ({"seed": -1}, "seed", "seed must be"),
    ],
)
def test_bad_edit_requests(engine: StepAudioEngine, prompt, kwargs: dict, param: str, message: str) -> None:
    audio, transcript = prompt
    fields = {"audio": audio, "audio_text": transcript, "mode": "emotion", "edit_info": "happy"} | kwargs
    with pytest.raises(InvalidInputError, match=message) as err:
        engine.edit(EditRequest(**fields))
    assert err.value.param == param


def test_bad_clone_requests(engine: StepAudioEngine, prompt) -> None:
    audio, transcript = prompt
    with pytest.raises(InvalidInputError) as err:
        engine.clone(CloneRequest(prompt_audio=audio, prompt_text=transcript, text="   "))
    assert err.value.param == "text"
    with pytest.raises(InvalidInputError, match="audio_N") as err:  # no smuggled audio tokens
        engine.clone(CloneRequest(prompt_audio=audio, prompt_text=transcript, text="Hi <audio_7> there."))
    assert err.value.param == "text"
    long_audio = AudioInput(np.zeros((1, 31 * 16000), dtype=np.float32), 16000)
    with pytest.raises(TooLargeError) as err:
        engine.clone(CloneRequest(prompt_audio=long_audio, prompt_text=transcript, text="Hi."))
    assert err.value.param == "prompt_audio"
    silence = AudioInput(np.zeros((1, 24000), dtype=np.float32), 24000)
    with pytest.raises(AudioError, match="silent") as err:
        engine.clone(CloneRequest(prompt_audio=silence, prompt_text=transcript, text="Hi."))
    assert err.value.param == "prompt_audio"


def test_catalogue_and_default_voice(engine: StepAudioEngine) -> None:
    tags = engine.tags()
    assert "happy" in tags["emotion"] and "whisper" in tags["style"] and "[Laughter]" in tags["paralinguistic"]
    assert engine.variants == ["base"]
    voice, transcript = engine.default_voice()
    assert voice.sample_rate in {22050, 24000} and voice.samples.shape[0] == 1
    assert 1.0 < voice.seconds <= 6.0 and transcript.endswith(".")


@pytest.fixture(scope="module")
def transcribing_engine(
    tiny_bundle: Path, engine_cache_dir: Path, registry: ModelRegistry, whisper_tiny_en: Path
) -> StepAudioEngine:
    """Auto-transcription on (real Whisper tiny.en), on the stages the registry already loaded."""
    settings = engine_settings(
        tiny_bundle, engine_cache_dir, enable_auto_transcribe=True, whisper_model=str(whisper_tiny_en)
    )
    return build_engine(settings, registry=registry, max_new_tokens=MAX_NEW_TOKENS)


def test_engines_on_one_registry_share_the_stages(
    engine: StepAudioEngine, transcribing_engine, registry: ModelRegistry, tiny_bundle: Path, engine_cache_dir: Path
) -> None:
    whisper = transcribing_engine.preparer.transcriber
    assert whisper is not None
    settings = engine_settings(
        tiny_bundle, engine_cache_dir, enable_auto_transcribe=True, whisper_model=whisper.model_name
    )
    assert build_engine(settings, registry=registry).preparer.transcriber is whisper  # Whisper loads once too
    mine, theirs = transcribing_engine.preparer, engine.preparer
    assert mine.tokenizer is theirs.tokenizer and mine.cache is theirs.cache is not None
    assert transcribing_engine.synthesizer.token2wav is engine.synthesizer.token2wav
    llm = transcribing_engine.synthesizer.schedulers["base"].model
    assert llm is engine.synthesizer.schedulers["base"].model
    assert transcribing_engine.auto_transcribe and whisper.loaded


def test_auto_transcription_fills_missing_transcripts(transcribing_engine: StepAudioEngine, piper_speech) -> None:
    sentence = "Please bring the blue book to the kitchen."
    wav, sr = piper_speech(sentence)
    audio = AudioInput(wav[None], sr)
    cloned = transcribing_engine.clone(CloneRequest(prompt_audio=audio, prompt_text=None, text="Thank you.", seed=1))
    assert word_error_rate(sentence, cloned.transcript) <= 0.2, cloned.transcript
    assert "thank" not in cloned.transcript.lower()  # the prompt's transcript, never the target text
    assert cloned.timings.transcribe > 0
    edited = transcribing_engine.edit(EditRequest(audio=audio, audio_text=None, mode="emotion", edit_info="sad"))
    assert edited.transcript == cloned.transcript
    assert edited.audio.shape[0] > 0


def test_openai_whisper_backend_fills_missing_transcripts(
    tiny_bundle: Path, engine_cache_dir: Path, registry: ModelRegistry, tmp_path: Path
) -> None:
    """``--asr-backend openai-whisper`` with a ``.pt`` checkpoint, through build_engine and a clone."""
    pytest.importorskip("whisper.model", reason="the optional openai-whisper package is not installed")
    from bundles.whisper_bundle import SPOKEN_WORD, write_openai_whisper_checkpoint

    checkpoint = write_openai_whisper_checkpoint(tmp_path / "tiny.pt")
    settings = engine_settings(
        tiny_bundle,
        engine_cache_dir,
        enable_auto_transcribe=True,
        asr_backend="openai-whisper",
        whisper_model=str(checkpoint),
    )
    engine = build_engine(settings, registry=registry, max_new_tokens=MAX_NEW_TOKENS)
    transcriber = engine.preparer.transcriber
    assert transcriber is not None and transcriber.backend == "openai-whisper"
    audio = AudioInput(np.random.default_rng(5).uniform(-0.3, 0.3, (1, 24000)).astype(np.float32), 24000)
    cloned = engine.clone(CloneRequest(prompt_audio=audio, prompt_text=None, text="Thank you.", seed=1))
    assert cloned.transcript == SPOKEN_WORD.strip()


def test_write_bundle_reuses_a_complete_bundle(tiny_bundle: Path) -> None:
    weights = tiny_bundle / "Step-Audio-EditX" / "model-00001-of-00001.safetensors"
    before = weights.stat().st_mtime_ns
    assert bundle_is_complete(tiny_bundle, "tiny", 0) and not bundle_is_complete(tiny_bundle, "tiny", 1)
    assert write_bundle(tiny_bundle, size="tiny", seed=0) == tiny_bundle
    assert weights.stat().st_mtime_ns == before  # reused, not rewritten
    with pytest.raises(ValueError, match="tiny"):
        write_bundle(tiny_bundle, size="huge")


def test_each_result_counts_its_own_cache_lookups_while_others_run(engine: StepAudioEngine, prompt) -> None:
    voice, _ = load_default_voice()
    clips = [AudioInput(voice.samples[:, i * 12000 : i * 12000 + 24000].copy(), voice.sample_rate) for i in range(1, 4)]
    engine.prepare_voice(clips[0])  # cached: its clone finds its record (1 hit)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = engine.clone(CloneRequest(prompt_audio=clips[i], prompt_text="Hello.", text="Hi.", seed=i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (results[0].cache_hits, results[0].cache_misses) == (1, 0)
    for i in (1, 2):  # new clips: the one lookup misses, whatever the other threads did meanwhile
        assert (results[i].cache_hits, results[i].cache_misses) == (0, 1)


def test_a_chain_hands_each_output_to_the_next_step_with_derived_seeds(engine: StepAudioEngine, prompt) -> None:
    audio, transcript = prompt
    steps = (EditStep("emotion", "happy", n_edit_iter=2), EditStep("paralinguistic", text="Hello [Sigh] there."))
    chain = engine.clone(
        CloneRequest(prompt_audio=audio, prompt_text=transcript, text="Hello there.", seed=20, edits=steps)
    )
    assert [(x.step, x.mode, x.iteration, x.seed) for x in chain.labels] == [
        (0, "clone", 1, 20),
        (1, "emotion", 1, 21),
        (1, "emotion", 2, 22),
        (2, "paralinguistic", 1, 23),
    ]
    by_hand = engine.clone(CloneRequest(prompt_audio=audio, prompt_text=transcript, text="Hello there.", seed=20))
    np.testing.assert_array_equal(chain.iterations[0], by_hand.audio)
    step1 = engine.edit(
        EditRequest(
            AudioInput(pcm16_round_trip(by_hand.audio)[None], VOCODER_SR),
            "Hello there.",
            "emotion",
            "happy",
            n_edit_iter=2,
            seed=21,
        )
    )
    np.testing.assert_array_equal(chain.iterations[2], step1.audio)
    step2 = engine.edit(
        EditRequest(
            AudioInput(pcm16_round_trip(step1.audio)[None], VOCODER_SR),
            "Hello there.",
            "paralinguistic",
            text="Hello [Sigh] there.",
            seed=23,
        )
    )
    np.testing.assert_array_equal(chain.audio, step2.audio)
