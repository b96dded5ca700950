"""OpenAI's Custom Voices API: ``/v1/audio/voice_consents`` and ``/v1/audio/voices``.

The official SDKs' ``client.audio.voice_consents`` (create, retrieve, update, list, delete) and
``client.audio.voices`` (create, delete) work unchanged; a created voice's id is what
``speech.create(voice={"id": ...})`` names. The shapes are OpenAI's; vLLM-Omni's voices API
differs in places, and what costs nothing is accepted too: ``ref_text`` as the transcript,
``speaker_description``, deleting by name, and its ``voices`` / ``uploaded_voices`` keys beside
OpenAI's ``data`` in the listing. Where the two conflict (the create answer), OpenAI's wins.

Our clone needs the transcript of the sample: OpenAI's form has no field for it, so it comes
from an extra form field (``transcript``, or vLLM-Omni's ``ref_text``; with the SDK,
``extra_body={"transcript": ...}``) or from Whisper when auto-transcription is on, else a 400
that says so. Everything lives in the voice store (``engine.custom_voices``), so with
``--store-url`` a voice created through one replica is spoken by every other.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.admission import queues_a_job
from api.errors import ERROR_RESPONSES
from api.inputs import decode_audio_bytes
from api.json_body import read_json
from api.limits import check_text
from api.openapi import json_body
from api.routes.voices import add_voice
from api.state import AppState, ReadyEngine, State
from engine.custom_voices import (
    CONSENTS,
    MAX_LABEL_CHARS,
    Consent,
    ConsentStore,
    check_label,
    check_language,
    new_voice_id,
)
from engine.voices import Voice
from errors import InvalidInputError, NotFoundError

router = APIRouter(prefix="/v1/audio", tags=["custom voices"], responses=ERROR_RESPONSES)

ConsentId = Annotated[str, Path(description="A consent recording's id.", examples=["cons_0123456789abcdef01234567"])]
VoiceId = Annotated[str, Path(description="A voice's id (or, as vLLM-Omni, its name).", examples=["voice_1234"])]
LABEL = Field(min_length=1, max_length=MAX_LABEL_CHARS)


class VoiceConsent(BaseModel):
    id: str
    object: Literal["audio.voice_consent"] = "audio.voice_consent"
    created_at: int
    language: str
    name: str


class VoiceConsentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceConsent]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VoiceConsentDeleted(BaseModel):
    id: str
    object: Literal["audio.voice_consent"] = "audio.voice_consent"
    deleted: bool = True


class ConsentUpdate(BaseModel):
    name: Annotated[str, LABEL]


class AudioVoice(BaseModel):
    """OpenAI's ``audio.voice``, plus the consent it was made with."""

    id: str
    object: Literal["audio.voice"] = "audio.voice"
    created_at: int
    name: str
    type: Literal["audio_sample"] = "audio_sample"
    consent: str | None = None


class UploadedVoice(BaseModel):
    """vLLM-Omni's entry in ``uploaded_voices``."""

    name: str
    id: str
    consent: str | None = None
    created_at: int


class AudioVoiceList(BaseModel):
    """OpenAI's list shape; ``voices`` and ``uploaded_voices`` are vLLM-Omni's keys for the same voices."""

    object: Literal["list"] = "list"
    data: list[AudioVoice]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
    voices: list[str] = Field(description="Every voice name a speech request may use (vLLM-Omni).")
    uploaded_voices: list[UploadedVoice] = Field(description="The registered voices (vLLM-Omni).")


class AudioVoiceDeleted(BaseModel):
    id: str
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    deleted: bool = True


def _consents(state: AppState) -> ConsentStore:
    return ConsentStore(state.voices.store.child(CONSENTS))


def _consent(c: Consent) -> VoiceConsent:
    return VoiceConsent(id=c.id, created_at=c.created_at, language=c.language, name=c.name)


def _voice(v: Voice) -> AudioVoice:
    label, consent = v.meta.get("label", v.name), v.meta.get("consent")
    return AudioVoice(id=v.name, created_at=v.created or 0, name=label, consent=consent)


# --- consents --------------------------------------------------------------------------------------


@router.post("/voice_consents", status_code=201)
async def create_consent(
    state: State,
    name: Annotated[str, Form(description="A label for the recording.")],
    language: Annotated[str, Form(description="BCP 47 tag of the consent phrase, e.g. en-US.")],
    recording: Annotated[UploadFile, File(description="The consent recording (any common audio format).")],
) -> VoiceConsent:
    """Store a consent recording; a voice is created from a sample and a consent's id."""
    label, tag = check_label(name, "name"), check_language(language)
    data = await recording.read()  # bounded while the body streamed in (api.admission)
    await decode_audio_bytes(data, settings=state.settings, param="recording")  # it must be audio
    store = _consents(state)
    consent = await run_in_threadpool(store.create, label, tag, data, recording.content_type)
    return _consent(consent)


