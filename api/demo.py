"""Demo mode: the tiny random-weight bundle, and the notice every response and page carries."""

from __future__ import annotations

import logging

from settings import Settings

logger = logging.getLogger(__name__)

DEMO_HEADER = "X-Step-Audio-Demo"
DEMO_NOTICE = "random-weight demo bundle: the audio is noise, not speech"
DEMO_BUNDLE_DIR = "demo-bundle"


def demo_settings(settings: Settings) -> Settings:
    """Write (once) the tiny random-weight bundle under the cache dir and point the settings at it."""
    from bundles import write_bundle

    root = write_bundle(settings.cache_dir / DEMO_BUNDLE_DIR, size="tiny")  # reused once written
    logger.warning("DEMO MODE: serving %s (%s)", root, DEMO_NOTICE)
    return settings.model_copy(update={"model_path": root, "tokenizer_model_id": "Step-Audio-Tokenizer"})
