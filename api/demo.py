"""Demo mode: the tiny random-weight bundle, and the notice every response and page carries."""

from __future__ import annotations

import logging

from errors import ModelLoadError
from settings import Settings

logger = logging.getLogger(__name__)

DEMO_HEADER = "X-Step-Audio-Demo"
DEMO_NOTICE = "random-weight demo bundle: the audio is noise, not speech"
DEMO_BUNDLE_DIR = "demo-bundle"


def demo_settings(settings: Settings) -> Settings:
    """Write (once) the tiny random-weight bundle under the cache dir and point the settings at it."""
    from bundles import write_bundle

    try:
        root = write_bundle(settings.cache_dir / DEMO_BUNDLE_DIR, size="tiny")  # reused once written
    except OSError as exc:
        raise ModelLoadError(
            f"the demo bundle cannot be written under {settings.cache_dir} (--cache-dir / STEP_AUDIO_CACHE_DIR):"
            f" {exc.strerror or exc}"
        ) from exc
    logger.warning("DEMO MODE: serving %s (%s)", root, DEMO_NOTICE)
    return settings.model_copy(update={"model_path": root, "tokenizer_model_id": "Step-Audio-Tokenizer"})
