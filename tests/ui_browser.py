"""Headless Chromium for the web UI: the browser tests use it, and it takes the screenshots in docs/ui.md.

Debian's ``chromium`` driven by Playwright's Python package (no browser download: Playwright
launches the ``chromium`` program on PATH). Flags keep the browser from reaching anything but
the server under test.

    python -m tests.ui_browser docs/img     # the demo server, one screenshot per tab (docs/ui.md)
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1200, "height": 900}
TABS = ("Clone", "Edit", "Voices", "Cache")


def browser_missing() -> str | None:
    """Why no browser test can run here (None when Chromium and Playwright are both present)."""
    if shutil.which("chromium") is None:
        return "no chromium program on PATH (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is absent (the dev extra installs it)"
    return None


@contextmanager
def chromium_page(base_url: str) -> Iterator[tuple[Any, list[str]]]:
    """``(page, foreign)``: a fresh page, and every URL it requested outside ``base_url``."""
    from playwright.sync_api import sync_playwright

    foreign: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(120_000)
            page.on(
                "request",
                lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else foreign.append(r.url),
            )
            yield page, foreign
        finally:
            browser.close()


def open_ui(page: Any, base_url: str) -> None:
    """Open ``/`` (it redirects to the UI) and wait until the page says the models are ready."""
    page.goto(f"{base_url}/", wait_until="domcontentloaded")
    page.wait_for_function(
        "() => { const s = document.querySelector('#server-status'); return s && s.innerText.includes('Ready'); }"
    )


def audio_durations(page: Any, selector: str) -> list[float]:
    """Durations of the audio elements under ``selector`` that have a source (Playwright pierces shadow DOM)."""
    return page.locator(f"{selector} audio").evaluate_all(
        "as => as.filter(a => a.src && Number.isFinite(a.duration)).map(a => a.duration)"
    )


def wait_playable(page: Any, selector: str, timeout_s: float = 180.0) -> float:
    """Wait until an audio element under ``selector`` has a playable source; its duration in seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        playable = [d for d in audio_durations(page, selector) if d > 0]
        if playable:
            return playable[0]
        time.sleep(0.25)
    raise AssertionError(f"no playable audio under {selector} within {timeout_s:.0f} s")


def wait_text(page: Any, selector: str, needle: str) -> None:
    page.wait_for_function(
        "([sel, needle]) => { const e = document.querySelector(sel); return e && e.innerText.includes(needle); }",
        arg=[selector, needle],
    )


def small_png(png: bytes, colors: int = 64) -> bytes:
    """A palette PNG (a UI screenshot has few colours), a fraction of the size of Chromium's RGB one."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def tab_screenshots(out_dir: Path) -> list[Path]:
    """Serve the demo bundle (as ``make run`` does), clone once, then one screenshot per tab."""
    import logging

    from tests.api_live import LiveServer, test_settings

    logging.getLogger().setLevel(logging.INFO)  # the log panel shows what `make run` would log
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="ui-shots-") as tmp:
        settings = test_settings(Path(tmp) / "unused", Path(tmp) / "cache", demo=True, enable_auto_transcribe=False)
        with LiveServer(settings) as server, chromium_page(server.url) as (page, _):
            open_ui(page, server.url)
            page.fill("#clone-text textarea", "Hello from the web UI.")
            page.click("#clone-run")
            wait_playable(page, "#clone-out")
            page.get_by_role("tab", name="Edit").click()
            page.click("#edit-use-last")
            wait_playable(page, "#edit-audio")
            page.fill("#edit-transcript textarea", "Hello from the web UI.")
            page.fill("#edit-iter input[type=number]", "2")
            page.press("#edit-iter input[type=number]", "Enter")
            page.click("#edit-run")
            wait_playable(page, "#edit-out-2")
            for tab in TABS:
                page.get_by_role("tab", name=tab).click()
                time.sleep(1.5)  # waveforms drawn, the log panel's next tick
                path = out_dir / f"ui-{tab.lower()}.png"
                path.write_bytes(small_png(page.screenshot(full_page=True)))
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the PNGs go (docs/img for docs/ui.md)")
    args = parser.parse_args(argv)
    reason = browser_missing()
    if reason:
        parser.error(reason)
    for path in tab_screenshots(args.out_dir):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")  # the tool's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
