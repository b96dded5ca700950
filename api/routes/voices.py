"""Voices: register (multipart clip + transcript), list, get, delete."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, UploadFile
from starlette.concurrency import run_in_threadpool

from api.admission import queues_a_job
from api.errors import ERROR_RESPONSES
from api.inputs import decode_audio_bytes
from api.limits import check_text
from api.schemas import VoiceCard, VoiceList
from api.state import AppState, Engine, ReadyEngine, State
from engine.voices import DEFAULT_VOICE_NAME, OPENAI_VOICES, Voice, validate_voice_name
from errors import InvalidInputError, NotFoundError

VoiceId = Annotated[str, Path(description="A registered voice's name, or an OpenAI voice name.", examples=["alloy"])]

router = APIRouter(prefix="/v1/voices", tags=["voices"], responses=ERROR_RESPONSES)  # the API key: api.admission


def _card(voice: Voice, aliases: list[str] | None = None) -> VoiceCard:
    return VoiceCard(
        id=voice.name,
        transcript=voice.transcript,
        seconds=round(voice.seconds, 3),
        sample_rate=voice.audio.sample_rate,
        source="builtin" if voice.builtin else "registered",
        aliases=aliases or [],
        created=voice.created,
    )


@router.get("")
async def list_voices(state: State) -> VoiceList:
    store = state.voices
    voices = await run_in_threadpool(store.voices)
    names = [v.name for v in voices]
    cards = [_card(v) for v in voices]
    if store.default_voice is not None:
        free = [a for a in OPENAI_VOICES if a not in names]
        cards.append(_card(store.default_voice, aliases=free))
    return VoiceList(data=cards)


@router.post("", status_code=201)
@queues_a_job
async def register_voice(
    state: State,
    engine: ReadyEngine,
    name: Annotated[str, Form(description="1-64 letters, digits, '-' or '_'.")],
    file: Annotated[UploadFile, File(description="The reference clip (any common audio format).")],
    transcript: Annotated[
        str | None,
        Form(
            description="What the clip says (Whisper fills it when auto-transcription is on); at most "
            "--max-input-chars characters."
        ),
    ] = None,
) -> VoiceCard:
    """Store a voice; its clip is tokenized once now, so later requests hit the cache."""
    data = await file.read()  # its size was bounded while the body streamed in (api.admission)
    return _card(await add_voice(state, engine, name, data, transcript))


async def add_voice(
    state: AppState,
    engine: Engine,
    name: str,
    data: bytes,
    transcript: str | None,
    *,
    file_param: str = "file",
    meta: dict[str, str] | None = None,
) -> Voice:
    """The one registration path (HTTP, OpenAI's Custom Voices, the web UI): checks, decode,
    transcription, tokenizing in the queue. ``meta`` is kept with the voice."""
    validate_voice_name(name)
    check_text("transcript", transcript, state.settings.max_input_chars)
    if name == DEFAULT_VOICE_NAME:
        raise InvalidInputError(f"{name!r} is reserved for the built-in voice", param="name")
    text = (transcript or "").strip()
    if not text and not engine.auto_transcribe:
        raise InvalidInputError(
            "a voice needs the transcript of its clip (or a server started with --enable-auto-transcribe)",
            param="transcript",
        )
    audio = await decode_audio_bytes(data, settings=state.settings, param=file_param)

    def register() -> Voice:
        heard = text or engine.transcribe(audio).strip()
        if not heard:
            raise InvalidInputError("no speech was recognised in the clip; give its transcript", param="transcript")
        return state.voices.register(name, audio, heard, prepare=engine.prepare_voice, meta=meta)

    voice, _ = await state.service.submit("voice", register)
    return voice


@router.get("/{voice_id}")
async def get_voice(state: State, voice_id: VoiceId) -> VoiceCard:
    with _by_id():
        voice = await run_in_threadpool(state.voices.resolve, voice_id)
    return _card(voice)


@router.delete("/{voice_id}")
async def delete_voice(state: State, voice_id: VoiceId) -> dict[str, object]:
    with _by_id():
        await run_in_threadpool(state.voices.delete, voice_id)
    return {"id": voice_id, "object": "voice", "deleted": True}


@contextmanager
def _by_id() -> Iterator[None]:
    """A voice addressed by its id in the path: an id that names no voice (unknown or not even a
    valid name) is 404, the same for GET and DELETE, not a bad request."""
    try:
        yield
    except InvalidInputError as exc:
        raise NotFoundError(str(exc)) from exc
