"""Wiring: the engine's collaborators built once from the settings, on one model registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import model_loader
from engine.prompting import PromptPreparer, prompt_cache_fingerprint
from engine.synthesizer import SamplingOptions, Synthesizer
from engine.tts import StepAudioEngine
from llm.scheduler import Scheduler
from object_store import open_store
from shared_cache import with_shared_level
from vocoder.frontend import frontend_fingerprint

if TYPE_CHECKING:
    from engine.transcribe import Transcriber
    from settings import Settings
    from shared_cache import RecordCache

DEMO_MAX_NEW_TOKENS = 250  # random weights rarely sample EOS: cap demo generations at 6 s of audio


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
        registry = _registry(settings)
    if max_new_tokens is None and settings.demo:
        max_new_tokens = DEMO_MAX_NEW_TOKENS
    tokenizer = registry.get_tokenizer(
        settings.funasr_model_id, dither=settings.funasr_dither, onnx_threads=settings.onnx_threads
    )
    vocoder = registry.get_vocoder(settings.onnx_threads)
    fingerprint = prompt_cache_fingerprint(tokenizer.fingerprint, frontend_fingerprint(vocoder.speaker_encoder))
    cache = _prompt_cache(settings, registry, fingerprint)
    preparer = PromptPreparer(
        tokenizer=tokenizer,
        text_tokenizer=registry.get_text_tokenizer(),
        speaker_encoder=vocoder.speaker_encoder,
        cache=cache,
        transcriber=_transcriber(settings, registry) if settings.enable_auto_transcribe else None,
        max_audio_seconds=settings.max_audio_seconds,
    )
    llms = registry.load_llms(dict.fromkeys(settings.variants))  # de-duplicated, in order
    schedulers = {
        name: Scheduler(
            llm,
            max_batch_rows=settings.llm_max_batch_rows,
            kv_budget_bytes=settings.llm_kv_cache_mib * 2**20,
            variant=name,
        )
        for name, llm in llms.items()
    }
    synthesizer = Synthesizer(schedulers, vocoder.token2wav, SamplingOptions(max_new_tokens=max_new_tokens))
    return StepAudioEngine(
        preparer,
        synthesizer,
        max_edit_iter=settings.max_edit_iter,
        segment_max_tokens=settings.segment_max_tokens,
        segments_in_flight=settings.segments_in_flight,
        pause_s=settings.segment_pause_ms / 1000,
    )


def _prompt_cache(settings: Settings, registry: model_loader.ModelRegistry, fingerprint: str) -> RecordCache | None:
    """This host's cache, backed by the shared store's level when the deployment has one (shared_cache)."""
    local = registry.get_prompt_cache(settings.cache_dir, settings.cache_max_bytes, fingerprint)
    if not settings.store_url:
        return local
    url = settings.store_url
    return registry.get_or_load(
        f"shared_cache:{url}:{fingerprint}",
        lambda: with_shared_level(local, open_store(url, settings.cache_dir), fingerprint),
    )


def _registry(settings: Settings) -> model_loader.ModelRegistry:
    """Fetch (when allowed) and verify the bundle; a registry on the resolved device and dtype."""
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
    return model_loader.ModelRegistry(bundle, device, model_loader.resolve_dtype(settings.torch_dtype, device))


def _transcriber(settings: Settings, registry: model_loader.ModelRegistry) -> Transcriber:
    """Whisper, loaded once per registry (at start, so the first request does not pay for it)."""
    from engine.transcribe import make_transcriber

    def load() -> Transcriber:
        whisper = make_transcriber(
            settings.asr_backend,
            settings.whisper_model,
            device=str(registry.device),
            download_root=settings.cache_dir / "whisper",
        )
        whisper.load()
        return whisper

    return registry.get_or_load(f"whisper:{settings.asr_backend}:{settings.whisper_model}", load)
