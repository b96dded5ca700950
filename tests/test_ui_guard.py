"""The web UI's guard through the real server: only the page's routes, only its uploads, clean errors, the login.

Every request here goes over loopback to uvicorn serving ``api.create_app`` with the real engine
on the tiny bundle, as a browser's or a prober's would (issue 19: an outside probe read server
files through the UI, hung the server on ``/dev/zero``, got 500s with tracebacks from Gradio's
routes, and tried 100 keys in 0.14 s).
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio.utils
import httpx
import pytest
import soundfile as sf

from api.ui_guard import PAGE_ROUTES, UploadedFiles
from errors import InvalidInputError, TooLargeError
from tests.api_live import LOOPBACK, LiveServer, test_settings
from tests.ui_page import PageError, UiPage

REPO = Path(__file__).resolve().parents[1]
VOICE_WAV = REPO / "engine" / "default_voice" / "voice.wav"
VOICE_TEXT = (REPO / "engine" / "default_voice" / "transcript.txt").read_text().strip()
LIMIT = 400_000  # the servers' --max-upload-bytes: the default voice's clip (207 kB) fits, twice it does not
KEY = "s3cret-ui-key"
ANSWER_S = 2.0  # a refusal is a stat and a sentence; reading /dev/zero would never answer


def envelope(response: httpx.Response | http.client.HTTPResponse, body: bytes | None = None) -> dict[str, Any]:
    """The OpenAI error object of a response (fails the test when the body is not one)."""
    data = json.loads(body if body is not None else response.read())  # type: ignore[union-attr]
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], data
    return error


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    cache = tmp_path_factory.mktemp("ui-guard-cache")
    settings = test_settings(tiny_bundle, cache, enable_auto_transcribe=False, max_upload_bytes=LIMIT)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    cache = tmp_path_factory.mktemp("ui-guard-key-cache")
    settings = test_settings(tiny_bundle, cache, enable_auto_transcribe=False, api_key=KEY)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture
def page(server: LiveServer) -> Iterator[UiPage]:
    with UiPage(server.url) as session:
        yield session


# --- the probe's requests --------------------------------------------------------------------

PROBED = [
    # the file read: the clone event called by name with a server path as its clip
    (
        "POST",
        "/ui/gradio_api/call/clone",
        b'{"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "default", "", "Hi.", "base",'
        b' 1.0, "", "wav"]}',
    ),
    ("POST", "/ui/gradio_api/call/v2/0", b"{}"),  # KeyError: '/0'
    ("POST", "/ui/gradio_api/call/0", b'{"data": []}'),  # FnIndexInferError
    ("HEAD", "/ui/?deep_link=%C3%AB%40%3B7&page=i%C3%83%C2%B3", None),  # KeyError
    ("GET", "/ui/?deep_link=%C3%AB%40%3B7&page=i%C3%83%C2%B3", None),
    ("GET", "/ui/gradio_api/proxy=%1Cxd", None),
    ("POST", "/ui/gradio_api/queue/join", b"{}"),
    ("POST", "/ui/gradio_api/queue/join", b'{"data": [], "session_hash": "x"}'),
    ("POST", "/ui/gradio_api/queue/join", b'{"data": [], "fn_index": 99, "session_hash": "x"}'),
    ("POST", "/ui/gradio_api/queue/join", b"[1, 2"),
    ("POST", "/ui/gradio_api/run/0", b'{"data": []}'),
    ("POST", "/ui/gradio_api/api/0", b'{"data": []}'),
    ("GET", "/ui/gradio_api/info", None),
    ("GET", "/ui/gradio_api/openapi.json", None),
    ("GET", "/ui/openapi.json", None),
    ("GET", "/ui/gradio_api/startup-events", None),
    ("POST", "/ui/gradio_api/component_server", b"{}"),
    ("GET", "/ui/gradio_api/queue/data?session_hash=nobody", None),
    ("GET", "/ui/config?page=nowhere", None),
    ("PUT", "/ui/gradio_api/upload", b""),
]


def test_the_probed_requests_get_4xx_envelopes_and_the_connection_stays_open(server: LiveServer) -> None:
    """One keep-alive connection for all of them: after a 500 uvicorn would have closed it."""
    conn = http.client.HTTPConnection(LOOPBACK, int(server.url.rsplit(":", 1)[1]), timeout=30)
    try:
        conn.connect()
        sock = conn.sock
        for method, path, body in PROBED:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            assert 400 <= response.status < 500, (method, path, response.status, data)
            if method != "HEAD":
                envelope(response, data)
            assert not response.will_close and conn.sock is sock, (method, path)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()


# --- files: only the page's uploads -----------------------------------------------------------


def _file_events(page: UiPage, clip: Any) -> list[tuple[str, int, list[Any]]]:
    """Every event of the page that takes a file, with ``clip`` as its file and valid other inputs."""
    return [
        ("clone", page.fn_index("clone-run"), [clip, "default", "", "Hi.", "base", 1.0, "", "wav"]),
        ("edit", page.fn_index("edit-run"), [clip, "denoise", None, "", "", 1, "base", 1.0, "", "wav"]),
        ("register", page.fn_index("voice-register"), ["probe", clip, "Hi."]),
        ("transcribe", page.fn_index("clone-transcribe"), [clip]),
        ("transcribe-edit", page.fn_index("edit-transcribe"), [clip]),
    ]


def _file(path: str | None, **extra: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"meta": {"_type": "gradio.FileData"}, **extra}
    if path is not None:
        value["path"] = path
    return value


@pytest.fixture
def upload_dir() -> Iterator[Path]:
    """A fresh folder inside Gradio's upload directory, where files the page did not upload are planted."""
    root = Path(gradio.utils.get_upload_folder())
    folder = root / f"planted-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    yield folder
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


