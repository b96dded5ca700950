"""``WS /v1/audio/speech/stream`` through the real server: text in small deltas, audio out in order.

A real uvicorn server on loopback with the real engine (tiny bundle), and the ``websockets``
client. The text is sent word by word at about 20 tokens/s, as an LLM would stream it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.api_live import LiveServer, live_server, test_settings

WORDS_PER_S = 15  # about 20 tokens/s
TEXT = " ".join(f"Sentence number {k} tells a short story about the weather on day {k}." for k in range(1, 9))
KEY = "stream-test-key"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_bundle,
        tmp_path_factory,
        "ws-cache",
        max_new_tokens=40,
        enable_auto_transcribe=False,
        segment_max_tokens=16,
        ws_idle_timeout_s=30,
        ui=False,
    )


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/audio/speech/stream"


def config(**extra: object) -> str:
    return json.dumps({"type": "session.config", "voice": "alloy", "response_format": "pcm"} | extra)


def receive_until_done(ws: ClientConnection, timeout: float = 120) -> tuple[list[dict], list[tuple[float, bytes]]]:
    """Every JSON event and every binary frame (with its arrival time) up to ``session.done``."""
    events: list[dict] = []
    frames: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = ws.recv(timeout=deadline - time.monotonic())
        if isinstance(message, bytes):
            frames.append((time.monotonic(), message))
            continue
        event = json.loads(message)
        events.append(event)
        if event["type"] in ("session.done", "error"):
            break
    return events, frames


def test_audio_starts_before_the_text_ends_and_comes_in_order(server: LiveServer) -> None:
    with connect(ws_url(server)) as ws:
        ws.send(config(step_audio={"seed": 3}))
        last_delta: list[float] = []

        def send_text() -> None:
            for word in TEXT.split(" "):
                ws.send(json.dumps({"type": "input.text", "text": word + " "}))
                time.sleep(1 / WORDS_PER_S)
            last_delta.append(time.monotonic())
            ws.send(json.dumps({"type": "input.done"}))

        sender = threading.Thread(target=send_text)
        sender.start()
        events, frames = receive_until_done(ws)
        sender.join()
    assert frames, "no audio arrived"
    assert frames[0][0] < last_delta[0], "the first audio came only after the whole text"
    starts = [e for e in events if e["type"] == "audio.start"]
    dones = [e for e in events if e["type"] == "audio.done"]
    assert len(starts) == len(dones) >= 4  # several segments
    assert [e["sentence_index"] for e in starts] == [e["sentence_index"] for e in dones] == list(range(len(starts)))
    assert " ".join(e["sentence_text"] for e in starts) == TEXT  # every word, in order
    spans = [(e["start"], e["end"]) for e in dones]
    assert all(a[1] < b[0] for a, b in pairwise(spans))  # in order, a pause between
    total = sum(len(data) for _, data in frames)
    assert total == spans[-1][1] * 2  # pcm: 2 bytes per sample, the last segment's end is the audio's end
    assert events[-1] == {
        "type": "session.done",
        "utterance_index": 0,
        "total_sentences": len(starts),
        "truncated": events[-1]["truncated"],
    }


def test_a_bad_message_gets_an_error_and_the_socket_stays_sane(server: LiveServer) -> None:
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "input.text", "text": "no config yet"}))
        assert json.loads(ws.recv(timeout=30))["error"]["message"].startswith("send session.config first")
        ws.send("not json")
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        ws.send(json.dumps({"type": "bogus"}))
        assert json.loads(ws.recv(timeout=30))["error"]["param"] == "type"
        ws.send(config(voice="nobody-has-this-voice"))
        ws.send(json.dumps({"type": "input.text", "text": "Hello there. "}))
        ws.send(json.dumps({"type": "input.done"}))
        failed, _ = receive_until_done(ws)
        assert failed[-1]["type"] == "error" and failed[-1]["error"]["param"] == "voice"
        ws.send(config())  # the same socket, a good config: it speaks
        ws.send(json.dumps({"type": "input.text", "text": "It works again. Yes."}))
        ws.send(json.dumps({"type": "input.done"}))
        events, frames = receive_until_done(ws)
    assert events[-1]["type"] == "session.done" and events[-1]["utterance_index"] == 1 and frames


def test_closing_the_socket_cancels_the_generation(server: LiveServer) -> None:
    state = server.app.state.step_audio
    scheduler = state.engine.synthesizer.schedulers["base"]
    with connect(ws_url(server)) as ws:
        ws.send(config())
        ws.send(json.dumps({"type": "input.text", "text": TEXT}))  # no input.done: the utterance stays open
        while not isinstance(ws.recv(timeout=60), bytes):  # the first audio
            pass
    deadline = time.monotonic() + 30
    while state.service.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.service.running == 0 and scheduler.running == 0
    steps = scheduler.steps
    time.sleep(0.5)
    assert scheduler.steps == steps  # the decode loop stopped for it


def test_the_api_key_guards_the_socket(tiny_bundle: Path, tmp_path: Path) -> None:
    settings = test_settings(tiny_bundle, tmp_path / "cache", enable_auto_transcribe=False, api_key=KEY, ui=False)
    with LiveServer(settings) as live:
        with pytest.raises(InvalidStatus):
            connect(ws_url(live)).close()
        with connect(ws_url(live), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            ws.send(config())
            ws.send(json.dumps({"type": "input.done"}))
            assert json.loads(ws.recv(timeout=30))["type"] == "session.done"
        with connect(ws_url(live), subprotocols=[f"openai-insecure-api-key.{KEY}"]) as ws:  # what a browser can send
            assert ws.subprotocol == f"openai-insecure-api-key.{KEY}"
