"""The app the Ray tests' replicas build (``ReplicaOptions.app_factory``): the real one, plus a cap.

Each replica runs ``api.app.create_app`` with the real engine on the tiny bundle, as
``tests.api_live.LiveServer`` does in one process; the only differences are the generation cap
(from ``STEP_AUDIO_TEST_MAX_NEW_TOKENS``: the replicas inherit the test's environment).
"""

from __future__ import annotations

import os
from functools import partial

from fastapi import FastAPI

from api.app import create_app as create_real_app
from engine.build import build_engine
from settings import Settings


def create_app(settings: Settings) -> FastAPI:
    cap = int(os.environ.get("STEP_AUDIO_TEST_MAX_NEW_TOKENS", "25"))
    return create_real_app(settings, engine_factory=partial(build_engine, max_new_tokens=cap))
