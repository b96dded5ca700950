"""The web UI in a real browser: headless Chromium against the real server on the tiny bundle.

One server and one page for the module; the tests run in file order as a person would use the
page (clone, then edit the last output, ...). Screenshots of each step land in
``test-artifacts/ui/`` (git-ignored). Skips where Chromium or Playwright is absent.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_live import LiveServer, test_settings
from tests.ui_browser import browser_missing, chromium_page, open_ui, wait_playable, wait_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
TEXT = "Hello from the browser test."


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # the log panel shows INFO lines, as the server started by api_server.py logs them
    settings = test_settings(tiny_bundle, tmp_path_factory.mktemp("ui-cache"), enable_auto_transcribe=False)
    try:
        with LiveServer(settings) as live:
            yield live
    finally:
        root.setLevel(level)


@pytest.fixture(scope="module")
def browser(server: LiveServer) -> Iterator[tuple[Any, list[str]]]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_page(server.url) as (page, foreign):
        open_ui(page, server.url)
        yield page, foreign


@pytest.fixture
def page(browser: tuple[Any, list[str]], request: pytest.FixtureRequest) -> Iterator[Any]:
    yield browser[0]
    browser[0].screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)


def tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


HITS = "() => { const e = document.querySelector('#cache-hits input'); return e ? e.value : ''; }"


def refreshed_hits(page: Any, above: float = -1.0) -> float:
    """Press Refresh on the cache tab and wait until the hit count shown is above ``above``."""
    tab(page, "Cache")
    page.click("#cache-refresh")
    page.wait_for_function(f"() => {{ const v = ({HITS})(); return v !== '' && Number(v) > {above}; }}")
    return float(page.input_value("#cache-hits input"))


def test_root_redirects_to_the_ui_and_the_page_is_ready(page: Any, server: LiveServer) -> None:
    assert page.url == f"{server.url}/ui/"
    assert "variants: base" in page.inner_text("#server-status")


def test_clone_with_the_default_voice_gives_playable_audio(page: Any) -> None:
    tab(page, "Clone")
    assert page.input_value("#clone-voice input") == "default"
    page.fill("#clone-text textarea", TEXT)
    page.click("#clone-run")
    duration = wait_playable(page, "#clone-out")
    assert duration > 0
    wait_text(page, "#clone-info", "audio tokens")
    info = page.inner_text("#clone-info")
    assert "variant base" in info and "intensity 1" in info


@pytest.mark.skipif(
    shutil.which("ffmpeg") is None,
    reason="no ffmpeg program on PATH: Gradio's streaming player encodes with it (.ci/run installs it)",
)
def test_the_clone_played_live_in_the_page(page: Any) -> None:
    """The live player got the stream and played it (autoplay), as long as the complete output.

    That it arrives before the generation ends is shown server-side in ``test_ui_streaming``.
    """
    out = wait_playable(page, "#clone-out")
    deadline = time.monotonic() + 60
    played: list[list[float]] = []
    while time.monotonic() < deadline:
        played = page.locator("#clone-live audio").evaluate_all(
            "as => as.filter(a => a.src && a.currentTime > 0).map(a => [a.currentTime, a.duration])"
        )
        if played and abs(played[0][1] - out) <= 0.2:  # AAC padding
            break
        time.sleep(0.25)
    assert played and played[0][0] > 0 and abs(played[0][1] - out) <= 0.2, (played, out)


def test_emotion_edit_with_two_iterations_shows_both(page: Any) -> None:
    tab(page, "Edit")
    page.click("#edit-use-last")
    assert wait_playable(page, "#edit-audio") > 0
    assert page.input_value("#edit-mode input") == "emotion"
    assert page.input_value("#edit-info input") == "happy"  # the first emotion of /v1/tags
    page.fill("#edit-transcript textarea", TEXT)
    page.fill("#edit-iter input[type=number]", "2")
    page.press("#edit-iter input[type=number]", "Enter")
    page.click("#edit-run")
    assert wait_playable(page, "#edit-out-2") > 0
    assert wait_playable(page, "#edit-out-1") > 0
    assert not page.locator("#edit-out-3").is_visible()
    wait_text(page, "#edit-result", "iterations 2")
    # each iteration offers its own file to download
    links = [
        page.locator(f"#edit-out-{i} a[download]").first.get_attribute("href") for i in (1, 2)
    ]  # fmt: skip
    assert all(links) and links[0] != links[1]


def test_cache_hit_count_goes_up_on_a_repeated_clone(page: Any) -> None:
    before = refreshed_hits(page)
    tab(page, "Clone")
    page.fill("#clone-seed textarea", "4242")
    page.click("#clone-run")
    wait_text(page, "#clone-info", "seed 4242")
    after = refreshed_hits(page, above=before)  # the default voice's clip: its tokens come from the cache
    assert after > before


def test_log_panel_shows_a_cache_hit_line(page: Any) -> None:
    page.wait_for_function(
        "() => { const t = document.querySelector('#server-log textarea'); return t && t.value.includes('Cache HIT'); }"
    )
    lines = page.input_value("#server-log textarea").splitlines()
    assert any("[FunASR Cache HIT]" in line for line in lines)


def test_a_waiting_request_says_so_then_plays(page: Any, server: LiveServer) -> None:
    service = server.app.state.step_audio.service
    gate = threading.Event()
    holder = threading.Thread(target=lambda: asyncio.run(service.submit("test-gate", gate.wait)), daemon=True)
    tab(page, "Clone")
    page.fill("#clone-text textarea", TEXT)
    page.fill("#clone-seed textarea", "77")
    try:
        holder.start()  # the only worker is busy: the page's request has to wait in the queue
        page.click("#clone-run")
        page.wait_for_function(
            "() => document.body.innerText.includes('waiting in the server queue: 1 request(s) ahead')"
        )
        page.screenshot(path=ARTIFACTS / "waiting.png", full_page=True)
    finally:
        gate.set()
    wait_text(page, "#clone-info", "seed 77")
    assert wait_playable(page, "#clone-out") > 0


def test_bad_input_shows_the_error_message(page: Any) -> None:
    tab(page, "Clone")
    page.fill("#clone-text textarea", "")
    page.click("#clone-run")
    page.wait_for_function("() => document.body.innerText.includes('clone needs the text to speak')")
    assert "Traceback" not in page.inner_text("body")


def test_the_page_requested_nothing_outside_the_server(browser: tuple[Any, list[str]]) -> None:
    _, foreign = browser
    assert foreign == []
