"""``WS /v1/audio/speech/stream``: text that arrives while it is spoken (docs/long-text.md, "WebSocket").

The protocol follows vLLM-Omni's streaming-text endpoint where it is documented. The client sends
JSON text frames:

    {"type": "session.config", ...}        the body of /v1/audio/speech (voice, response_format,
                                           step_audio, ...), first; may be sent again between utterances
    {"type": "input.text", "text": "..."}  a piece of text (an LLM's token deltas, say)
    {"type": "input.done"}                 the utterance's text is complete: speak the rest
    {"type": "session.close"}              end of the connection

and receives, for each utterance (the text between two ``input.done``), in order:

    {"type": "audio.start", "utterance_index", "sentence_index", "sentence_text", "format", "sample_rate"}
    binary frames: the audio in ``response_format`` (default pcm), as it is made
    {"type": "audio.done", "utterance_index", "sentence_index", "total_bytes", "start", "end", "truncated", "error"}
    ... the next segments ...
    {"type": "session.done", "utterance_index", "total_sentences", "truncated"}

and ``{"type": "error", "error": {OpenAI's envelope}}`` for a message it cannot take (the socket
stays open) or an utterance that fails. Segments are cut as sentences complete (``engine.text_stream``)
and each is generated while the next text is still arriving. The API key is checked at the
handshake (``Authorization: Bearer``, or the subprotocol ``openai-insecure-api-key.<key>`` for
browsers); an utterance is one job of the service queue (429 when it is full), started when its
first segment is known; closing the socket cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from api.admission import has_api_key
from api.audio_io import AudioFormat
from api.errors import error_body, error_body_of, validation_message
from api.pipeline import Audio, Caption, Finished, Started, run_job
from api.responses import SpeechEncoder
from api.schemas import SpeechRequest
from api.speech_requests import build_request
from api.state import AppState
from engine.segments import Segment
from engine.text_stream import SegmentFeed, TextCutter
from errors import InvalidInputError, StepAudioError, TooLargeError

router = APIRouter()
logger = logging.getLogger(__name__)

KEY_SUBPROTOCOL = "openai-insecure-api-key."
POLICY_VIOLATION = 1008


@dataclass
class _Utterance:
    """The text between two ``input.done``: cut into segments as it comes, spoken by one job."""

    index: int
    cutter: TextCutter
    config: SpeechRequest
    feed: SegmentFeed = field(default_factory=SegmentFeed)
    texts: list[str] = field(default_factory=list)  # the segments' texts, in order
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its first segment is known (or it is done)
    task: asyncio.Task[None] | None = None


class _Session:
    """One WebSocket connection: its messages in, its utterances' audio out, in order."""

    def __init__(self, ws: WebSocket, state: AppState) -> None:
        self.ws = ws
        self.state = state
        self.config: SpeechRequest | None = None
        self.open: _Utterance | None = None  # the utterance taking text now
        self.last_task: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.count = 0
        self.send_lock = asyncio.Lock()

    # --- sending ---------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ws.send_bytes(data)

    async def error(self, exc: Exception, *, utterance: int | None = None) -> None:
        if isinstance(exc, ValidationError):
            message, param = validation_message([dict(e) for e in exc.errors()])
            body = error_body(400, message, code="invalid_value", param=param)
        else:
            if not isinstance(exc, StepAudioError):
                logger.error("a speech stream failed", exc_info=exc)
            body = error_body_of(exc)
        extra = {} if utterance is None else {"utterance_index": utterance}
        await self.send({"type": "error", **body, **extra})

    # --- receiving --------------------------------------------------------------------------
    async def run(self) -> None:
        idle = self.state.settings.ws_idle_timeout_s
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(self.ws.receive_text(), timeout=idle)
                except TimeoutError:
                    await self.error(InvalidInputError(f"no message for {idle:g} s: closing the connection"))
                    break
                try:
                    if not await self.handle(raw):
                        break
                except (StepAudioError, ValidationError) as exc:
                    await self.error(exc)
            if self.open is not None:  # a close ends the open utterance's text; its audio still comes
                await self.finish_open()
            if self.last_task is not None:
                await self.last_task
        finally:
            self.cancel_all()

    async def handle(self, raw: str) -> bool:
        """One client message; False when the client ends the session."""
        try:
            message = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"a message is not valid JSON ({exc.msg})", param="message") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise InvalidInputError("a message is a JSON object with a string `type`", param="type")
        kind = message["type"]
        if kind == "session.config":
            if self.open is not None and self.open.texts:
                raise InvalidInputError("send session.config between utterances, after input.done", param="type")
            fields = {k: v for k, v in message.items() if k not in ("type", "stream_audio", "stream_format")}
            config = SpeechRequest.model_validate(fields)
            if config.step_audio.mode != "clone":
                raise InvalidInputError(
                    "the stream speaks text: step_audio.mode must be clone", param="step_audio.mode"
                )
            if config.step_audio.return_iterations:
                raise InvalidInputError("return_iterations answers JSON; it cannot stream", param="return_iterations")
            self.config = config
            if config.input:  # the config's own input is the utterance's first text
                await self.text(config.input)
        elif kind == "input.text":
            text = message.get("text")
            if not isinstance(text, str):
                raise InvalidInputError("input.text needs a string `text`", param="text")
            await self.text(text)
        elif kind == "input.done":
            await self.finish_open()
        elif kind == "session.close":
            return False
        else:
            raise InvalidInputError(
                f"unknown message type {kind!r}: session.config, input.text, input.done, session.close", param="type"
            )
        return True

    async def text(self, text: str) -> None:
        if self.config is None:
            raise InvalidInputError("send session.config first", param="type")
        utterance = self.open or self._new_utterance(self.config)
        limit = self.state.settings.max_input_chars
        if len(utterance.cutter.text) + len(text) > limit:
            raise TooLargeError(f"an utterance holds at most {limit} characters; send input.done first", param="text")
        for segment in utterance.cutter.feed(text):
            self._segment(utterance, segment)

    async def finish_open(self) -> None:
        utterance = self.open
        if utterance is None:
            if self.config is None:
                raise InvalidInputError("send session.config first", param="type")
            utterance = self._new_utterance(self.config)
        for segment in utterance.cutter.finish():
            self._segment(utterance, segment)
        utterance.feed.close()
        utterance.started.set()
        self.open = None

    def _new_utterance(self, config: SpeechRequest) -> _Utterance:
        engine = self.state.require_engine()
        cutter = TextCutter(count_tokens=engine.count_tokens, max_tokens=engine.segment_max_tokens)
        utterance = _Utterance(self.count, cutter, config)
        self.count += 1
        previous = self.last_task
        utterance.task = asyncio.create_task(self.speak(utterance, previous))
        self.last_task = utterance.task
        self.tasks.add(utterance.task)
        utterance.task.add_done_callback(self.tasks.discard)
        self.open = utterance
        return utterance

    @staticmethod
    def _segment(utterance: _Utterance, segment: Segment) -> None:
        utterance.texts.append(segment.text)
        utterance.feed.put(segment)
        utterance.started.set()

    # --- one utterance -------------------------------------------------------------------------
    async def speak(self, utterance: _Utterance, previous: asyncio.Task[None] | None) -> None:
        """Wait for the utterance before it and for its own first segment, then speak it."""
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        await utterance.started.wait()
        if not utterance.texts:  # an empty utterance: nothing to speak
            await self.send({"type": "session.done", "utterance_index": utterance.index, "total_sentences": 0})
            return
        try:
            await self._run(utterance)
        except WebSocketDisconnect:
            raise
        except Exception as exc:  # this utterance is over; the next text starts a new one
            utterance.feed.close()
            if self.open is utterance:
                self.open = None
            with contextlib.suppress(Exception):
                await self.error(exc, utterance=utterance.index)

    async def _run(self, utterance: _Utterance) -> None:
        state, config = self.state, utterance.config
        engine = state.require_engine()
        fmt: AudioFormat = config.response_format or "pcm"
        job = await build_request(state, engine, config.model_copy(update={"input": ""}), {}, text_arrives_later=True)
        encoder: SpeechEncoder | None = None  # made at Started, which comes before any audio
        sentence, sent, started = 0, 0, False
        index = utterance.index
        async for event in run_job(state, engine, job, stream=True, text=utterance.feed):
            if isinstance(event, Started):
                encoder = SpeechEncoder(fmt, event.info.sample_rate, sse=False)
            elif isinstance(event, Audio):
                assert encoder is not None
                if not started:
                    started = True
                    await self.send(
                        {
                            "type": "audio.start",
                            "utterance_index": index,
                            "sentence_index": sentence,
                            "sentence_text": utterance.texts[sentence],
                            "format": fmt,
                            "sample_rate": encoder.writer.sample_rate,
                        }
                    )
                data = await encoder.pieces(event.pieces)
                if data:
                    sent += len(data)
                    await self.send_bytes(data)
            elif isinstance(event, Caption):
                span = event.span
                await self.send(
                    {
                        "type": "audio.done",
                        "utterance_index": index,
                        "sentence_index": span.index,
                        "total_bytes": sent,
                        "start": span.start,
                        "end": span.end,
                        "truncated": span.cut_short,
                        "error": False,
                    }
                )
                sentence, sent, started = span.index + 1, 0, False
            elif isinstance(event, Finished):
                tail = await encoder.finish_audio() if encoder is not None else b""
                if tail:
                    await self.send_bytes(tail)
                await self.send(
                    {
                        "type": "session.done",
                        "utterance_index": index,
                        "total_sentences": len(event.result.segments),
                        "truncated": event.result.cut_short,
                    }
                )

    def cancel_all(self) -> None:
        """The connection is gone: every utterance's job stops (its text feed ends, its task is cancelled)."""
        if self.open is not None:
            self.open.feed.close()
        for task in list(self.tasks):
            task.cancel()


def _key_from_subprotocols(ws: WebSocket) -> tuple[str | None, str | None]:
    """The API key a browser sends as a subprotocol, and that subprotocol (to accept it by name)."""
    for proto in ws.scope.get("subprotocols", []):
        if proto.startswith(KEY_SUBPROTOCOL):
            return proto[len(KEY_SUBPROTOCOL) :], proto
    return None, None


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(ws: WebSocket) -> None:
    """Text in, speech out, on one connection (see the module docstring)."""
    state: AppState = ws.app.state.step_audio
    key = state.settings.api_key.get_secret_value() if state.settings.api_key else None
    given, subprotocol = _key_from_subprotocols(ws)
    if key is not None:
        header_ok = has_api_key(ws.headers.get("authorization", ""), key)
        proto_ok = given is not None and hmac.compare_digest(given.encode(), key.encode())
        if not (header_ok or proto_ok):
            await ws.close(code=POLICY_VIOLATION, reason="a valid API key is required")
            return
    await ws.accept(subprotocol=subprotocol)
    session = _Session(ws, state)
    try:
        state.require_engine()
        await session.run()
    except WebSocketDisconnect:
        session.cancel_all()
        return
    except StepAudioError as exc:  # models still loading
        await session.error(exc)
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await ws.close()
