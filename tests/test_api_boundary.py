"""The HTTP boundary against hostile or careless clients: what is refused before a body is read,
audio that is small in bytes but long in time, text that is not text, and an OpenAPI document
that says what the server really answers.

Raw sockets count the body bytes a client managed to send before the answer came: a refusal
decided from the headers must arrive while almost all of a large body is still unsent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import select
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.api_live import LOOPBACK, LiveServer, live_server
from tests.test_audio import flac_bomb

KEY = "boundary-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_UPLOAD = 1 << 20
BIG = 64 << 20  # a body far larger than any socket buffers on the way
CHUNK = 1 << 16


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_bundle,
        tmp_path_factory,
        "boundary-cache",
        api_key=KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_audio_seconds=60.0,
        queue_size=1,
        inference_workers=1,
        enable_auto_transcribe=False,
    )


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


class Answer:
    """What a raw-socket client saw: the status, headers, JSON body, and the body bytes it sent."""

    def __init__(self, raw: bytes, sent: int) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.json = json.loads(body) if body else None
        self.sent = sent


def exchange(port: int, head: str, body: Iterable[bytes], *, wait_s: float = 20.0) -> Answer:
    """Send ``head`` then ``body`` until the server answers; then read the answer.

    Each send waits for the socket to be writable or readable: readable means the server has
    answered, and the client stops sending there, as a real client would.
    """
    sock = socket.create_connection((LOOPBACK, port))
    sent = 0
    try:
        sock.sendall(head.encode("latin-1"))
        sock.setblocking(False)
        answered = False
        for chunk in body:
            view = memoryview(chunk)
            while view and not answered:
                readable, writable, _ = select.select([sock], [sock], [], wait_s)
                if readable:
                    answered = True
                elif writable:
                    try:
                        n = sock.send(view)
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True
                        break
                    sent += n
                    view = view[n:]
            if answered:
                break
        sock.setblocking(True)
        sock.settimeout(wait_s)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _content_length(raw):
            try:
                data = sock.recv(CHUNK)
            except ConnectionResetError:
                break
            if not data:
                break
            raw += data
    finally:
        sock.close()
    assert raw, f"no answer after sending {sent} body bytes"
    return Answer(raw, sent)


def _content_length(raw: bytes) -> int:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def request_head(method: str, path: str, headers: dict[str, str]) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


def zeros(total: int) -> Iterator[bytes]:
    block = bytes(CHUNK)
    for start in range(0, total, CHUNK):
        yield block[: min(CHUNK, total - start)]


def chunked(parts: Iterable[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked framing (no Content-Length: the server can only count)."""
    for part in parts:
        if part:
            yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


# --- refused before the body is read ----------------------------------------------------------


def test_401_comes_before_the_body_is_read(server: LiveServer) -> None:
    head = request_head("POST", "/v1/audio/speech", {"Content-Type": "application/json", "Content-Length": str(BIG)})
    answer = exchange(server.port, head, zeros(BIG))
    assert answer.status == 401 and answer.json["error"]["type"] == "authentication_error"
    assert answer.sent < BIG // 4, f"the client sent {answer.sent} of {BIG} bytes before its 401"