def _voice_file(server: LiveServer) -> str:
    """A file of the voice store: a registered voice's file inside the voices directory."""
    with VOICE_WAV.open("rb") as clip:
        response = httpx.post(
            f"{server.url}/v1/voices",
            data={"name": f"stored-{uuid.uuid4().hex[:6]}", "transcript": VOICE_TEXT},
            files={"file": ("voice.wav", clip, "audio/wav")},
            timeout=120,
        )
    assert response.status_code in (200, 201), response.text
    return str(next(p for p in (Path(server.settings.cache_dir) / "voices").rglob("*") if p.is_file()))


TARGETS = [
    "/dev/zero",
    "/proc/self/environ",
    "/etc/passwd",
    "DEFAULT_VOICE_WAV",
    "VOICE_STORE_FILE",
    "FIFO_OUTSIDE",
    "FIFO_IN_UPLOADS",
    "SYMLINK_IN_UPLOADS",
    "UPLOADS/../../etc/passwd",
    "file:///etc/passwd",
    "https://example.com/a.wav",
    "engine/default_voice/voice.wav",
    "URL_ONLY",
    "",
]


@pytest.mark.parametrize("target", TARGETS)
def test_a_file_the_page_did_not_upload_is_refused_before_any_read(
    target: str, server: LiveServer, page: UiPage, upload_dir: Path, tmp_path: Path
) -> None:
    fifo: Path | None = None
    clip: dict[str, Any]
    if target == "DEFAULT_VOICE_WAV":
        clip = _file(str(VOICE_WAV))
    elif target == "VOICE_STORE_FILE":
        clip = _file(_voice_file(server))
    elif target.startswith("FIFO_"):
        fifo = (upload_dir if target == "FIFO_IN_UPLOADS" else tmp_path) / "clip.wav"
        os.mkfifo(fifo)
        clip = _file(str(fifo))
    elif target == "SYMLINK_IN_UPLOADS":
        (upload_dir / "clip.wav").symlink_to("/etc/passwd")
        clip = _file(str(upload_dir / "clip.wav"))
    elif target.startswith("UPLOADS/"):
        clip = _file(str(upload_dir) + target.removeprefix("UPLOADS"))
    elif target == "URL_ONLY":
        clip = _file(None, url=f"{server.url}/healthz")
    else:
        clip = _file(target)
    for name, fn_index, data in _file_events(page, clip):
        started = time.monotonic()
        response = page.join(fn_index, data)
        took = time.monotonic() - started
        assert response.status_code == 400, (name, response.status_code, response.text)
        error = envelope(response, response.content)
        assert "only files uploaded through its page" in error["message"], (name, error)
        assert took < ANSWER_S, (name, took)
        assert "root:" not in response.text and "PATH=" not in response.text
    if fifo is not None:  # nobody opened it to read: opening its write end without a reader fails
        with pytest.raises(OSError) as info:
            os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        assert info.value.errno == errno.ENXIO
    assert httpx.get(f"{server.url}/healthz", timeout=ANSWER_S).status_code == 200


