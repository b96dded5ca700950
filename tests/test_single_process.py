"""The single-process server stays what it was when the scale-out extras are installed.

``make install`` puts Ray, boto3, uvloop and httptools in the dev venv (the ``ray`` extra), so
these tests run ``api_server.py`` as its own process, the way ``make run`` and the Docker image
do, serve a speech request and the web UI with it, and read ``python -X importtime``'s list of
every module the process imported: no Ray, and uvicorn on asyncio and h11
(``api.uvicorn_options``), not on the uvloop and httptools the extra brought.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api_live import LOOPBACK
from tests.s3_server import _free_port

REPO = Path(__file__).resolve().parents[1]
# (boto3 is left out: accelerate, of the quant extra, imports it whenever it is installed; that our
# own modules import it only in object_store is tests/test_architecture.py's check)
NEVER = ("ray", "uvloop", "httptools")
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$")


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level names of every module in ``-X importtime``'s report."""
    return {m.group(1).split(".")[0] for line in importtime_stderr.splitlines() if (m := _IMPORT_LINE.match(line))}


def test_the_import_report_is_read() -> None:
    """The parser itself can fail: a report naming ray's modules yields ray."""
    header = "import time: self [us] | cumulative | imported package\n"
    assert imported_modules(header + "import time:       120 |        130 |   ray._private\n") == {"ray"}


@pytest.mark.slow
def test_the_single_process_server_never_imports_ray(tiny_bundle: Path, tmp_path: Path) -> None:
    for name in NEVER:  # the check means something only where they could be imported
        pytest.importorskip(name)
    port = _free_port()
    args = ["--model-path", str(tiny_bundle), "--cache-dir", str(tmp_path), "--device", "cpu"]
    args += ["--api-host", LOOPBACK, "--api-port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEP_AUDIO_", "AWS_"))}
    report = tmp_path / "stderr.txt"  # a file, not a pipe: the report is larger than a pipe's buffer
    with report.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", str(REPO / "api_server.py"), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=120) as http:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
                time.sleep(0.2)
            speech = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."})
            assert speech.status_code == 200, speech.text
            assert http.get("/ui/").status_code == 200
            assert http.get("/v1/audio/voices").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    modules = imported_modules(report.read_text())
    assert {"uvicorn", "gradio", "engine"} <= modules  # the report covers the whole run
    assert not modules & set(NEVER), sorted(modules & set(NEVER))