@router.get("/voice_consents")
async def list_consents(
    state: State,
    after: Annotated[str | None, Query(max_length=64, description="The id after which the page starts.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> VoiceConsentList:
    consents = await run_in_threadpool(_consents(state).list)
    if after is not None:
        ids = [c.id for c in consents]
        consents = consents[ids.index(after) + 1 :] if after in ids else []
    page = consents[:limit]
    return VoiceConsentList(
        data=[_consent(c) for c in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(consents) > limit,
    )


@router.get("/voice_consents/{consent_id}")
async def get_consent(state: State, consent_id: ConsentId) -> VoiceConsent:
    return _consent(await run_in_threadpool(_consents(state).get, consent_id))


@router.post("/voice_consents/{consent_id}")
@json_body(ConsentUpdate)
async def update_consent(request: Request, state: State, consent_id: ConsentId) -> VoiceConsent:
    """Rename a consent recording (the only field OpenAI lets change)."""
    body = await read_json(request, ConsentUpdate)
    return _consent(await run_in_threadpool(_consents(state).rename, consent_id, body.name))


@router.delete("/voice_consents/{consent_id}")
async def delete_consent(state: State, consent_id: ConsentId) -> VoiceConsentDeleted:
    """Delete a consent recording; voices made with it stay (as OpenAI's deleting a voice keeps its consent)."""
    await run_in_threadpool(_consents(state).delete, consent_id)
    return VoiceConsentDeleted(id=consent_id)


# --- voices ------------------------------------------------------------------------------------------


@router.post("/voices", status_code=201)
@queues_a_job
async def create_voice(
    *,
    state: State,
    engine: ReadyEngine,
    name: Annotated[str, Form(description="The voice's display name.")],
    # required; optional here so that a `prompt` voice gets the answer below rather than "field required"
    audio_sample: Annotated[
        UploadFile | None, File(description="The voice's sample (any common audio format); required.")
    ] = None,
    consent: Annotated[
        str | None, Form(description="The id of a consent recording (POST /v1/audio/voice_consents); required.")
    ] = None,
    type: Annotated[  # OpenAI's field name
        str, Form(description="`audio_sample` (the default); `prompt` voices are not supported here.")
    ] = "audio_sample",
    transcript: Annotated[
        str | None,
        Form(description="What the sample says (an extension; Whisper fills it when auto-transcription is on)."),
    ] = None,
    ref_text: Annotated[str | None, Form(description="vLLM-Omni's name for `transcript`.")] = None,
    speaker_description: Annotated[str | None, Form(description="Kept with the voice (vLLM-Omni).")] = None,
) -> AudioVoice:
    """Create a voice from a sample and a consent; its clip is tokenized once now."""
    if type != "audio_sample":
        raise InvalidInputError(
            "only audio_sample voices can be created here: this server clones a voice from a sample "
            "and cannot design one from a text prompt",
            param="type",
        )
    if audio_sample is None or consent is None:
        missing = " and ".join(f for f, v in (("audio_sample", audio_sample), ("consent", consent)) if v is None)
        raise InvalidInputError(f"a voice needs {missing}", param="audio_sample" if audio_sample is None else "consent")
    label = check_label(name, "name")
    check_text("transcript", transcript, state.settings.max_input_chars)
    check_text("ref_text", ref_text, state.settings.max_input_chars)
    check_text("speaker_description", speaker_description, state.settings.max_input_chars)
    if transcript and ref_text and transcript.strip() != ref_text.strip():
        raise InvalidInputError("give the transcript once: transcript and ref_text differ", param="ref_text")
    text = transcript or ref_text
    if not (text or "").strip() and not engine.auto_transcribe:
        raise InvalidInputError(
            "this server clones a voice from its sample and the sample's transcript: send it as the form "
            "field `transcript` (with the OpenAI SDK: extra_body={'transcript': '...'}; vLLM-Omni's "
            "`ref_text` works too), or start the server with --enable-auto-transcribe",
            param="transcript",
        )
    found = await run_in_threadpool(_find_consent, state, consent)
    meta = {"label": label, "consent": found.id, "kind": "audio_sample"}
    if speaker_description and speaker_description.strip():
        meta["description"] = speaker_description.strip()
    data = await audio_sample.read()  # bounded while the body streamed in (api.admission)
    voice = await add_voice(state, engine, new_voice_id(), data, text, file_param="audio_sample", meta=meta)
    return _voice(voice)


def _find_consent(state: AppState, consent_id: str) -> Consent:
    try:
        return _consents(state).get(consent_id)
    except NotFoundError:
        raise InvalidInputError(
            f"no consent recording with id {consent_id!r}: create one with POST /v1/audio/voice_consents",
            param="consent",
        ) from None


@router.get("/voices")
async def list_voices(state: State) -> AudioVoiceList:
    store = state.voices
    voices = sorted(await run_in_threadpool(store.voices), key=lambda v: (v.created or 0, v.name))
    data = [_voice(v) for v in voices]
    return AudioVoiceList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        voices=store.available(v.name for v in voices),
        uploaded_voices=[UploadedVoice(name=v.name, id=v.id, consent=v.consent, created_at=v.created_at) for v in data],
    )


@router.get("/voices/{voice_id}")
async def get_voice(state: State, voice_id: VoiceId) -> AudioVoice:
    return _voice(await run_in_threadpool(_voice_by_id, state, voice_id))


@router.delete("/voices/{voice_id}")
async def delete_voice(state: State, voice_id: VoiceId) -> AudioVoiceDeleted:
    """Delete a voice by id (or by its name when one voice has it, as vLLM-Omni deletes); its consent stays."""
    voice = await run_in_threadpool(_voice_by_id, state, voice_id)
    await run_in_threadpool(state.voices.delete, voice.name)
    return AudioVoiceDeleted(id=voice.name)


def _voice_by_id(state: AppState, voice_id: str) -> Voice:
    """The voice ``voice_id`` names: its id, else the one voice with that display name."""
    try:
        return state.voices.get(voice_id)  # an invalid name is an InvalidInputError: maybe a display name
    except (InvalidInputError, NotFoundError):
        pass
    named = [v for v in state.voices.voices() if v.meta.get("label") == voice_id]
    if len(named) == 1:
        return named[0]
    if named:
        raise InvalidInputError(f"{len(named)} voices are named {voice_id!r}: delete one by its id", param="voice_id")
    raise NotFoundError(f"no voice with id {voice_id!r}")
