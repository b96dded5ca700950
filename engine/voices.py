"""Named voices: a reference clip plus its transcript, kept across restarts in an ``ObjectStore``.

Layout: one object per voice, ``<name>.npz`` (an uncompressed numpy archive read with
``allow_pickle=False``): ``samples`` (float32 ``(channels, n)``, exactly the samples registered)
and ``meta`` (UTF-8 JSON: transcript, sample rate, seconds, creation time, and for voices made
through OpenAI's Custom Voices API their name and consent). On local disk (the default) that is
``<voices_dir>/<name>.npz``; with ``--store-url s3://bucket/prefix`` it is
``prefix/voices/<name>.npz``, so every replica of a deployment serves every voice.

Why one object: a voice is replaced whole (a temp file renamed over the old one, or one S3 PUT),
so a reader gets the whole old voice or the whole new one, never half of each, and never finds
the name missing while it is being re-registered; a listing never shows a voice being written.
A listing skips a voice deleted between listing and reading it. Nothing is cached in the
process: every lookup reads the store, so a voice deleted or replaced through another replica
is gone or new here at once.

Names match ``VOICE_NAME_RE`` (no dots, no slashes), so no name escapes the store and no name
collides with a local store's temp files, which live in ``<voices_dir>/.tmp/``
(``fsutil.WriterTemps``: a writer killed mid-write leaves its file only until the next
registration or start).

A store that cannot be written (a read-only or full disk, an object store that is down) is an
expected state: registering or deleting raises ``StorageError`` (a 503) with nothing stored
changed; a local store still serves the voices it holds.

OpenAI's voice names resolve to the engine's built-in default voice unless an operator has
registered a voice of the same name, which then wins.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.types import AudioInput
from errors import InvalidInputError, NotFoundError, StorageError
from object_store import Backoff, CorruptObjectError, LocalDirStore, ObjectStore, StoreError

logger = logging.getLogger(__name__)

VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
OPENAI_VOICES: tuple[str, ...] = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
)  # fmt: skip
DEFAULT_VOICE_NAME = "default"
VOICE_SUFFIX = ".npz"
DEFAULT_VOICE_DIR = Path(__file__).resolve().parent / "default_voice"


@dataclass(frozen=True)
class Voice:
    name: str
    audio: AudioInput
    transcript: str
    builtin: bool = False
    created: int | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False)  # OpenAI's name, the consent, ...

    @property
    def seconds(self) -> float:
        return self.audio.seconds


@lru_cache(maxsize=1)
def _read_default_voice(directory: Path) -> tuple[AudioInput, str]:
    samples, sr = sf.read(directory / "voice.wav", dtype="float32", always_2d=True)
    transcript = (directory / "transcript.txt").read_text(encoding="utf-8").strip()
    return AudioInput(np.ascontiguousarray(samples.T), int(sr)), transcript


def load_default_voice(directory: Path = DEFAULT_VOICE_DIR) -> tuple[AudioInput, str]:
    """The shipped default voice: its clip ``(1, n)`` at 22.05 kHz and its transcript (a fresh copy)."""
    audio, transcript = _read_default_voice(directory)
    return AudioInput(audio.samples.copy(), audio.sample_rate), transcript


def validate_voice_name(name: str) -> str:
    if not isinstance(name, str) or not VOICE_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            "a voice name is 1-64 characters: letters, digits, '-' and '_', starting with a letter or digit",
            param="name",
        )
    return name


class VoiceStore:
    """Registered voices in a store (a directory by default), plus the built-in default voice behind OpenAI's names."""

    def __init__(self, store: Path | ObjectStore, default_voice: Voice | None = None) -> None:
        # a directory is made by the first registration: opening one writes nothing
        self.store: ObjectStore = LocalDirStore(store) if isinstance(store, Path) else store
        self.default_voice = default_voice
        self._lock = threading.Lock()
        self._outage = Backoff()  # an unreachable store: OpenAI's names fall back to the default at once

    # --- registration -------------------------------------------------------------------
    def register(
        self,
        name: str,
        audio: AudioInput,
        transcript: str,
        prepare: Callable[[AudioInput], None] | None = None,
        meta: dict[str, str] | None = None,
    ) -> Voice:
        """Store a voice (replacing one of the same name); ``prepare`` tokenizes the clip once.

        ``meta`` is kept with the voice (string values: OpenAI's display name, the consent id).
        """
        validate_voice_name(name)
        transcript = transcript.strip()
        if not transcript:
            raise InvalidInputError("a voice needs the transcript of its clip", param="transcript")
        if prepare is not None:
            prepare(audio)  # fails on audio the engine cannot use, before anything is written
        created = int(time.time())
        samples = np.ascontiguousarray(audio.samples, dtype=np.float32)
        extra = dict(meta or {})
        with self._lock:
            self._write(name, samples, audio.sample_rate, transcript, created=created, extra=extra)
        logger.info("registered voice %r (%.2f s)", name, audio.seconds)
        return Voice(name=name, audio=audio, transcript=transcript, created=created, meta=extra)

    def delete(self, name: str) -> None:
        validate_voice_name(name)
        try:
            existed = self.store.delete(f"{name}{VOICE_SUFFIX}")
        except StoreError as exc:
            raise self._storage_error(f"the voice {name!r} cannot be deleted", exc) from exc
        if not existed:
            raise NotFoundError(f"no registered voice named {name!r}")

    # --- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered voice names, sorted (temporary and foreign files skipped)."""
        try:
            keys = self.store.list_keys()
        except StoreError as exc:
            raise self._storage_error("the voices cannot be listed", exc, reading=True) from exc
        return sorted(
            k.removesuffix(VOICE_SUFFIX)
            for k in keys
            if k.endswith(VOICE_SUFFIX) and VOICE_NAME_RE.fullmatch(k.removesuffix(VOICE_SUFFIX))
        )

    def voices(self) -> list[Voice]:
        """Every registered voice, sorted by name; one deleted while we read is left out."""
        found = []
        for name in self.names():
            with contextlib.suppress(NotFoundError):
                found.append(self.get(name))
        return found

    def get(self, name: str) -> Voice:
        """A registered voice by name (NotFoundError when absent or unreadable)."""
        validate_voice_name(name)
        try:
            data = self.store.get(f"{name}{VOICE_SUFFIX}")
        except StoreError as exc:
            raise self._storage_error(f"the voice {name!r} cannot be read", exc, reading=True) from exc
        except CorruptObjectError as exc:
            logger.warning("voice %r is damaged (%s); treating it as absent", name, exc)
            raise NotFoundError(f"no registered voice named {name!r} (its file is damaged)") from None
        if data is None:
            raise NotFoundError(f"no registered voice named {name!r}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                samples = np.asarray(npz["samples"], dtype=np.float32)
                meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
            sample_rate = int(meta["sample_rate"])
            transcript = str(meta["transcript"])
            if samples.ndim != 2 or sample_rate <= 0:
                raise ValueError(f"samples {samples.shape} at {sample_rate} Hz")
        except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("voice %r is unreadable (%s); treating it as absent", name, exc)
            raise NotFoundError(f"no registered voice named {name!r} (its file is damaged)") from None
        created = meta.get("created")
        return Voice(
            name=name,
            audio=AudioInput(samples, sample_rate),
            transcript=transcript,
            created=int(created) if isinstance(created, int | float) else None,
            meta={k: v for k, v in meta.items() if k not in _OWN_META and isinstance(v, str)},
        )

    def available(self, registered: Iterable[str] | None = None) -> list[str]:
        """Every name a request may use: registered voices, then the OpenAI names if a default exists.

        ``registered``: the registered voices' names already read, in the order to keep (else read now).
        """
        names = self.names() if registered is None else list(registered)
        if self.default_voice is not None:
            names += [v for v in (DEFAULT_VOICE_NAME, *OPENAI_VOICES) if v not in names]
        return names

    def resolve(self, name: str) -> Voice:
        """The voice a request names: registered first, else the default behind OpenAI's names.

        Unknown names are a bad request (400) that lists the names available.
        """
        fallback = self.default_voice is not None and name in (DEFAULT_VOICE_NAME, *OPENAI_VOICES)
        if isinstance(name, str) and VOICE_NAME_RE.fullmatch(name) and not (fallback and self._outage.skipping()):
            try:
                voice = self.get(name)
            except NotFoundError:
                pass
            except StorageError:
                if not fallback:
                    raise
                # the store is down: OpenAI's names still speak, in the built-in voice
                self._outage.failed()
            else:
                self._outage.succeeded()
                return voice
        if fallback and self.default_voice is not None:
            return self.default_voice
        available = self.available()
        hint = ", ".join(available) if available else "none (register one with POST /v1/voices)"
        raise InvalidInputError(f"unknown voice {name!r}; available voices: {hint}", param="voice")

    # --- storage --------------------------------------------------------------------------
    def _write(
        self, name: str, samples: np.ndarray, sample_rate: int, transcript: str, *, created: int, extra: dict[str, str]
    ) -> None:
        """Write the voice as one object: the store replaces it whole or not at all."""
        meta = {
            **extra,
            "name": name,
            "transcript": transcript,
            "sample_rate": int(sample_rate),
            "seconds": round(samples.shape[-1] / sample_rate, 3),
            "created": created,
        }
        buf = io.BytesIO()
        meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
        np.savez(buf, samples=samples, meta=meta_bytes)
        try:
            self.store.put(f"{name}{VOICE_SUFFIX}", buf.getvalue())
        except StoreError as exc:
            raise self._storage_error(f"the voice {name!r} cannot be stored", exc) from exc

    def _storage_error(self, what: str, exc: StoreError, *, reading: bool = False) -> StorageError:
        """The store refused or is unreachable: a clear 503 saying what, and nothing changed.

        The log names the store (a directory, a bucket); the client's message does not.
        """
        if self.store.shared:
            where = f"the voice store is {exc.reason}"
        else:
            where = f"the voices directory cannot be {'read' if reading else 'written'} ({exc.detail})"
        logger.warning("%s: %s [%s]", what, where, exc.location)
        unchanged = "" if reading else "; the stored voices are unchanged"
        directory = None if self.store.shared else Path(exc.location)
        return StorageError(f"{what}: {where}{unchanged}", directory)


_OWN_META = frozenset({"name", "transcript", "sample_rate", "seconds", "created"})
