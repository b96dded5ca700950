"""A stop (SIGTERM) ends the server within a bounded time, whatever a request is doing.

``api_server.py --demo`` runs as its own process (the README's command); UI requests are in
flight when it gets SIGTERM: an upload whose body is still arriving (the server is reading it),
a page's event stream, and the probe's ``/dev/zero`` and FIFO clips (which once held the event
loop forever, so that SIGTERM did nothing). The second test shows the last resort of
``api.serve``: a request that holds the event loop cannot keep the process past ``hard_stop_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.demo import DEMO_BUNDLE_DIR
from api.serve import GRACE_S, HARD_STOP_S
from tests.test_api_entrypoint import free_port
from tests.ui_page import UiPage

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240
STOP_SLACK_S = 5.0  # the app's own shutdown after uvicorn's grace period: the queue, the decode loops


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@pytest.fixture
def demo(tiny_bundle: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / DEMO_BUNDLE_DIR).symlink_to(tiny_bundle, target_is_directory=True)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "api_server.py", "--demo", "--api-host", "127.0.0.1", "--api-port", str(port)],
            cwd=REPO,
            env={**os.environ, "STEP_AUDIO_CACHE_DIR": str(cache)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _slow_upload(url: str) -> socket.socket:
    """A page's upload whose body has only begun to arrive: the server is reading it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    boundary = "----stop-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="clip.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    sock.sendall(
        (
            f"POST /ui/gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        + head
        + b"RIFF"
        + b"\0" * 4096
    )
    return sock


@pytest.mark.slow
def test_sigterm_stops_the_server_within_the_grace_period_with_ui_requests_in_flight(
    demo: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    url, proc, log = demo
    fifo = tmp_path / "clip.wav"
    os.mkfifo(fifo)
    upload = _slow_upload(url)
    probes: list[int] = []

    def probe(path: str) -> None:  # the probe's clips, each on its own page session
        try:
            with UiPage(url, timeout_s=60) as page:
                clip = {"path": path, "meta": {"_type": "gradio.FileData"}}
                probes.append(
                    page.join(
                        page.fn_index("clone-run"), [clip, "default", "", "Hi.", "base", 1.0, "", "wav"]
                    ).status_code
                )
        except httpx.TransportError:
            probes.append(0)

    threads = [threading.Thread(target=probe, args=(p,), daemon=True) for p in ("/dev/zero", str(fifo))]
    for t in threads:
        t.start()
    with UiPage(url) as page:  # a page with an event under way when the stop comes
        running = page.submit("clone-run", None, "default", "", "A sentence for the stop.", "base", 1.0, "1", "wav")
        for t in threads:
            t.join(10)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # the event loop is free
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(GRACE_S + STOP_SLACK_S)
        finally:
            upload.close()
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while not running.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.done()  # its event stream ended with the server
    text = log.read_text()
    # a clean stop: uvicorn finishes, then ends the process with the signal it got, as uvicorn.run does
    assert code == -signal.SIGTERM and "Finished server process" in text, (code, text)
    assert took <= GRACE_S + STOP_SLACK_S, took
    assert probes == [400, 400], probes  # refused at once, not read
    assert "did not stop within" not in text


HOLDS_THE_LOOP = textwrap.dedent(
    """
    import sys, time
    from fastapi import FastAPI
    from api.serve import serve

    app = FastAPI()

    @app.get("/hold")
    async def hold() -> None:
        time.sleep(3600)  # on the event loop: nothing else runs, the stop included

    @app.get("/up")
    async def up() -> str:
        return "up"

    serve(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", grace_s=1, hard_stop_s=float(sys.argv[2]))
    """
)


def test_a_request_holding_the_event_loop_cannot_outlast_the_hard_stop() -> None:
    hard_stop_s = 3.0
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDS_THE_LOOP, str(port), str(hard_stop_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/up", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)

        def hold() -> None:
            with contextlib.suppress(httpx.TransportError):  # the process goes away under it
                httpx.get(f"{url}/hold", timeout=60)

        threading.Thread(target=hold, daemon=True).start()
        time.sleep(0.5)
        with pytest.raises(httpx.TimeoutException):  # the loop is held
            httpx.get(f"{url}/up", timeout=1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(hard_stop_s + STOP_SLACK_S)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=30)[0].decode()
    assert code == 1 and hard_stop_s <= took <= hard_stop_s + STOP_SLACK_S, (code, took, output)
    assert f"did not stop within {hard_stop_s:g} s of the stop signal" in output
    assert HARD_STOP_S > GRACE_S + STOP_SLACK_S  # the default leaves the graceful stop its time
