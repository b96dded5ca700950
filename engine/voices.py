"""Named voices: a reference clip plus its transcript, kept on disk across restarts.

Layout: ``<voices_dir>/<name>/audio.wav`` (float32 WAV, exactly the samples registered) and
``<voices_dir>/<name>/voice.json`` (transcript, sample rate, seconds, creation time). A voice
is written to a temporary directory and renamed into place, so a crash never leaves half a
voice. Names match ``VOICE_NAME_RE`` (no dots, no slashes), so no name escapes the directory.

OpenAI's voice names resolve to the engine's built-in default voice unless an operator has
registered a voice of the same name, which then wins.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.types import AudioInput
from errors import InvalidInputError, NotFoundError

logger = logging.getLogger(__name__)

VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
OPENAI_VOICES: tuple[str, ...] = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
)  # fmt: skip
DEFAULT_VOICE_NAME = "default"
_AUDIO_FILE = "audio.wav"
_META_FILE = "voice.json"


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
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.default_voice = default_voice
        self._lock = threading.Lock()

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
        with self._lock:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.directory))
            try:
                samples = np.asarray(audio.samples, dtype=np.float32)
                sf.write(tmp / _AUDIO_FILE, samples.T, audio.sample_rate, subtype="FLOAT")
                meta = {
                    "name": name,
                    "transcript": transcript,
                    "sample_rate": audio.sample_rate,
                    "seconds": round(audio.seconds, 3),
                    "created": created,
                }
                (tmp / _META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1))
                target = self._path(name)
                if target.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=self.directory))
                    target.rename(trash / "v")
                    tmp.rename(target)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        logger.info("registered voice %r (%.2f s)", name, audio.seconds)
        return Voice(name=name, audio=audio, transcript=transcript, created=created)

    def delete(self, name: str) -> None:
        validate_voice_name(name)
        with self._lock:
            target = self._path(name)
            if not (target / _META_FILE).is_file():
                raise NotFoundError(f"no registered voice named {name!r}")
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.del.", dir=self.directory))
            target.rename(trash / "v")
        shutil.rmtree(trash, ignore_errors=True)

    # --- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered voice names, sorted (temporary and foreign directories skipped)."""
        return sorted(
            p.name for p in self.directory.iterdir() if VOICE_NAME_RE.fullmatch(p.name) and (p / _META_FILE).is_file()
        )

    def get(self, name: str) -> Voice:
        """A registered voice by name (NotFoundError when absent)."""
        validate_voice_name(name)
        path = self._path(name)
        try:
            meta = json.loads((path / _META_FILE).read_text())
            samples, sr = sf.read(path / _AUDIO_FILE, dtype="float32", always_2d=True)
        except FileNotFoundError:
            raise NotFoundError(f"no registered voice named {name!r}") from None
        return Voice(
            name=name,
            audio=AudioInput(np.ascontiguousarray(samples.T), int(sr)),
            transcript=str(meta["transcript"]),
            created=meta.get("created"),
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
        if isinstance(name, str) and VOICE_NAME_RE.fullmatch(name) and (self._path(name) / _META_FILE).is_file():
            return self.get(name)
        if self.default_voice is not None and name in (DEFAULT_VOICE_NAME, *OPENAI_VOICES):
            return self.default_voice
        available = self.available()
        hint = ", ".join(available) if available else "none (register one with POST /v1/voices)"
        raise InvalidInputError(f"unknown voice {name!r}; available voices: {hint}", param="voice")

    def _path(self, name: str) -> Path:
        path = (self.directory / name).resolve()
        if path.parent != self.directory.resolve():  # belt and braces beside the regex
            raise InvalidInputError(f"invalid voice name {name!r}", param="name")
        return path