def test_401_wins_over_a_malformed_or_unfinished_body(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        r = anon.post("/v1/audio/speech", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        r = anon.post("/v1/voices", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 401, r.text
    # the body is announced but never finished: the answer cannot depend on it
    head = request_head("POST", "/v1/audio/speech", {"Content-Type": "application/json", "Content-Length": "1000"})
    assert exchange(server.port, head, [b'{"input": '], wait_s=10).status == 401


def test_413_by_content_length_before_the_body_is_read(server: LiveServer) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(BIG)}
    answer = exchange(server.port, request_head("POST", "/v1/audio/speech", headers), zeros(BIG))
    assert answer.status == 413 and answer.json["error"]["code"] == "too_large"
    assert answer.sent < BIG // 4, f"the client sent {answer.sent} of {BIG} bytes before its 413"


def test_413_as_soon_as_one_uploaded_file_passes_its_limit(server: LiveServer) -> None:
    boundary = "b0undary"
    payload = json.dumps({"step_audio": {"mode": "denoise"}})
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="payload"\r\n\r\n{payload}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="input_audio_file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"}
    body = chunked([start, *zeros(BIG), f"\r\n--{boundary}--\r\n".encode()])
    answer = exchange(server.port, request_head("POST", "/v1/audio/speech/upload", headers), body)
    assert answer.status == 413, answer.json
    assert answer.json["error"]["param"] == "input_audio_file"
    assert answer.sent < BIG // 4, f"the client sent {answer.sent} of {BIG} bytes before its 413"


def test_a_full_queue_is_429_before_the_body_is_read(server: LiveServer, http: httpx.Client) -> None:
    service = server.app.state.step_audio.service
    gate = threading.Event()

    def occupy() -> None:
        asyncio.run(service.submit("test", lambda: gate.wait(60)))

    holders: list[threading.Thread] = []
    try:
        for running, queued in ((1, 0), (1, 1)):  # one job runs, one waits: the queue (1) is full
            holders.append(threading.Thread(target=occupy, daemon=True))
            holders[-1].start()
            for _ in range(400):
                if (service.running, service.queued) == (running, queued):
                    break
                gate.wait(0.05)
            assert (service.running, service.queued) == (running, queued)
        # an unfinished JSON body and a voice upload: refused from the headers alone
        headers = {**AUTH, "Content-Type": "application/json", "Content-Length": "100000"}
        answer = exchange(server.port, request_head("POST", "/v1/audio/speech", headers), [b'{"inp'], wait_s=10)
        assert answer.status == 429 and int(answer.headers["retry-after"]) >= 1
        assert answer.json["error"]["type"] == "rate_limit_error"
        headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": "100000"}
        assert exchange(server.port, request_head("POST", "/v1/voices", headers), [b"--x"], wait_s=10).status == 429
        assert http.get("/v1/voices").status_code == 200  # reads are not queued
    finally:
        gate.set()
        for t in holders:
            t.join(30)


def test_head_is_served_where_get_is_and_its_401_carries_the_envelopes_headers(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        get, head = anon.get("/metrics"), anon.head("/metrics")
        assert anon.head("/healthz").status_code == 200  # liveness probes may use HEAD
    assert get.status_code == head.status_code == 401
    assert get.json()["error"]["type"] == "authentication_error" and get.json()["error"]["code"] == "invalid_api_key"
    assert head.content == b""  # HTTP: an answer to HEAD has no body; its headers are the GET's
    for name in ("content-type", "content-length", "www-authenticate"):
        assert head.headers[name] == get.headers[name], name
    assert int(head.headers["content-length"]) == len(get.content)
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as http:
        get, head = http.get("/metrics"), http.head("/metrics")
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


# --- long audio in few bytes, text that is not text -------------------------------------------


def test_a_flac_bomb_upload_is_413(http: httpx.Client) -> None:
    bomb = flac_bomb(hours=2.0)
    assert len(bomb) < MAX_UPLOAD
    r = http.post(
        "/v1/audio/speech/upload",
        data={"payload": json.dumps({"step_audio": {"mode": "denoise"}})},
        files={"input_audio_file": ("bomb.flac", bomb)},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "input_audio_file" and "60 s" in r.json()["error"]["message"]
    b64 = base64.b64encode(bomb).decode()
    r = http.post("/v1/audio/speech", json={"step_audio": {"mode": "denoise", "input_audio_base64": b64}})
    assert r.status_code == 413 and r.json()["error"]["param"] == "step_audio.input_audio_base64"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "\ud800", "voice": "alloy"}, "input"),
        ({"input": "a", "voice": "alloy", "step_audio": {"prompt_text": "x\udfff"}}, "step_audio.prompt_text"),
        ({"input": "a", "voice": {"id": "\ud800"}}, "voice"),
        ({"input": "a", "voice": "alloy", "instructions": "\udc00"}, "instructions"),
        (
            {"input": "a", "voice": "alloy", "step_audio": {"edits": [{"mode": "paralinguistic", "text": "\ud800"}]}},
            "step_audio.edits[0].text",
        ),
    ],
)
def test_a_lone_surrogate_in_any_text_field_is_400(http: httpx.Client, body: dict, param: str) -> None:
    # json.dumps writes the surrogate as the escape "\ud800": valid JSON, not valid text
    r = http.post("/v1/audio/speech", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param) and "surrogate" in r.json()["error"]["message"]


# --- the contract -------------------------------------------------------------------------------


def test_openapi_declares_every_answer_and_no_422(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})
    for path in ("/v1/audio/speech", "/v1/audio/speech/upload"):
        answers = doc["paths"][path]["post"]["responses"]
        content = answers["200"]["content"]
        assert {"text/event-stream", "application/json", "audio/wav", "audio/mpeg", "audio/pcm"} <= set(content)
        assert content["application/json"]["schema"]["$ref"].endswith("/IterationsResponse")
        assert {"400", "401", "413", "429", "503"} <= set(answers)


def test_405_allow_lists_every_method_of_the_path(http: httpx.Client) -> None:
    r = http.put("/v1/voices", json={})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert [m.strip() for m in r.headers["allow"].split(",")] == ["GET", "HEAD", "POST"]
    r = http.post("/v1/voices/alloy")
    assert r.status_code == 405 and [m.strip() for m in r.headers["allow"].split(",")] == ["DELETE", "GET", "HEAD"]


@pytest.mark.parametrize("voice_id", ["no-such-voice", "a.b", "..", "x" * 80, "%C3%A9"])
def test_get_and_delete_of_an_unknown_or_odd_voice_id_are_404(http: httpx.Client, voice_id: str) -> None:
    for method in ("GET", "DELETE"):
        r = http.request(method, f"/v1/voices/{voice_id}")
        assert r.status_code == 404, (method, voice_id, r.text)
        assert r.json()["error"]["code"] == "not_found"
