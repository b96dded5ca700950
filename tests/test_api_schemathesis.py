"""Schemathesis over the JSON API's own OpenAPI document, against the real server (uvicorn on
loopback, the real engine on the tiny bundle): generated requests, valid and invalid, for every
operation; none may be answered with a 5xx, and every error is OpenAI's envelope.

The harness (``tests.schema_fuzz``) takes any document and base URL, so other route sets (the web
UI's) run the same way. ``EXAMPLES`` bounds the run to a few minutes on two cores: the engine's
generations are capped (``tests.api_live.MAX_NEW_TOKENS``), so even the valid speech requests that
get through are cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api_live import LiveServer, test_settings
from tests.schema_fuzz import fuzz

# per operation and generation mode; `make fuzz` runs more (FUZZ_EXAMPLES)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = test_settings(
        tiny_bundle, tmp_path_factory.mktemp("fuzz-cache"), enable_auto_transcribe=False, max_upload_bytes=1 << 20
    )
    with LiveServer(settings) as live:
        yield live


@pytest.mark.slow
def test_no_generated_request_is_answered_with_a_5xx(server: LiveServer) -> None:
    doc = server.app.openapi()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/openapi.json").json() == doc  # the document clients read is the one fuzzed
    report = fuzz(doc, server.url, max_examples=EXAMPLES)
    print(report.summary())
    assert not report.server_errors, "\n".join(report.server_errors)
    assert not report.bad_envelopes, "\n".join(report.bad_envelopes)
    operations = {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}
    assert set(report.statuses) == operations  # every operation was exercised
    assert all(report.statuses.values()), report.summary()
    # the speech routes take the bulk of the generated data (an operation without inputs gets one example)
    for label in ("POST /v1/audio/speech", "POST /v1/audio/speech/upload", "POST /v1/voices"):
        assert sum(report.statuses[label].values()) >= EXAMPLES, report.summary()
