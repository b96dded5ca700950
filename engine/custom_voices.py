"""OpenAI's Custom Voices on our voice store: consent recordings, and voices made with one.

OpenAI's shape (``POST /v1/audio/voice_consents``, then ``POST /v1/audio/voices`` naming the
consent) gives each voice a generated id (``voice_...``) and a display name that need not be
unique. Our store keys voices by a name matching ``VOICE_NAME_RE``, which such an id is: a custom
voice is a registered voice whose key is its id and whose metadata holds its display name and
consent. So ``/v1/voices`` lists it too, ``speech.create(voice={"id": ...})`` (or the id as a
string) speaks with it, and it lives wherever the voices live (a directory, or the object store
every replica shares).

A consent is two objects under ``consents/``: ``<id>.audio`` (the recording as uploaded) and
``<id>.json`` (name, language, time). The JSON is written last and removed first, and only JSON
objects are listed, so a listing never shows a consent whose recording is not stored; a crash
between the two leaves at most an unlisted recording. We store the recording as evidence for the
operator and do not check what it says (OpenAI matches it against a consent phrase).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from errors import InvalidInputError, NotFoundError, StorageError
from object_store import CorruptObjectError, ObjectStore, StoreError

logger = logging.getLogger(__name__)

CONSENTS = "consents"  # the consents' folder beside the voices (a name no voice can have: no suffix)
CONSENT_ID_RE = re.compile(r"^cons_[0-9a-f]{24}$")
VOICE_ID_PREFIX = "voice_"
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}$")  # a BCP 47 tag, as OpenAI asks
MAX_LABEL_CHARS = 256
_META, _AUDIO = ".json", ".audio"


def new_voice_id() -> str:
    """``voice_`` and 24 hex digits: a valid voice name, unguessable, and never an OpenAI voice name."""
    return f"{VOICE_ID_PREFIX}{secrets.token_hex(12)}"


def check_label(value: str, param: str) -> str:
    """A display name: 1-256 characters once stripped."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > MAX_LABEL_CHARS:
        raise InvalidInputError(f"{param} must be 1-{MAX_LABEL_CHARS} characters", param=param)
    return text


def check_language(value: str) -> str:
    if not isinstance(value, str) or not LANGUAGE_RE.fullmatch(value.strip()):
        raise InvalidInputError("language must be a BCP 47 tag such as en-US", param="language")
    return value.strip()


@dataclass(frozen=True)
class Consent:
    id: str
    name: str
    language: str
    created_at: int
    recording_bytes: int = 0
    content_type: str | None = None

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__, ensure_ascii=False).encode("utf-8")


class ConsentStore:
    """Consent recordings in ``store`` (the voice store's ``consents/`` folder)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def create(self, name: str, language: str, recording: bytes, content_type: str | None) -> Consent:
        consent = Consent(
            id=f"cons_{secrets.token_hex(12)}",
            name=check_label(name, "name"),
            language=check_language(language),
            created_at=int(time.time()),
            recording_bytes=len(recording),
            content_type=content_type,
        )
        with _storing("the consent recording cannot be stored"):
            self.store.put(f"{consent.id}{_AUDIO}", recording)
            self.store.put(f"{consent.id}{_META}", consent.as_json())  # listed only from now on
        logger.info("stored consent recording %s (%d bytes)", consent.id, len(recording))
        return consent

    def get(self, consent_id: str) -> Consent:
        if not isinstance(consent_id, str) or not CONSENT_ID_RE.fullmatch(consent_id):
            raise NotFoundError(f"no consent recording with id {consent_id!r}")
        with _storing("the consent recording cannot be read"):
            try:
                data = self.store.get(f"{consent_id}{_META}")
            except CorruptObjectError:
                data = None
        if data is None:
            raise NotFoundError(f"no consent recording with id {consent_id!r}")
        try:
            fields = json.loads(data.decode("utf-8"))
            return Consent(**{k: fields[k] for k in Consent.__dataclass_fields__ if k in fields})
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("consent %s is unreadable (%s); treating it as absent", consent_id, exc)
            raise NotFoundError(f"no consent recording with id {consent_id!r} (its record is damaged)") from None

    def list(self) -> list[Consent]:
        """Every consent, oldest first; one deleted while we read is left out."""
        with _storing("the consent recordings cannot be listed"):
            keys = self.store.list_keys()
        found = []
        for key in keys:
            consent_id = key.removesuffix(_META)
            if key.endswith(_META) and CONSENT_ID_RE.fullmatch(consent_id):
                try:
                    found.append(self.get(consent_id))
                except NotFoundError:
                    continue
        return sorted(found, key=lambda c: (c.created_at, c.id))

    def rename(self, consent_id: str, name: str) -> Consent:
        consent = replace(self.get(consent_id), name=check_label(name, "name"))
        with _storing("the consent recording cannot be renamed"):
            self.store.put(f"{consent.id}{_META}", consent.as_json())
        return consent

    def delete(self, consent_id: str) -> None:
        self.get(consent_id)
        with _storing("the consent recording cannot be deleted"):
            self.store.delete(f"{consent_id}{_META}")  # unlisted first
            self.store.delete(f"{consent_id}{_AUDIO}")


@contextmanager
def _storing(what: str) -> Iterator[None]:
    """StoreError -> StorageError (503) saying what could not be done; the store's place is only logged."""
    try:
        yield
    except StoreError as exc:
        logger.warning("%s: the store %s is %s", what, exc.location, exc.reason)
        raise StorageError(f"{what}: the voice store is {exc.reason}") from exc
