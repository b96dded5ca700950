"""The README's run command for real: ``api_server.py --demo`` as its own process, then the README's curl."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from api.demo import DEMO_BUNDLE_DIR, DEMO_HEADER
from tests.conftest import path_without

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240
FFMPEG_PROGRAMS = {"ffmpeg", "ffprobe", "avconv", "avprobe"}
# the one line about ffmpeg the server itself writes: information for the operator, not noise
UI_FFMPEG_LINE = "web UI: no ffmpeg program on PATH, so results play once complete (no live playback)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``python api_server.py --demo`` on a free port; the cache dir's demo bundle is the session's.

    Its PATH has no ``ffmpeg`` program, as on a newcomer's machine, whether this one has it or not.
    """
    cache = tmp_path_factory.mktemp("entrypoint-cache")
    (cache / DEMO_BUNDLE_DIR).symlink_to(tiny_bundle, target_is_directory=True)
    port = free_port()
    log = cache / "server.log"
    no_ffmpeg = path_without(FFMPEG_PROGRAMS, tmp_path_factory.mktemp("path-without-ffmpeg"))
    env = {**os.environ, "STEP_AUDIO_CACHE_DIR": str(cache), "PATH": no_ffmpeg}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "api_server.py", "--demo", "--api-host", "127.0.0.1", "--api-port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_readme_run_command_serves_the_demo_and_its_curl_returns_a_wav(
    demo_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, log = demo_server
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme
    makefile = (REPO / "Makefile").read_text()
    assert "api_server.py --demo --api-port 8003" in makefile
    section = readme[readme.index("## API") :]
    block = re.search(r"```bash\n(curl .*?)\n```", section, re.S)
    assert block, "the README's API section starts with a curl example"
    command = block.group(1).replace("\\\n", " ").replace("http://localhost:8003", url)
    args = [a.replace("speech.wav", str(tmp_path / "speech.wav")) for a in shlex.split(command)]
    subprocess.run([*args, "-D", str(tmp_path / "headers.txt")], check=True, timeout=300, capture_output=True)
    y, sr = sf.read(tmp_path / "speech.wav")
    assert sr == 24000 and len(y) > 0
    headers = (tmp_path / "headers.txt").read_text().lower()
    assert f"{DEMO_HEADER.lower()}: random-weight demo bundle: the audio is noise" in headers
    assert "DEMO MODE" in log.read_text()  # said loudly at startup


@pytest.mark.slow
def test_startup_output_holds_no_third_party_ffmpeg_notice(demo_server: tuple[str, Path]) -> None:
    """Without ffmpeg, funasr's import prints that it is missing (and pydub warns so): irrelevant here, so silenced.

    The server's own line saying that the web UI plays results once complete is the only mention.
    """
    _url, log = demo_server
    text = log.read_text()
    assert "Application startup complete" in text or "DEMO MODE" in text  # the log is the server's
    assert UI_FFMPEG_LINE in text  # the server ran without ffmpeg
    foreign = [line for line in text.splitlines() if "ffmpeg" in line.lower() and UI_FFMPEG_LINE not in line]
    assert foreign == [], text
