"""A real server for API tests: ``api.loopback.LoopbackServer`` with the real engine on the tiny bundle.

The engine is the real one (``engine.build.build_engine``) on the tiny bundle that
``bundles.write_bundle`` generates; nothing is mocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from api.loopback import LOOPBACK, READY_TIMEOUT_S, LoopbackServer
from settings import Settings

__all__ = ["LOOPBACK", "MAX_NEW_TOKENS", "READY_TIMEOUT_S", "LiveServer", "live_server", "test_settings"]

MAX_NEW_TOKENS = 25  # five groups of 5 codes: 0.6 s of audio per generation


def test_settings(bundle: Path, cache_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: the tiny bundle, a private cache, loopback only."""
    values: dict[str, Any] = {
        "model_path": bundle,
        "cache_dir": cache_dir,
        "api_host": LOOPBACK,
        "device": "cpu",
        "enable_auto_transcribe": True,
        "whisper_model": "tiny.en",
        **overrides,
    }
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class LiveServer(LoopbackServer):
    """``with LiveServer(settings) as server: server.url`` (ready: /readyz answered 200)."""

    def __init__(self, settings: Settings, *, wait_ready: bool = True, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        from engine.build import build_engine

        # the real engine; the cap keeps each random-weight generation short
        super().__init__(
            settings, engine_factory=partial(build_engine, max_new_tokens=max_new_tokens), wait_ready=wait_ready
        )


def live_server(
    bundle: Path,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    **overrides: Any,
) -> Iterator[LiveServer]:
    """A module's ``server`` fixture body: a live server over ``bundle`` with a fresh cache called ``name``."""
    settings = test_settings(bundle, tmp_path_factory.mktemp(name), **overrides)
    with LiveServer(settings, max_new_tokens=max_new_tokens) as live:
        yield live