def test_a_file_in_the_uploads_over_the_limit_is_refused_before_reading(page: UiPage, upload_dir: Path) -> None:
    big = upload_dir / "big.wav"
    big.write_bytes(VOICE_WAV.read_bytes() * 2)  # a readable WAV header, past the 400 kB limit
    for name, fn_index, data in _file_events(page, _file(str(big))):
        response = page.join(fn_index, data)
        assert response.status_code == 413, (name, response.text)
        assert envelope(response, response.content)["code"] == "too_large"


def test_the_upload_itself_is_capped(page: UiPage, tmp_path: Path) -> None:
    big = tmp_path / "big.wav"
    big.write_bytes(VOICE_WAV.read_bytes() * 2)
    response = page.http.post("/gradio_api/upload", files=[("files", (big.name, big.read_bytes()))])
    assert response.status_code == 413
    envelope(response, response.content)


def test_a_clip_uploaded_through_the_page_still_clones_and_registers(page: UiPage) -> None:
    clip = page.upload(VOICE_WAV)
    _live, out, summary, _ = page.run("clone-run", clip, "default", VOICE_TEXT, "Hello.", "base", 1.0, "3", "wav")
    samples, sample_rate = sf.read(io.BytesIO(page.fetch(out)))
    assert sample_rate == 24000 and len(samples) > 0 and "**seed** 3" in summary
    message, *_ = page.run("voice-register", f"up-{uuid.uuid4().hex[:6]}", page.upload(VOICE_WAV), VOICE_TEXT)
    assert "Registered" in message


