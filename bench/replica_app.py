"""The app ``bench.bench_replicas``'s replicas build: ``api.app.create_app`` with a generation cap.

Every replica runs the production app; the cap (``STEP_AUDIO_BENCH_MAX_NEW_TOKENS``, inherited
from the benchmark's environment) with a bundle whose LLM never stops early makes every request
generate exactly the same audio, so one replica and two face the same work.
"""

from __future__ import annotations

import os
from functools import partial

from fastapi import FastAPI

from api.app import create_app as create_real_app
from engine.build import build_engine
from settings import Settings

CAP_ENV = "STEP_AUDIO_BENCH_MAX_NEW_TOKENS"


def create_app(settings: Settings) -> FastAPI:
    return create_real_app(settings, engine_factory=partial(build_engine, max_new_tokens=int(os.environ[CAP_ENV])))
