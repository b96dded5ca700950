"""Named voices: a reference clip plus its transcript, kept on disk across restarts.

Layout: one file per voice, ``<voices_dir>/<name>.npz`` (an uncompressed numpy archive read with
``allow_pickle=False``): ``samples`` (float32 ``(channels, n)``, exactly the samples registered)
and ``meta`` (UTF-8 JSON: transcript, sample rate, seconds, creation time).

Why one file: a voice is replaced by writing a temporary file beside it and ``os.replace``-ing
it over the old one, which is atomic, so a reader that opens the name gets the whole old voice
or the whole new one, never half of each, and never finds the name missing while it is being
re-registered (the old layout, a directory of two files swapped by two renames, had both
windows). A reader reads the file through one open descriptor, so a replace or delete after the
open cannot disturb it. A listing skips a voice deleted between listing and reading it.

Names match ``VOICE_NAME_RE`` (no dots, no slashes), so no name escapes the directory and no
name collides with the temp files, which live in ``<voices_dir>/.tmp/`` (``fsutil.WriterTemps``:
a writer killed mid-write leaves its file only until the next registration or start).

A directory that cannot be written (read-only, full) is an expected state: the store still
serves the voices it holds, and registering or deleting raises ``StorageError`` (a 503) with
nothing stored changed.

OpenAI's voice names resolve to the engine's built-in default voice unless an operator has
registered a voice of the same name, which then wins.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.types import AudioInput
from errors import InvalidInputError, NotFoundError, StorageError
from fsutil import WriterTemps

logger = logging.getLogger(__name__)

VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
OPENAI_VOICES: tuple[str, ...] = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
)  # fmt: skip
DEFAULT_VOICE_NAME = "default"
VOICE_SUFFIX = ".npz"
TEMP_DIR = ".tmp"  # a name no voice can have
DEFAULT_VOICE_DIR = Path(__file__).resolve().parent / "default_voice"


@dataclass(frozen=True)
class Voice:
    name: str
    audio: AudioInput
    transcript: str
    builtin: bool = False
    created: int | None = None

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
    """Registered voices on disk, plus the built-in default voice behind OpenAI's names."""

    def __init__(self, directory: Path, default_voice: Voice | None = None) -> None:
        self.directory = Path(directory)  # made by the first registration: opening one writes nothing
        self.default_voice = default_voice
        self._lock = threading.Lock()
        self._temps = WriterTemps(self.directory / TEMP_DIR)
        with contextlib.suppress(OSError):  # a read-only directory holds no temp files to remove
            self._temps.reap()

    # --- registration -------------------------------------------------------------------
    def register(
        self,
        name: str,
        audio: AudioInput,
        transcript: str,
        prepare: Callable[[AudioInput], None] | None = None,
    ) -> Voice:
        """Store a voice (replacing one of the same name); ``prepare`` tokenizes the clip once."""
        validate_voice_name(name)
        transcript = transcript.strip()
        if not transcript:
            raise InvalidInputError("a voice needs the transcript of its clip", param="transcript")
        if prepare is not None:
            prepare(audio)  # fails on audio the engine cannot use, before anything is written
        created = int(time.time())
        samples = np.ascontiguousarray(audio.samples, dtype=np.float32)
        with self._lock:
            self._write(name, samples, audio.sample_rate, transcript, created)
        logger.info("registered voice %r (%.2f s)", name, audio.seconds)
        return Voice(name=name, audio=audio, transcript=transcript, created=created)

    def delete(self, name: str) -> None:
        validate_voice_name(name)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise NotFoundError(f"no registered voice named {name!r}") from None
        except OSError as exc:
            raise self._storage_error(f"the voice {name!r} cannot be deleted", exc) from exc

    # --- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered voice names, sorted (temporary and foreign files skipped)."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:  # nothing registered yet
            return []
        return sorted(
            p.name.removesuffix(VOICE_SUFFIX)
            for p in entries
            if p.name.endswith(VOICE_SUFFIX) and VOICE_NAME_RE.fullmatch(p.name.removesuffix(VOICE_SUFFIX))
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
            data = self._path(name).read_bytes()  # one open: a later replace cannot mix versions
        except FileNotFoundError:
            raise NotFoundError(f"no registered voice named {name!r}") from None
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
        )

    def available(self) -> list[str]:
        """Every name a request may use: registered voices, then the OpenAI names if a default exists."""
        names = self.names()
        if self.default_voice is not None:
            names += [v for v in (DEFAULT_VOICE_NAME, *OPENAI_VOICES) if v not in names]
        return names

    def resolve(self, name: str) -> Voice:
        """The voice a request names: registered first, else the default behind OpenAI's names.

        Unknown names are a bad request (400) that lists the names available.
        """
        if isinstance(name, str) and VOICE_NAME_RE.fullmatch(name):
            with contextlib.suppress(NotFoundError):
                return self.get(name)
        if self.default_voice is not None and name in (DEFAULT_VOICE_NAME, *OPENAI_VOICES):
            return self.default_voice
        available = self.available()
        hint = ", ".join(available) if available else "none (register one with POST /v1/voices)"
        raise InvalidInputError(f"unknown voice {name!r}; available voices: {hint}", param="voice")

    # --- storage --------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        path = (self.directory / f"{name}{VOICE_SUFFIX}").resolve()
        if path.parent != self.directory.resolve():  # belt and braces beside the regex
            raise InvalidInputError(f"invalid voice name {name!r}", param="name")
        return path

    def _write(self, name: str, samples: np.ndarray, sample_rate: int, transcript: str, created: int) -> None:
        """Write the voice's file durably under a temporary name, then rename it over the old one."""
        meta = {
            "name": name,
            "transcript": transcript,
            "sample_rate": int(sample_rate),
            "seconds": round(samples.shape[-1] / sample_rate, 3),
            "created": created,
        }
        buf = io.BytesIO()
        meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
        np.savez(buf, samples=samples, meta=meta_bytes)
        target = self._path(name)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._temps.reap()
            self._temps.replace(name, buf.getvalue(), target)
        except OSError as exc:
            raise self._storage_error(f"the voice {name!r} cannot be stored", exc) from exc

    def _storage_error(self, what: str, exc: OSError) -> StorageError:
        """The disk refused (read-only, full, no permission): a clear 503 naming what, and nothing changed."""
        reason = exc.strerror or str(exc)
        logger.warning("%s: the voices directory %s cannot be written (%s)", what, self.directory, reason)
        return StorageError(
            f"{what}: the voices directory cannot be written ({reason}); the stored voices are unchanged",
            self.directory,
        )