@pytest.mark.parametrize(
    ("index", "value"),
    [(3, 5), (3, {"x": 1}), (4, "no-such-variant"), (5, "1.0"), (5, 99.0), (5, None), (7, "pcm"), (1, ["default"])],
)
def test_an_input_the_page_cannot_send_is_a_400_not_a_traceback(
    page: UiPage, index: int, value: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    data: list[Any] = [None, "default", "", "Hi.", "base", 1.0, "", "wav"]
    data[index] = value
    response = page.join(page.fn_index("clone-run"), data)
    assert response.status_code == 400, response.text
    assert envelope(response, response.content)["param"] == f"data[{index}]"
    assert "Traceback" not in capfd.readouterr().err


def test_null_from_a_hidden_text_box_is_what_the_page_sends_and_is_answered_without_a_traceback(
    page: UiPage, capfd: pytest.CaptureFixture[str]
) -> None:
    clip = page.upload(VOICE_WAV)
    # the edit tab's hidden boxes (tagged text, here the transcript too) send null, as the browser does
    result = page.run("edit-run", clip, "denoise", None, None, None, 1, "base", 1.0, "2", "wav")
    assert "iterations" in result[-2]
    with pytest.raises(PageError, match="clone needs the text"):  # the API's sentence, not a crash
        page.run("clone-run", None, "default", None, None, "base", 1.0, "", "wav")
    assert "Traceback" not in capfd.readouterr().err


def test_uploaded_files_reads_only_regular_files_in_its_root_within_the_limit(tmp_path: Path) -> None:
    """The handlers' own check (after the guard's): decided on the opened file, never blocking."""
    root = tmp_path / "uploads"
    root.mkdir()
    files = UploadedFiles(root, max_bytes=LIMIT)
    good = root / "a.wav"
    good.write_bytes(VOICE_WAV.read_bytes())
    assert files.read(str(good), "file") == VOICE_WAV.read_bytes()
    os.mkfifo(root / "fifo.wav")
    (root / "link.wav").symlink_to(good)  # even to an upload: the opened file must be the named one
    (root / "big.wav").write_bytes(b"\0" * (LIMIT + 1))
    for path in (root / "fifo.wav", "/dev/zero", tmp_path / "outside.wav", root):
        with pytest.raises(InvalidInputError):
            files.read(str(path), "file")
    with pytest.raises(TooLargeError):
        files.read(str(root / "big.wav"), "file")
    assert files.read(str(root / "link.wav"), "file") == good.read_bytes()  # resolves inside: the target is read


# --- the key: the login in front of everything that runs work --------------------------------


def _sample(template: str) -> str:
    values = {"{path:path}": "x", "{session_hash}": "s", "{run}": "r", "{component_id:int}": "1", "{segment}": "a.aac"}
    for name, value in values.items():
        template = template.replace(name, value)
    return f"/ui{template}"


def test_with_a_key_every_route_that_runs_work_needs_the_login(keyed: LiveServer) -> None:
    gated = [r for r in PAGE_ROUTES if r.login]
    assert {r.template for r in gated} >= {"/gradio_api/queue/join", "/gradio_api/upload", "/gradio_api/cancel"}
    with httpx.Client(base_url=keyed.url, timeout=30) as anonymous:
        for route in gated:
            for method in route.methods:
                response = anonymous.request(method, _sample(route.template), json={})
                assert response.status_code == 401, (method, route.template, response.status_code)
                if method != "HEAD":
                    assert envelope(response, response.content)["code"] == "login_required"
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and "auth_required" in page.text  # the login form, not the app
        assert anonymous.get("/ui/gradio_api/startup-events").status_code == 404  # not the page's: no route
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert anonymous.get("/ui/config", headers=bearer).status_code == 401  # the UI's door is its login
    with UiPage(keyed.url, key=KEY) as session:  # logged in, the page works
        entries, *_ = session.run("cache-refresh")  # the cache tab's numbers
        assert isinstance(entries, int)
        assert session.http.get("/gradio_api/startup-events").status_code == 404


def _login(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/ui/login", data={"username": "someone", "password": key})


def test_wrong_keys_are_throttled_per_client_address(keyed: LiveServer) -> None:
    with (
        httpx.Client(base_url=keyed.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.5")) as a,
        httpx.Client(base_url=keyed.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.6")) as b,
    ):
        statuses = [_login(a, f"guess-{i}").status_code for i in range(100)]
        counts = Counter(statuses)
        assert statuses[:3] == [400, 400, 400]  # three typos are checked at once
        assert counts == {400: 3, 429: 97}, counts  # then the address waits: 3 keys checked, not 100
        locked = _login(a, KEY)
        assert locked.status_code == 429  # even the right key waits out the lockout
        retry = int(locked.headers["Retry-After"])
        assert retry == 1 and envelope(locked, locked.content)["code"] == "too_many_login_attempts"
        assert _login(b, "typo").status_code == 400  # another address is not locked out
        assert _login(b, KEY).status_code == 200
        time.sleep(retry)
        assert _login(a, "guess-again").status_code == 400  # checked after the wait ...
        doubled = _login(a, KEY)
        assert doubled.status_code == 429 and int(doubled.headers["Retry-After"]) == 2  # ... and the next wait doubles
        time.sleep(2)
        assert _login(a, KEY).status_code == 200  # the right key after the wait logs in


def test_concurrent_wrong_keys_gain_nothing(keyed: LiveServer) -> None:
    statuses: list[int] = []
    gate = threading.Barrier(20)

    def guess(i: int) -> None:
        transport = httpx.HTTPTransport(local_address="127.0.0.7")
        with httpx.Client(base_url=keyed.url, timeout=30, transport=transport) as client:
            gate.wait()
            statuses.append(_login(client, f"parallel-{i}").status_code)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(statuses)
    assert counts[400] <= 3 and counts[400] + counts[429] == 20, counts
